"""Reading run folders: the saved config, the trained parameters, a LoRA run's base, and a
whole run for the tools (sample, chat, embed, export, ...).

The loop writes run folders; tasks and tools read them through this module, so neither needs
the loop (DESIGN.md: tasks never import the loop).
"""
import json
import os

import ml_collections

from data import tokenizer_io
from data.errors import DataError
from models import lora
from train import checkpoint, pretrained as hf_io, step as step_lib, tasks
from train.errors import CheckpointMismatchError, ConfigError


def read_run_config(workdir: str, how_to_make_one: str):
    """The ConfigDict saved in a run folder's config.json; a folder without one is a DataError
    ending with `how_to_make_one`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise DataError(f"{workdir} is not a run folder (no config.json); {how_to_make_one}")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, families=None, average=None):
    """(config, tokenizer, params, task) of a trained run folder, restored read-only.

    `families` (e.g. ("bert",)) refuses runs of another model family with a clear error;
    `average` is restore_params's (default: the run's config.average_checkpoints).
    """
    config = read_run_config(workdir, "train one first with python -m train.main "
                                      "--config=experiments/<file>.py:tiny --workdir=...")
    family = config.model.get("family", "gpt")
    if families and family not in families:
        raise DataError(f"{workdir} holds a {family} run; this tool needs a "
                        f"{' or '.join(families)} run folder")
    tokenizer = tokenizer_io.load_run_tokenizer(workdir)
    task = tasks.get(config.task)
    params, _ = restore_params(config, workdir, task, average=average)
    return config, tokenizer, params, task


def restore_params(config, workdir: str, task: tasks.Task, average=None, merge_lora=False):
    """(params, step) of the newest intact checkpoint in `workdir`, on the local devices.

    With `average` (default: the run's config.average_checkpoints) above 1, the params are
    the mean of the last `average` checkpoints, as at the end of its training. A LoRA run
    gives its adapters over its base's weights, or with `merge_lora` the merged weights
    (what a model with lora_rank=0 takes: a run fine-tuned from it).
    """
    ckpt = checkpoint.Checkpointer(workdir, async_save=False, read_only=True)
    if ckpt.latest_step() is None:
        raise CheckpointMismatchError(
            f"no checkpoint in {ckpt.directory}; train first with "
            f"python -m train.main --config=... --workdir={workdir}")
    s = step_lib.build(task, config, mesh_config={"data": -1})
    average = config.get("average_checkpoints", 0) if average is None else average
    if average > 1:  # the mean reads the latest checkpoint too: no separate restore
        params, steps = ckpt.average_params(s.abstract, average)
        step = steps[-1]
    else:
        state, _ = ckpt.restore(s.abstract)
        params, step = state.params, int(state.step)
    ckpt.close()
    if s.abstract.frozen is not None:  # LoRA: the adapters over the base run's weights
        base = load_base_params(config, task, s)
        missing = set(s.abstract.frozen) - set(base)
        if missing:
            raise CheckpointMismatchError(
                f"the base weights of {workdir} (config.init_from={config.init_from}) lack "
                f"{sorted(missing)}; the base run must hold every frozen parameter")
        params = step_lib.full_params(params, base)
        if merge_lora:
            params = lora.merge(params, config.model.lora_alpha, config.model.lora_rank)
    return params, step


def load_base_params(config, task, s, hf_report=None, log=False) -> dict:
    """The parameters config.init_from gives (an hf:DIR folder or a run folder), placed on the
    mesh of Setup `s`: those that replace fresh ones, or with LoRA the frozen base. {} when
    init_from is empty."""
    hf_dir = hf_io.hf_folder(config.get("init_from", ""))
    shardings = s.state_shardings.params if s.abstract.frozen is None else s.state_shardings.frozen
    if hf_dir:
        hf_report = hf_report or hf_io.check(config, s.base_params)
        params = hf_io.load_params(config, s.base_params, shardings, hf_report)
        if log:
            print(f"initialised from {hf_dir}" + (f"; freshly initialised: {hf_report['fresh']}"
                                                  if hf_report["fresh"] else ""))
        return params
    if not config.get("init_from"):
        return {}
    if task.load_pretrained is None:
        raise ConfigError(f"task {task.name} cannot start from config.init_from; leave it empty")
    # Fine-tuning starts from pretrained weights (placed on this mesh) and fresh heads.
    return task.load_pretrained(config, shardings)
