"""A Hugging Face model folder to a run folder and back (experiments.hf --import_from /
--export_to): the tensors go through train/pretrained.py, the tokenizer through
data/tokenizer_io.py, and every write goes into a temporary sibling folder renamed at the end,
so a refusal or a crash leaves nothing half-written.
"""
import json
import os
import shutil
import tempfile

import flax.linen as nn
import jax
from safetensors.numpy import save_file

from data import hf_tokenizer, tokenizer_io
from data.errors import DataError
from models import hf, lora
from models.hf import UnsupportedCheckpoint
from train import checkpoint, config as config_lib, pretrained, runs, step as step_lib, tasks
from train.errors import ConfigError


def new_folder(path: str) -> str:
    """A temporary sibling of `path`, refusing a `path` that already holds files."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise DataError(f"{path} already exists and is not empty; pass a new folder (nothing "
                        "already saved is overwritten)")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".tmp")


def commit_folder(tmp: str, path: str) -> None:
    """Renames the finished temporary folder `tmp` to `path` (empty or absent)."""
    if os.path.isdir(path):
        os.rmdir(path)  # empty (checked by new_folder)
    os.replace(tmp, path)


def import_run(directory: str, workdir: str, config) -> dict:
    """Turns a Hugging Face folder into a run folder at `workdir`: config.json, the
    tokenizer, and a step-0 checkpoint that every tool reads and train.main resumes.

    Everything is checked first and written into a temporary sibling that is renamed at the
    end, so a bad folder leaves nothing behind. Returns check()'s report.
    """
    if config.model.get("lora_rank", 0):
        raise ConfigError(
            "an import writes the checkpoint's own weights; leave config.model.lora_rank at 0 "
            "(add adapters when fine-tuning the run)")
    config.init_from = pretrained.PREFIX + os.path.abspath(directory)
    pretrained.configure(config)
    config_lib.validate(config)
    task = tasks.get(config.task)
    s = step_lib.build(task, config)
    report = pretrained.check(config, s.abstract.params)
    tokenizer = hf_tokenizer.load_hf_tokenizer(directory)
    tmp = new_folder(workdir)
    try:
        with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
            state = s.init_fn(jax.random.key(config.seed))
            params = pretrained.load_params(config, s.abstract.params, s.state_shardings.params,
                                            report)
            state = state.replace(params={**state.params, **params})
        ckpt = checkpoint.Checkpointer(tmp, async_save=False)
        ckpt.save(0, state, {"next_index": 0}, force=True)
        ckpt.close()
        tokenizer.save(tmp)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2))
        # No steps yet: experiments.compare lists the run, training appends to it.
        open(os.path.join(tmp, "metrics.jsonl"), "w", encoding="utf-8").close()
        commit_folder(tmp, workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def export_run(workdir: str, out_dir: str) -> dict:
    """Writes the run in `workdir` (trained here or imported) as a Hugging Face folder:
    model.safetensors, config.json and the tokenizer. Returns the config.json written."""
    config, tokenizer, params, task = runs.load_run(workdir)
    if config.model.get("lora_rank", 0):  # a LoRA run exports as its merged weights
        params = lora.merge(params, config.model.lora_alpha, config.model.lora_rank)
        config.model.lora_rank = 0
    family = config.model.get("family", "gpt")
    model = task.build_model(config)
    logical = nn.get_partition_spec(jax.eval_shape(
        lambda: task.init_params(model, config, jax.random.key(0))))
    tensors = pretrained.export_tensors(config, params, logical)
    special = {k: getattr(tokenizer, k, None) for k in ("pad_id", "bos_id", "eos_id")}
    heads = tuple(config.model.get("heads", ()))
    try:
        hf_cfg = hf.hf_config(family, config.model.to_dict(), special, heads=heads)
    except UnsupportedCheckpoint as e:
        raise DataError(f"{workdir}: {e}") from None
    tmp = new_folder(out_dir)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_cfg, f, indent=2)
        tokenizer_io.export_hf(tokenizer, tmp, family)
        commit_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_cfg
