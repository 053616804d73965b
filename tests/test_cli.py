"""End-to-end command-line runs: train, resume, sample, compare, and every bad input."""
import atexit
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.conftest import XLA_TEST_FLAGS, smoke_config, tree_digest
from train import errors, runs, tasks

lm = tasks.get("lm")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(module, *args, check=True, devices=None):
    """Runs `python -m module args` from the repository root; returns the CompletedProcess.
    `devices`: the host device count, instead of the 2 that tests/conftest.py gives.
    The run is forked from tests/forkserver.py, which has the libraries imported already
    (TESTS_FORK=0: a fresh interpreter each time, as before)."""
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count={devices}"
    server = _fork_server()
    if server is not None and _jax_settings(env) == server.jax_settings:
        proc = server.run(module, args, env)
    else:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                              capture_output=True, text=True, errors="surrogateescape",
                              timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _jax_settings(env):
    """What jax reads from the environment when it is imported (the server imported it)."""
    return {key: value for key, value in env.items() if key.startswith("JAX_")}


class _ForkServer:
    def __init__(self):
        self.jax_settings = _jax_settings(os.environ)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.tmp = tempfile.mkdtemp(prefix="forkserver-")
        atexit.register(self.proc.stdin.close)  # the server ends with its input

    def run(self, module, args, env, timeout=300):
        out, err = os.path.join(self.tmp, "stdout"), os.path.join(self.tmp, "stderr")
        request = dict(module=module, args=[str(a) for a in args], env=env, cwd=str(ROOT),
                       stdout=out, stderr=err)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        watchdog = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))
        watchdog.start()
        returncode = json.loads(self.proc.stdout.readline())["returncode"]
        watchdog.cancel()
        if returncode == -signal.SIGKILL:
            raise subprocess.TimeoutExpired([module, *args], timeout)
        read = lambda path: pathlib.Path(path).read_text(errors="surrogateescape")  # noqa: E731
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], returncode,
                                           read(out), read(err))


_SERVER = []


def _fork_server():
    if os.environ.get("TESTS_FORK", "1") == "0":
        return None
    if not _SERVER:
        _SERVER.append(_ForkServer())
    return _SERVER[0]


def train(workdir, corpus, *overrides, check=True):
    return run("train.main", "--config=experiments/gpt.py:smoke", f"--workdir={workdir}",
               f"--config.data.source={corpus}", *overrides, check=check)


@pytest.fixture(scope="module")
def trained_run(corpus_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "gpt_smoke"
    train(workdir, corpus_file, "--config.num_train_steps=30", "--config.eval_every_steps=15",
          "--config.keep_checkpoints=2")
    return workdir


def test_training_run_writes_the_run_folder(trained_run):
    for name in ("config.json", "tokenizer.model", "metrics.jsonl", "tensorboard"):
        assert (trained_run / name).exists(), name
    assert sorted(os.listdir(trained_run / "checkpoints")) == ["20", "30"]  # every 10, keep 2


def test_greedy_sampling_is_deterministic_and_shows_probabilities(trained_run):
    args = ("--workdir", str(trained_run), "--prompt=The king", "--temperature=0",
            "--max_new_tokens=8", "--show_probs=5")
    first, second = run("experiments.sample", *args), run("experiments.sample", *args)
    assert first.stdout == second.stdout
    rows = [line.split() for line in first.stdout.splitlines() if line.startswith("    ")]
    probs = [float(r[-1]) for r in rows]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0
    assert "--- sample 1" in first.stdout


def test_compare_prints_a_table_and_a_plot(trained_run, tmp_path):
    out = run("experiments.compare", str(trained_run), f"--out={tmp_path / 'c.png'}")
    assert "gpt_smoke" in out.stdout and (tmp_path / "c.png").stat().st_size > 1000


def _assert_clear_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_changed_model_shape_is_refused_and_checkpoint_kept(trained_run, corpus_file):
    before = tree_digest(trained_run / "checkpoints")
    proc = train(trained_run, corpus_file, "--config.num_train_steps=30",
                 "--config.model.d_model=64", check=False)
    _assert_clear_error(proc, "model.d_model", "new --workdir")
    assert tree_digest(trained_run / "checkpoints") == before


def test_checkpoint_shape_mismatch_is_a_clear_error(trained_run, corpus_file):
    config = smoke_config(corpus_file, **{"model.d_ff": 48})
    with pytest.raises(errors.CheckpointMismatchError, match="different model shape"):
        runs.restore_params(config, str(trained_run), lm)


def test_unknown_config_key(tmp_path, corpus_file):
    proc = train(tmp_path, corpus_file, "--config.model.dmodel=64", check=False)
    _assert_clear_error(proc, "dmodel", "d_model")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["missing", "empty", "too_short", "latin1"])
