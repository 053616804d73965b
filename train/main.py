"""Command-line entry point: trains the experiment given by --config into --workdir.

  python -m train.main --config=experiments/gpt.py:tiny --workdir=runs/gpt_tiny \\
      --config.opt.learning_rate=3e-4 --config.mesh.fsdp=2

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from data.errors import DataError
from train import checkpoint, loop, sharding, tasks

flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, tokenizer.")
config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/gpt.py:tiny",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl parsing, with a bad --config.<key> override turned into one readable line."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        detail = re.sub(r"\\n|\n|[\\'\"]", " ", str(e))
        detail = " ".join(detail.split())
        print(f"error: bad config override among {overrides or argv[1:]}: {detail}. "
              "Fix the key (keys are listed in the experiment file's get_config) "
              "or the value's type.", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    config = flags.FLAGS.config
    try:
        loop.train_and_evaluate(config, flags.FLAGS.workdir, tasks.get(config.task))
    except (DataError, checkpoint.CheckpointMismatchError, sharding.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
