"""Translates a file or stdin, one sentence a line, with a trained Transformer run.

  echo "In the beginning God created the heavens and the earth." | \
      python -m experiments.translate --workdir=runs/transformer_tiny
  python -m experiments.translate --workdir=runs/transformer_tiny --input=in.txt --beam_size=4

Beam search with the paper's settings by default (beam 4, length penalty alpha 0.6, at most the
source length + 50 tokens); --beam_size=1 is greedy decoding. A run trained with
config.average_checkpoints=N translates with the mean of its last N checkpoints, as its final
test BLEU did (--average=1: the last checkpoint alone).
"""
import math
import os
import sys

from absl import flags, logging

from data import sources
from data.errors import DataError
from train import cli, errors, runs
from train.tasks import seq2seq

flags.DEFINE_string("workdir", None, "A trained translation run folder.", required=True)
flags.DEFINE_string("input", "", "A UTF-8 text file, one sentence a line (default: stdin).")
flags.DEFINE_integer("beam_size", 0, "Beam size (0: the run's config.decode.beam_size).")
flags.DEFINE_float("alpha", -1.0, "Length penalty (negative: the run's config.decode.alpha).")
flags.DEFINE_integer("average", -1, "Translate with the mean of the last N checkpoints (1: the "
                     "last checkpoint alone; negative: the run's config.average_checkpoints).")
FLAGS = flags.FLAGS
cli.at_least("beam_size", 0, " (0: the run's config.decode.beam_size; 1: greedy)")
flags.register_validator("alpha", math.isfinite, message="--alpha must be a finite number "
                         "(negative: the run's config.decode.alpha)")


def read_lines(path: str) -> list[str]:
    if path:
        if not os.path.isfile(path):
            raise DataError(f"--input={path} does not exist; pass a UTF-8 text file, one "
                            "sentence a line, or pipe the text to stdin")
        text = sources.read_utf8(path)
    else:
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"stdin is not UTF-8 (byte {e.start}); convert it with iconv") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError("nothing to translate: the input has no non-blank line")
    return lines


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only opens
    try:
        # The run is checked first: a wrong --workdir is reported as such, before stdin is read.
        config, tokenizer, params, _ = runs.load_run(
            FLAGS.workdir, families=("transformer",),
            average=None if FLAGS.average < 0 else FLAGS.average)
        lines = read_lines(FLAGS.input)
        outputs = seq2seq.translate(params, lines, tokenizer, config,
                                    beam_size=FLAGS.beam_size or None,
                                    alpha=None if FLAGS.alpha < 0 else FLAGS.alpha)
    except (DataError, errors.CheckpointMismatchError) as e:
        cli.fail(str(e))
    for line in outputs:
        print(line)


if __name__ == "__main__":
    cli.run(main)
