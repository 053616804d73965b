"""Hugging Face checkpoints in and out: GPT-2, BERT (any head) and MarianMT folders.

Import a local model folder (config.json + model.safetensors + tokenizer files) as a run
folder that every tool reads (sample, embed, translate, predict_qa, attention, compare) and
train.main resumes:
  python -m experiments.hf --import_from=models/gpt2 --workdir=runs/gpt2
  python -m experiments.sample --workdir=runs/gpt2 --prompt="Hello" --temperature=0
The experiment whose settings (data, optimizer, steps) the run takes is chosen from the
checkpoint's architecture (GPT-2: experiments/gpt.py:tiny; BertForPreTraining / BertModel:
bert.py:tiny; ...ForSequenceClassification: bert_classify.py:tiny; ...ForQuestionAnswering:
bert_squad.py:tiny; Marian: transformer.py:tiny), or given with --config.

Export a run, trained here or imported, as a folder transformers' from_pretrained loads
(same logits; its tokenizer loads with AutoTokenizer):
  python -m experiments.hf --workdir=runs/gpt_tiny --export_to=exported/gpt_tiny

Fine-tuning straight from a folder needs no import: --config.init_from=hf:DIR on train.main.
"""
import importlib.util
import time

from absl import flags, logging
from ml_collections import config_flags

from data.errors import DataError
from models import hf, layers
from train import cli, errors, hf_runs, pretrained
from train.errors import ConfigError

flags.DEFINE_string("workdir", None, "The run folder: written by an import, read by an "
                    "export.", required=True)
flags.DEFINE_string("import_from", None, "A local Hugging Face model folder to import.")
flags.DEFINE_string("export_to", None, "A new folder to export the run in --workdir into.")
config_flags.DEFINE_config_file("config", None, "Import only: the experiment whose settings "
                                "the run takes, e.g. experiments/gpt.py:smoke (default: chosen "
                                "from the checkpoint)", lock_config=True)
FLAGS = flags.FLAGS


def _default_config(directory):
    """get_config("tiny") of the experiment file that fits the checkpoint."""
    path = hf.default_experiment(pretrained.read_hf_config(directory))
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.lock()
    return config, f"{path}:tiny"


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    if bool(FLAGS.import_from) == bool(FLAGS.export_to):
        cli.fail("pass exactly one of --import_from=DIR (a Hugging Face folder into "
                 "--workdir) and --export_to=DIR (the run in --workdir into a new folder)")
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    try:
        if FLAGS.import_from:
            config, name = (FLAGS.config, "--config") if FLAGS.config else \
                _default_config(FLAGS.import_from)
            report = hf_runs.import_run(FLAGS.import_from, FLAGS.workdir, config)
            m = config.model
            print(f"imported {FLAGS.import_from} ({m.family}: {m.num_layers} layers, width "
                  f"{m.d_model}, vocabulary {m.vocab_size} padded to "
                  f"{layers.padded_vocab_size(m.vocab_size, m.vocab_multiple)}) into "
                  f"{FLAGS.workdir} with the settings of {name} in "
                  f"{time.perf_counter() - start:.1f} s")
            if report["fresh"]:
                print(f"not in the checkpoint, freshly initialised: {report['fresh']}")
            if report["unused"]:
                print(f"in the checkpoint but unused: {report['unused']}")
        else:
            out = hf_runs.export_run(FLAGS.workdir, FLAGS.export_to)
            print(f"exported {FLAGS.workdir} as {out['architectures'][0]} into "
                  f"{FLAGS.export_to} in {time.perf_counter() - start:.1f} s")
    except (DataError, ConfigError, errors.CheckpointMismatchError,
            hf.UnsupportedCheckpoint) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    cli.run(main)
