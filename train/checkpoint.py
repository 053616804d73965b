"""Orbax checkpoints of the train state together with the data-iterator position.

One `CheckpointManager` per run folder (workdir/checkpoints): asynchronous saves every N steps
and at the end, the last K kept, restore into an abstract *sharded* state so a run saved on one
device count resumes on another. The grain iterator state is saved as JSON beside the arrays,
so a resumed run sees exactly the batches it would have seen.
"""
import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state this config builds."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with 'state' and 'data' items."""

    def __init__(self, workdir: str, *, save_every_steps: int = 1, keep: int = 1,
                 async_save=True, read_only=False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.save_every_steps = max(int(save_every_steps), 1)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every_steps, max_to_keep=keep,
            enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def latest_step(self):
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force=False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it saved."""
        if not force and step % self.save_every_steps:
            return False  # (Orbax alone would also save the first step of every new run)
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

    def restore(self, abstract_state, step=None):
        """(state, data_state) of `step` (default latest), placed as `abstract_state` says.

        `abstract_state` holds jax.ShapeDtypeStruct leaves with shardings; a shape mismatch
        means the run folder belongs to a different model and is reported as such.
        """
        step = self.latest_step() if step is None else step
        _check_shapes(self._manager.item_metadata(step)["state"], abstract_state, self.directory)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def average_params(self, abstract_state, last_n: int):
        """(mean params of the last `last_n` checkpoints, their steps): checkpoint averaging.

        Vaswani et al. 2017 (sec. 6.1) average the last 5 (base) or 20 (big) checkpoints,
        written at 10-minute intervals. The sum runs in fp32, one checkpoint at a time, so
        memory holds two copies of the parameters, not `last_n`.
        """
        steps = sorted(self._manager.all_steps())[-last_n:]
        if not steps:
            raise CheckpointMismatchError(f"no checkpoint in {self.directory} to average")
        total = None
        for step in steps:
            state, _ = self.restore(abstract_state, step)
            params = jax.tree.map(lambda x: x.astype(jnp.float32), state.params)
            total = params if total is None else jax.tree.map(jnp.add, total, params)
        mean = jax.tree.map(lambda t, a: (t / len(steps)).astype(a.dtype), total,
                            abstract_state.params)
        return mean, steps

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def _path_names(path):
    """A tree path as plain names, so attribute, dict and index keys compare equal."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _check_shapes(saved_metadata, abstract_state, directory):
    """Compares saved array shapes against the expected ones before touching any data."""
    saved = {_path_names(k): tuple(v.shape)
             for k, v in jax.tree_util.tree_leaves_with_path(saved_metadata)
             if hasattr(v, "shape")}
    expected = {_path_names(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_leaves_with_path(abstract_state)}
    diffs = [f"{k}: checkpoint {saved.get(k, 'missing')} vs config {shape}"
             for k, shape in expected.items() if saved.get(k) != shape]
    diffs += [f"{k}: in checkpoint only" for k in saved if k not in expected]
    if diffs:
        shown = "; ".join(diffs[:3]) + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")
        raise CheckpointMismatchError(
            f"the checkpoint in {directory} was saved from a different model shape ({shown}). "
            "Use a new --workdir for this config, or restore the config of that run; "
            "the existing checkpoint was left untouched.")


def check_resume_config(config, workdir):
    """Refuses to resume a run folder whose saved model/data config differs from this one."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    current = json.loads(config.to_json())
    # Where the corpus is cached and what the backward pass recomputes (model.remat: same
    # parameters, same numbers) do not change the run.
    ignored = {"cache_dir", "remat"}
    diffs = [f"{section}.{k}: saved {saved.get(section, {}).get(k)!r} vs now {v!r}"
             for section in ("model", "data") for k, v in current[section].items()
             if section in saved and k not in ignored and saved[section].get(k) != v]
    if diffs:
        raise CheckpointMismatchError(
            f"{workdir} holds a run with a different config ({'; '.join(diffs[:4])}). "
            "Use a new --workdir, or rerun with the saved values; nothing was overwritten.")
