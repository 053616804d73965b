"""Merges a LoRA run's adapters into its base weights and writes a plain run folder.

  python -m experiments.merge_lora --workdir=runs/gpt_sft_lora --out=runs/gpt_sft_merged

A LoRA run's checkpoints hold only the adapters and point at their base run
(config.init_from); the merged run holds every weight, W + (alpha / rank) A B for each adapted
matrix, with config.model.lora_rank=0, so it no longer needs the base run. Its outputs equal
the LoRA run's (to float rounding), and every tool reads it: sample, chat, the Hugging Face
export, or train.main to train further. The new folder is written whole or not at all.
"""
import os
import shutil

import flax.linen as nn
import jax
from absl import flags, logging

from data.errors import DataError
from models import lora
from train import checkpoint, cli, errors, hf_runs, runs, step as step_lib

flags.DEFINE_string("workdir", None, "A run trained with --config.model.lora_rank > 0.",
                    required=True)
flags.DEFINE_string("out", None, "A new folder for the merged run.", required=True)
FLAGS = flags.FLAGS


def merge_run(workdir: str, out: str) -> dict:
    """Writes the merged run of `workdir` into `out`; returns its config."""
    config, tokenizer, params, task = runs.load_run(workdir)
    if not config.model.get("lora_rank", 0):
        raise DataError(f"{workdir} has no LoRA adapters (config.model.lora_rank=0): it is a "
                        "plain run already")
    merged = lora.merge(params, config.model.lora_alpha, config.model.lora_rank)
    config.model.lora_rank = 0
    config.init_from = ""  # every weight is here now; training it further needs no base
    ckpt = checkpoint.Checkpointer(workdir, async_save=False, read_only=True)
    step = ckpt.latest_step()
    data_state = ckpt.data_state(step)
    ckpt.close()
    s = step_lib.build(task, config, mesh_config={"data": -1})
    tmp = hf_runs.new_folder(out)
    try:
        with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
            merged = jax.device_put(merged, s.state_shardings.params)
            state = step_lib.TrainState(jax.numpy.asarray(step, jax.numpy.int32), merged,
                                        jax.jit(s.tx.init)(merged))
        target = checkpoint.Checkpointer(tmp, async_save=False)
        target.save(step, state, data_state, force=True)
        target.close()
        tokenizer.save(tmp)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2))
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):  # the history, for compare
            shutil.copy(os.path.join(workdir, "metrics.jsonl"), tmp)
        hf_runs.commit_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    try:
        merge_run(FLAGS.workdir, FLAGS.out)
    except (DataError, errors.CheckpointMismatchError) as e:
        cli.fail(str(e))
    print(f"wrote {FLAGS.out}: the adapters of {FLAGS.workdir} merged into its base weights")


if __name__ == "__main__":
    cli.run(main)