def test_bad_corpus(case, tmp_path):
    corpus = tmp_path / "corpus.txt"
    if case == "empty":
        corpus.write_text("  \n\n")
    elif case == "too_short":
        corpus.write_text("Hello there.\n\nGood day to you.\n")
    elif case == "latin1":
        corpus.write_bytes("Caf\u00e9 au lait.\n\nD\u00e9j\u00e0 vu.\n".encode("latin-1"))
    needle = {"missing": "no file", "empty": "empty", "too_short": "max_len",
              "latin1": "UTF-8"}[case]
    proc = train(tmp_path / "run", corpus, check=False)
    _assert_clear_error(proc, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prompt_longer_than_the_context(trained_run):
    proc = run("experiments.sample", f"--workdir={trained_run}", "--prompt=" + "king " * 80,
               check=False)
    _assert_clear_error(proc, "context", "shorten the prompt")


def test_prompt_with_invalid_utf8_bytes(trained_run):
    prompt = b"The king \xff\xfe".decode("utf-8", "surrogateescape")
    proc = run("experiments.sample", f"--workdir={trained_run}", f"--prompt={prompt}",
               check=False)
    _assert_clear_error(proc, "UTF-8")


def test_sampling_without_a_run(tmp_path):
    _assert_clear_error(run("experiments.sample", f"--workdir={tmp_path}", check=False),
                        "not a run folder")




def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(corpus_file, tmp_path):
    """A preempted run (SIGTERM) checkpoints where it stands; the same command resumes it."""
    args = [sys.executable, "-m", "train.main", "--config=experiments/gpt.py:smoke",
            f"--workdir={tmp_path}", f"--config.data.source={corpus_file}",
            "--config.num_train_steps=100000", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=1000000", "--config.eval_every_steps=1000000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped early" in stdout + stderr
    saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 100000
    last_logged = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert saved[0] >= last_logged
    # Rerunning the same command (with an end in reach) continues from the saved step.
    train(tmp_path, corpus_file, f"--config.num_train_steps={saved[0] + 3}",
          "--config.log_every_steps=1")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps[-3:] == [saved[0] + 1, saved[0] + 2, saved[0] + 3]
    assert train_steps == sorted(set(train_steps))  # no step trained twice


def test_impossible_mesh_is_refused_before_any_work(tmp_path, corpus_file):
    proc = train(tmp_path / "run", corpus_file, "--config.mesh.fsdp=3", check=False)
    _assert_clear_error(proc, "config.mesh", "devices")
    assert not (tmp_path / "run" / "tokenizer.model").exists()


def test_attention_maps_for_gpt(trained_run, tmp_path):
    run("experiments.attention", f"--workdir={trained_run}", "--text=The king",
        f"--out={tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["self_h_0.png", "self_h_1.png"]


SMOKE = ["--config=experiments/gpt.py:smoke"]


@pytest.mark.parametrize("args, needle", [
    (["--config=experiments/nope.py", "--workdir=W"], "no experiment file experiments/nope.py"),
    (["--config=experiments/gpt.py:no_such_variant", "--workdir=W"], "unknown GPT variant"),
    (SMOKE, "--workdir is required"),
    (SMOKE + ["--workdir=W", "--bogus=1"], "unknown flag --bogus"),
    (SMOKE + ["--workdir=W", "--config.num_train_steps=-5"], "num_train_steps=-5"),
    (SMOKE + ["--workdir=W", "--config.num_train_steps=abc"], "num_train_steps=abc"),
    (SMOKE + ["--workdir=W", "--config.model.num_layers=0"], "model.num_layers=0"),
    (SMOKE + ["--workdir=W", "--config.model.num_heads=3"], "not divisible"),
    (SMOKE + ["--workdir=W", "--config.opt.learning_rate=nan"], "opt.learning_rate=nan"),
    (SMOKE + ["--workdir=W", "--config.model.dropout_rate=1.5"], "model.dropout_rate=1.5"),
    (SMOKE + ["--workdir=W", "--config.opt.schedule=steps"], "opt.schedule='steps'"),
    (SMOKE + ["--workdir=W", "--config.batch_size=12"], "does not split evenly"),
    (SMOKE + ["--workdir=FILE"], "is a file, not a folder"),
])
def test_bad_command_lines_are_one_line_errors(args, needle, tmp_path):
    regular_file = tmp_path / "file.txt"
    regular_file.write_text("not a run folder")
    args = [a.replace("=W", f"={tmp_path / 'run'}").replace("=FILE", f"={regular_file}")
            for a in args]
    # 8 devices: a batch of 12 does not split over them (it would over 2).
    _assert_clear_error(run("train.main", *args, check=False, devices=8), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, needle", [
    ("--max_new_tokens=-1", "--max_new_tokens must be"),
    ("--temperature=-1", "--temperature must be"),
    ("--top_p=1.5", "--top_p must be in (0.0, 1.0]"),
    ("--top_p=0", "--top_p must be in (0.0, 1.0]"),
    ("--top_k=-3", "--top_k must be"),
    ("--num_samples=0", "--num_samples must be"),
    ("--show_probs=100000", "exceeds the vocabulary"),
])
def test_sampling_flags_out_of_range(trained_run, flag, needle):
    _assert_clear_error(run("experiments.sample", f"--workdir={trained_run}", flag,
                            check=False), needle)


def test_resuming_with_another_batch_size_is_refused(trained_run, corpus_file):
    before = tree_digest(trained_run / "checkpoints")
    proc = train(trained_run, corpus_file, "--config.num_train_steps=40",
                 "--config.batch_size=16", check=False)
    _assert_clear_error(proc, "batch_size: saved 8 vs now 16")
    assert tree_digest(trained_run / "checkpoints") == before


def test_resuming_with_more_micro_batches_is_the_same_run_and_says_so(trained_run, corpus_file,
                                                                      tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    proc = train(copy, corpus_file, "--config.num_train_steps=35",
                 "--config.opt.grad_accum_steps=2")
    notes = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "changed since the saved run" in line]
    assert len(notes) == 1, proc.stderr[-2000:]
    assert "opt.grad_accum_steps 1 -> 2" in notes[0] and "num_train_steps 30 -> 35" in notes[0]


def test_divergence_exits_nonzero_naming_the_step_with_the_good_checkpoint_newest(
        tmp_path, corpus_file):
    proc = train(tmp_path, corpus_file, "--config.opt.learning_rate=1e6",
                 "--config.opt.clip_grad_norm=0", "--config.checkpoint_every_steps=2",
                 "--config.keep_checkpoints=5", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "so training stopped" in errors[0], proc.stderr[-2000:]
    bad_step = int(errors[0].split("step ")[1].split(":")[0])
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints"))
    assert saved and saved[-1] < bad_step and f"step {saved[-1]}, is the last good" in errors[0]


def test_translate_checks_the_run_before_reading_stdin(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.translate",
                           f"--workdir={tmp_path}"], cwd=ROOT, input="", capture_output=True,
                          text=True, timeout=300)
    _assert_clear_error(proc, "not a run folder")


def test_prepare_then_train_on_prepared_data(corpus_file, tmp_path):
    """The two commands of a large corpus: prepare (2 worker processes), then train from it;
    bad prepare arguments are one-line errors."""
    out = tmp_path / "prepared"
    args = ("--config=experiments/gpt.py:smoke", f"--config.data.source={corpus_file}",
            f"--out={out}", "--docs_per_shard=10")
    first = run("experiments.prepare", *args, "--workers=2")
    assert "Train with --config.data.source=prepared:" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) >= 3
    before = tree_digest(out)  # (a second prepare being a no-op: tests/data/test_prepared.py)
    train(tmp_path / "run", f"prepared:{out}", "--config.num_train_steps=4",
          "--config.eval_every_steps=4")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any(m.get("split") == "eval" and m["step"] == 4 for m in metrics)
    _assert_clear_error(run("experiments.prepare", *args[:2], check=False), "--out=DIR")
    _assert_clear_error(run("experiments.prepare", *args, "--workers=0", check=False),
                        "--workers must be >= 1")
    assert tree_digest(out) == before


@pytest.mark.parametrize("experiment", ["gpt_sft", "gpt_dpo", "gpt_reward", "gpt_ppo",
                                        "gpt_grpo"])
def test_post_training_smoke_presets_start_from_a_gpt_smoke_run(experiment, trained_run):
    """The :smoke presets compose: each post-training one takes a gpt.py:smoke run as its base
    unchanged; rows past the base's context are one error naming the override to pass."""
    import importlib
    from data.errors import DataError
    from train import config as config_lib
    from train.tasks import posttrain
    config = importlib.import_module(f"experiments.{experiment}").get_config("smoke")
    config.init_from = str(trained_run)
    tasks.get(config.task).configure(config)  # the base run's shape, as train.main does
    config_lib.validate(config)
    posttrain.check_lengths(config)  # where every post-training task's prepare_data starts
    base = json.loads((trained_run / "config.json").read_text())["model"]["max_len"]
    assert config.model.max_len == base >= config.data.max_len
    config.data.max_len = base + 1
    with pytest.raises(DataError, match=rf"config.data.max_len={base + 1} exceeds the model "
                       rf"context config.model.max_len={base} of the base run .*; pass "
                       rf"--config.data.max_len={base}$"):
        posttrain.check_lengths(config)
