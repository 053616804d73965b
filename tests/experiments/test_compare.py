"""Tests for experiments/compare.py on fake run folders with hand-computed numbers."""

import json
import os
import subprocess
import sys

import pytest

from experiments import compare

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_run(root, name, config, lines):
  """Writes a fake run folder (config.json + metrics.jsonl) and returns its path."""
  path = root / name
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  (path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  return str(path)


def train_line(step, loss, tokens_per_sec=1000.0, mfu=0.1, wall_time=0.0):
  return {"step": step, "split": "train", "loss": loss, "perplexity": 2.0 ** loss,
          "learning_rate": 1e-3, "grad_norm": 1.0, "param_norm": 10.0,
          "tokens_per_sec": tokens_per_sec, "mfu": mfu, "wall_time": wall_time,
          "tokens": step * 1024}


def eval_line(step, loss, perplexity, wall_time=0.0):
  return {"step": step, "split": "eval", "loss": loss, "perplexity": perplexity,
          "accuracy": 0.5, "wall_time": wall_time}


CONFIG = {"model": {"num_layers": 2, "d_model": 64}, "opt": {"learning_rate": 1e-3},
          "num_train_steps": 300, "seed": 0}


def run_cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "experiments.compare", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PYTHONPATH": REPO_ROOT})


def test_summary_values_by_hand(tmp_path):
  path = make_run(tmp_path, "gpt_a", CONFIG, [
      # The first line includes compile time (tokens/s 10, MFU 1%) and must not count.
      train_line(100, 4.0, tokens_per_sec=10.0, mfu=0.01, wall_time=30.0),
      eval_line(100, 3.9, 49.4, wall_time=35.0),
      train_line(200, 3.0, tokens_per_sec=5000.0, mfu=0.40, wall_time=100.0),
      eval_line(200, 2.5, 12.18, wall_time=105.0),
      train_line(300, 2.8, tokens_per_sec=7000.0, mfu=0.50, wall_time=200.0),
      train_line(400, 2.6, tokens_per_sec=6000.0, mfu=0.30, wall_time=245.0),
      eval_line(400, 2.7, 14.88, wall_time=252.0),
  ])
  row = compare.summarize(compare.load_run(path))
  assert row == {
      "run": "gpt_a",
      "steps": "400",
      "eval loss": "2.7000",
      "best eval loss": "2.5000 @ 200",
      "eval ppl": "14.88",
      "tokens/s": "6,000",  # median(5000, 7000, 6000)
      "MFU": "40.0%",  # median(0.40, 0.50, 0.30)
      "wall": "4m12s",  # 252 s, from the last (eval) line
  }
  table = compare.format_table([row], list(row))
  header, rule, body = table.splitlines()
  assert header.split()[0] == "run" and set(rule) <= {"-", " "}
  for cell in row.values():
    assert cell in body


def test_resumed_run_later_line_wins(tmp_path):
  path = make_run(tmp_path, "resumed", CONFIG, [
      train_line(100, 3.0, tokens_per_sec=1.0, wall_time=10.0),
      train_line(200, 2.5, tokens_per_sec=100.0, wall_time=20.0),
      eval_line(200, 2.6, 13.0),
      train_line(300, 2.4, tokens_per_sec=100.0, wall_time=30.0),
      # Killed after step 300 and restarted from the step-200 checkpoint: the clock restarts and
      # the first line of the new process carries compile time again.
      train_line(200, 2.45, tokens_per_sec=2.0, wall_time=12.0),
      eval_line(200, 2.55, 12.8),
      train_line(300, 2.35, tokens_per_sec=100.0, wall_time=22.0),
      train_line(400, 2.2, tokens_per_sec=100.0, wall_time=32.0),
  ])
  run = compare.load_run(path)
  assert [l["step"] for l in run["train"]] == [100, 200, 300, 400]
  assert [l["loss"] for l in run["train"]] == [3.0, 2.45, 2.35, 2.2]
  assert [(l["step"], l["loss"]) for l in run["eval"]] == [(200, 2.55)]
  row = compare.summarize(run)
  assert row["steps"] == "400"
  assert row["best eval loss"] == "2.5500 @ 200"
  assert row["tokens/s"] == "100"  # Both compile-time lines (1 and 2 tokens/s) are left out.
  assert row["wall"] == "32s"


def test_run_without_eval_shows_dashes(tmp_path):
  path = make_run(tmp_path, "early", CONFIG, [train_line(10, 5.0)])
  row = compare.summarize(compare.load_run(path))
  assert row["steps"] == "10"
  assert row["eval loss"] == row["best eval loss"] == row["eval ppl"] == "-"
  assert row["tokens/s"] == "-"  # Only the compile-time line exists yet.


def test_differing_config_keys_nested(tmp_path):
  other = {"model": {"num_layers": 4, "d_model": 64}, "opt": {"learning_rate": 3e-4},
           "num_train_steps": 300, "seed": 0}
  third = {**CONFIG, "opt": {"learning_rate": 1e-3, "warmup_steps": 10}}
  runs = [compare.load_run(make_run(tmp_path, n, c, [train_line(1, 1.0)]))
          for n, c in [("a", CONFIG), ("b", other), ("c", third)]]
  assert compare.differing_config_keys(runs) == [
      "model.num_layers", "opt.learning_rate", "opt.warmup_steps"]
  assert compare.differing_config_keys(runs[:1]) == []
  assert compare.differing_config_keys([runs[0], runs[0]]) == []


def test_plot_writes_png(tmp_path):
  lines = [train_line(s, 10.0 / s ** 0.5) for s in range(1, 101)]
  lines += [eval_line(s, 10.0 / s ** 0.5, 1.0) for s in (25, 50, 100)]
  runs = [compare.load_run(make_run(tmp_path, "a", CONFIG, lines)),
          compare.load_run(make_run(tmp_path, "b", CONFIG, [eval_line(5, 3.0, 20.0)]))]
  out = tmp_path / "curves.png"
  compare.plot_curves(runs, str(out), "loss")
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli_end_to_end(tmp_path):
  a = make_run(tmp_path, "lr_1e-3", CONFIG, [train_line(100, 3.0), eval_line(100, 2.9, 18.2)])
  b = make_run(tmp_path, "lr_3e-4", {**CONFIG, "opt": {"learning_rate": 3e-4}},
               [train_line(100, 3.2)])
  out = tmp_path / "cmp.png"
  result = run_cli(a, b, f"--out={out}", cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].split() == ["run", "steps", "eval", "loss", "best", "eval", "loss", "eval",
                              "ppl", "tokens/s", "MFU", "wall", "opt.learning_rate"]
  assert lines[2].split()[:2] == ["lr_1e-3", "100"] and lines[2].split()[-1] == "0.001"
  assert lines[3].split()[:3] == ["lr_3e-4", "100", "-"] and lines[3].split()[-1] == "0.0003"
  assert lines[-1] == f"wrote {out}"
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_a_run_folder(tmp_path):
  (tmp_path / "notes").mkdir()
  result = run_cli(str(tmp_path / "notes"), cwd=tmp_path)
  assert result.returncode == 2
  err = result.stderr.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err
  assert str(tmp_path / "notes") in err
  assert "must contain metrics.jsonl and config.json" in err


def test_malformed_line_names_file_and_line(tmp_path):
  path = make_run(tmp_path, "broken", CONFIG, [train_line(1, 1.0), train_line(2, 0.9)])
  with open(os.path.join(path, "metrics.jsonl"), "a") as f:
    f.write('{"step": 3, "split": "tra\n')  # A line cut off by a crash.
  with pytest.raises(compare.RunError, match=r"metrics\.jsonl:3:"):
    compare.load_run(path)
  result = run_cli(path, cwd=tmp_path)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert f"{os.path.join(path, 'metrics.jsonl')}:3:" in result.stderr


def test_no_runs_prints_usage(tmp_path):
  result = run_cli(cwd=tmp_path)
  assert result.returncode == 2
  assert "python -m experiments.compare runs/*" in result.stderr
