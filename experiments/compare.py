"""Line up finished or running run folders: one summary table plus a loss-curve plot.

    python -m experiments.compare runs/* [--out=compare.png] [--metric=loss]

Each argument is a run folder written by `train.main` (`config.json` + `metrics.jsonl`). The table
has one row per run and ends with the config keys whose values differ between the runs.
"""

import json
import math
import os
import statistics
import sys

from absl import flags

from train import cli
import matplotlib
matplotlib.use("Agg")  # No display on clusters; must come before pyplot is imported.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", "compare.png", "Where to write the PNG of the curves.")
_METRIC = flags.DEFINE_string("metric", "loss", "Metric plotted against step (train and eval).")


class RunError(Exception):
  """A run folder or one of its files cannot be read."""


def load_run(path):
  """Reads a run folder into {name, path, config, train, eval}; lines sorted by step."""
  metrics_path = os.path.join(path, "metrics.jsonl")
  config_path = os.path.join(path, "config.json")
  if not (os.path.isfile(metrics_path) and os.path.isfile(config_path)):
    raise RunError(f"{path} is not a run folder: a run folder must contain metrics.jsonl and "
                   "config.json")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise RunError(f"{config_path}:{e.lineno}: malformed JSON: {e.msg}") from None

  # A resumed run appends to the same file, so a step can appear twice: the later line wins.
  by_step = {"train": {}, "eval": {}}
  prev_step, prev_wall = None, None
  with open(metrics_path) as f:
    for lineno, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        line = json.loads(text)
        step, split = int(line["step"]), line["split"]
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"{metrics_path}:{lineno}: malformed metrics line ({e})") from None
      if split == "train":
        # The first train line of each process includes jit compile time, so it is left out of
        # the throughput medians. A new process shows up as the step or the wall clock going back.
        wall = line.get("wall_time")
        line["_first_in_process"] = (
            prev_step is None or step <= prev_step
            or (wall is not None and prev_wall is not None and wall < prev_wall))
        prev_step, prev_wall = step, wall
      if split in by_step:
        by_step[split][step] = line
  run = {"name": os.path.basename(os.path.normpath(path)), "path": path, "config": config}
  for split, lines in by_step.items():
    run[split] = [lines[s] for s in sorted(lines)]
  return run


def format_duration(seconds):
  """Formats seconds as 42s, 4m12s or 1h02m03s."""
  hours, rest = divmod(int(round(seconds)), 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _fmt(value, spec):
  """Formats a number with a format spec, or "-" when it is missing."""
  return "-" if value is None else format(value, spec)


def _median(lines, key):
  """Median of `key` over train lines that exclude jit compile time; None if there are none."""
  values = [l[key] for l in lines if key in l and not l.get("_first_in_process")]
  return statistics.median(values) if values else None


def summarize(run):
  """One table row of display strings for a run."""
  train, evals = run["train"], run["eval"]
  last_eval = evals[-1] if evals else {}
  scored = [l for l in evals if isinstance(l.get("loss"), (int, float)) and math.isfinite(l["loss"])]
  best = min(scored, key=lambda l: l["loss"]) if scored else None
  mfu = _median(train, "mfu")
  # The run ends with its highest step; at equal steps the eval line is written after the train one.
  by_time = sorted(train + evals, key=lambda l: (l["step"], l["split"] == "eval"))
  last_wall = next((l["wall_time"] for l in reversed(by_time) if "wall_time" in l), None)
  return {
      "run": run["name"],
      "steps": str(train[-1]["step"]) if train else "-",
      "eval loss": _fmt(last_eval.get("loss"), ".4f"),
      "best eval loss": f"{best['loss']:.4f} @ {best['step']}" if best else "-",
      "eval ppl": _fmt(last_eval.get("perplexity"), ".2f"),
      "tokens/s": _fmt(_median(train, "tokens_per_sec"), ",.0f"),
      "MFU": "-" if mfu is None else f"{100 * mfu:.1f}%",  # Logged as a fraction of peak.
      "wall": "-" if last_wall is None else format_duration(last_wall),
  }


def _flatten(config, prefix=""):
  """Nested dict -> {"opt.learning_rate": value, ...}."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def differing_config_keys(runs):
  """Sorted dotted config keys whose values are not the same in every run (missing counts)."""
  flats = [_flatten(run["config"]) for run in runs]
  keys = set().union(*flats) if flats else set()
  missing = object()
  return sorted(k for k in keys
                if any(f.get(k, missing) != flats[0].get(k, missing) for f in flats[1:]))


def _config_value(config, dotted_key):
  """Display string of one config value, "-" where the run does not have the key."""
  value = _flatten(config).get(dotted_key, "-")
  return value if isinstance(value, str) else json.dumps(value)


def format_table(rows, columns):
  """Aligned text table: header, rule, one line per row; the first column left-aligned."""
  cells = [list(columns)] + [[str(row.get(c, "-")) for c in columns] for row in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

  def render(line):
    return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(line, widths))).rstrip()

  rule = "  ".join("-" * w for w in widths)
  return "\n".join([render(cells[0]), rule] + [render(line) for line in cells[1:]])


def plot_curves(runs, out_path, metric="loss"):
  """Writes a PNG of train (thin line) and eval (markers) `metric` against step, one colour a run."""
  fig, ax = plt.subplots(figsize=(9, 5.5))
  values = []
  for i, run in enumerate(runs):
    colour = f"C{i % 10}"
    for split in ("train", "eval"):
      points = [(l["step"], l[metric]) for l in run[split]
                if isinstance(l.get(metric), (int, float)) and math.isfinite(l[metric])]
      if not points:
        continue
      steps, ys = zip(*points)
      values.extend(ys)
      if split == "train":
        ax.plot(steps, ys, color=colour, lw=0.8, alpha=0.7, label=run["name"])
      else:
        ax.plot(steps, ys, color=colour, lw=1.5, marker="o", ms=4,
                label=run["name"] if not run["train"] else "_nolegend_")
  # Early losses are often 10x the final ones; a log axis keeps the end of training readable.
  if values and min(values) > 0 and max(values) / min(values) > 10:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric}: train (thin line), eval (markers)")
  ax.grid(True, alpha=0.3)
  if runs:
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) < 2:
    cli.fail("give one or more run folders, e.g. python -m experiments.compare runs/*")
  try:
    runs = [load_run(path) for path in argv[1:]]
  except RunError as e:
    # One line, no traceback: the cause is the input, not the code.
    print(f"compare: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None

  keys = differing_config_keys(runs)
  rows = []
  for run in runs:
    row = summarize(run)
    row.update({k: _config_value(run["config"], k) for k in keys})
    rows.append(row)
  print(format_table(rows, list(rows[0])))
  plot_curves(runs, _OUT.value, _METRIC.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
