"""Shows what supervised fine-tuning will train on, before any training: the exact token
sequence of some conversations with the loss-carrying spans marked, and the packing figures.

  python -m experiments.sft_data --config=experiments/gpt_sft.py:tiny --show_example=3
  python -m experiments.sft_data --config=experiments/gpt_sft.py:tiny \
      --config.data.source=train.jsonl --config.data.eval_source=dev.jsonl

It reads the data and the base run's tokenizer as train.main would (with the same config
overrides) and writes nothing: the tokenizer with the chat tokens goes to a temporary folder.
"""
import tempfile

from absl import flags
from ml_collections import config_flags

from data import chat, chat_template
from data.errors import DataError
from train import cli, config as config_lib, errors
from train.errors import ConfigError
from train.tasks import posttrain, sft

config_flags.DEFINE_config_file("config", None, "An sft experiment, e.g. "
                                "experiments/gpt_sft.py:tiny", lock_config=True)
flags.DEFINE_integer("show_example", 2, "Training conversations to print.")
FLAGS = flags.FLAGS
cli.at_least("show_example", 0)


def main(argv):
    del argv
    config = FLAGS.config
    try:
        if config is None or config.get("task") != "sft":
            raise ConfigError("--config must be an sft experiment, e.g. "
                              "--config=experiments/gpt_sft.py:tiny")
        sft.configure(config)
        config_lib.validate(config)
        train, dev = sft.conversations(config)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = posttrain.load_tokenizer(config, tmp, train)
        fmt = chat_template.chat_format(tokenizer)
        for conv in train[:FLAGS.show_example]:
            print(f"--- {conv.where} ---")
            print(fmt.show(conv))
        for name, convs in (("train", train), ("dev", dev)):
            _, stats = chat.pack(sft.render_all(convs, fmt), config.data.max_len,
                                 packing=config.data.packing)
            print(f"{name}: {stats['examples']} conversations in {stats['rows']} rows of "
                  f"{config.data.max_len} | filled {100 * stats['fill']:.1f}% | loss on "
                  f"{100 * stats['loss_token_share']:.1f}% of tokens | cut from the prompt "
                  f"side: {stats['truncated']} ({100 * stats['truncated_share']:.2f}%)")
    except (DataError, ConfigError, errors.CheckpointMismatchError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    cli.run(main)
