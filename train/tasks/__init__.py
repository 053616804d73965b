"""Training objectives, one module each; `get(config.task)` picks one.

A task module gives the loop build_model, prepare_data, loss_fn (a loss *sum* and metric sums),
init_params, flops_per_token and bench_batch; optionally summarize, final_report,
load_pretrained (fine-tuning) and evaluate_predictions (metrics that need whole predictions).
Modules are imported on demand so one task's dependencies never load for another.
"""
import importlib

NAMES = ("lm", "mlm_nsp", "classify", "span_qa", "seq2seq")


def get(name: str):
    """The task module called `name`."""
    if name not in NAMES:
        from train.sharding import ConfigError
        raise ConfigError(f"unknown config.task {name!r}; known tasks: {list(NAMES)}")
    return importlib.import_module(f"train.tasks.{name}")


def read_run_config(workdir: str, how_to_make_one: str):
    """The ConfigDict saved in a run folder's config.json; a folder without one is a DataError
    ending with `how_to_make_one`."""
    import json
    import os

    import ml_collections

    from data.errors import DataError

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise DataError(f"{workdir} is not a run folder (no config.json); {how_to_make_one}")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, families=None, average=None):
    """(config, tokenizer, params, task) of a trained run folder, restored read-only.

    `families` (e.g. ("bert",)) refuses runs of another model family with a clear error;
    `average` is loop.restore_params's (default: the run's config.average_checkpoints).
    """
    import os

    from data import tokenizer as tok
    from data.errors import DataError
    from train import loop

    config = read_run_config(workdir, "train one first with python -m train.main "
                                      "--config=experiments/<file>.py:tiny --workdir=...")
    family = config.model.get("family", "gpt")
    if families and family not in families:
        raise DataError(f"{workdir} holds a {family} run; this tool needs a "
                        f"{' or '.join(families)} run folder")
    tokenizer = tok.load_tokenizer(os.path.join(workdir, "tokenizer.model"))
    task = get(config.task)
    params, _ = loop.restore_params(config, workdir, task, average=average)
    return config, tokenizer, params, task
