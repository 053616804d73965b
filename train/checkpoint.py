"""Orbax checkpoints of the train state together with the data-iterator position.

One `CheckpointManager` per run folder (workdir/checkpoints): asynchronous saves every N steps
and at the end, the last K kept, restore into an abstract *sharded* state so a run saved on one
device count resumes on another. The grain iterator state is saved as JSON beside the arrays,
so a resumed run sees exactly the batches it would have seen.

Damage (a file truncated or garbled by a crash during a copy, a full disk) is detected, not
trusted: once a save has finished, the SHA-256 of every file in it is recorded in the step's
folder (CHECKSUMS_FILE), and a restore first compares them. Orbax keeps chunk data without
checksums, so a garbled array chunk would otherwise load silently as different numbers. A
damaged newest checkpoint is skipped with a warning for the newest intact one; a training run
moves it aside into workdir/damaged_checkpoints/ (never deleted) so it can save that step
again.
"""
import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from train.errors import CheckpointMismatchError, DamagedCheckpointError

CHECKSUMS_FILE = "sha256sums.json"
DAMAGED_DIR = "damaged_checkpoints"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file under a step folder (relative paths, sorted), the checksum file excepted."""
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(f for f in out if f != CHECKSUMS_FILE)


def write_checksums(step_dir: str) -> None:
    """Records the SHA-256 of every file of a finished save (written atomically)."""
    sums = {f: _sha256(os.path.join(step_dir, f)) for f in _files(step_dir)}
    tmp = os.path.join(step_dir, CHECKSUMS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(sums, f, indent=0, sort_keys=True)
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS_FILE))


def find_damage(step_dir: str):
    """A sentence naming what is damaged in a step folder, or None when its files match their
    recorded checksums (or no checksums were recorded: saves older than this check)."""
    path = os.path.join(step_dir, CHECKSUMS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            sums = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return f"its {CHECKSUMS_FILE} is not valid JSON"
    for name, expected in sums.items():
        full = os.path.join(step_dir, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if _sha256(full) != expected:
            return f"{name} differs from what was saved"
    return None


def _cpu_array_handler() -> None:
    """On CPU, jax.Arrays are saved without orbax's replica-parallel writing.

    Replica-parallel saving splits a replicated array into one slice per replica so that
    accelerators share the copy to the host; each slice is a compiled program per shape and
    device. On CPU the arrays already live in host memory, so the slicing only costs time: a
    first save of the smoke GPT on 8 CPU devices took 1.44 s with it and 0.12 s without.
    Orbax turns it off on GPUs itself. The files written are the same either way.
    """
    if jax.default_backend() != "cpu":
        return
    try:  # the registry's default ArrayHandler, but for this one option
        from orbax.checkpoint._src.metadata import array_metadata_store
    except ImportError:  # another orbax layout: keep its default
        return
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(handler, "_use_replica_parallel", False):
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()),
            override=True)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with 'state' and 'data' items."""

    def __init__(self, workdir: str, *, save_every_steps: int = 1, keep: int = 1,
                 async_save=True, read_only=False):
        _cpu_array_handler()
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.damaged_directory = os.path.abspath(os.path.join(workdir, DAMAGED_DIR))
        self.save_every_steps = max(int(save_every_steps), 1)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every_steps, max_to_keep=keep,
            enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})
        self._sealed = set()

    def latest_step(self):
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, force=False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it saved."""
        if not force and step % self.save_every_steps:
            return False  # (Orbax alone would also save the first step of every new run)
        self._seal_finished()
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_saved_part(state)),
            data=ocp.args.JsonSave(data_state)), force=force)

    def _seal_finished(self):
        """Records checksums of every save that has finished (process 0 writes them)."""
        if self.read_only or jax.process_index() != 0 or self._manager.is_saving_in_progress():
            return
        for step in self.all_steps():
            step_dir = os.path.join(self.directory, str(step))
            if step not in self._sealed and os.path.isdir(step_dir):
                if not os.path.exists(os.path.join(step_dir, CHECKSUMS_FILE)):
                    write_checksums(step_dir)
                self._sealed.add(step)

    def _restore_step(self, abstract_state, step):
        """(state, data_state) of one step; DamagedCheckpointError if it cannot be read.
        The state's `frozen` base weights (LoRA) are not in checkpoints: it comes back None."""
        template, abstract_state = abstract_state, _saved_part(abstract_state)
        damage = find_damage(os.path.join(self.directory, str(step)))
        if damage is None:
            try:
                metadata = self._manager.item_metadata(step)["state"]
            except Exception as e:  # pylint: disable=broad-except
                damage = f"its metadata cannot be read: {_one_line(e)}"
        if damage is None:
            _check_shapes(metadata, abstract_state, self.directory)  # a different model: raise
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
                state = restored["state"]
                if template is not abstract_state:  # back into a TrainState, frozen None
                    state = template.replace(frozen=None, **state)
                return state, restored["data"]
            except Exception as e:  # pylint: disable=broad-except
                damage = f"it cannot be read: {_one_line(e)}"
        raise DamagedCheckpointError(damage)

    def restore(self, abstract_state, step=None):
        """(state, data_state) of `step`, or of the newest intact checkpoint when step is None.

        `abstract_state` holds jax.ShapeDtypeStruct leaves with shardings; a shape mismatch
        means the run folder belongs to a different model and is reported as such. Damaged
        checkpoints are skipped with a warning naming them (and moved aside when writable).
        """
        steps = [step] if step is not None else self.all_steps()[::-1]
        damaged = []
        for candidate in steps:
            try:
                restored = self._restore_step(abstract_state, candidate)
            except DamagedCheckpointError as e:
                damaged.append((candidate, str(e)))
                continue
            moved = self._move_aside([s for s, _ in damaged])
            for (bad, reason), target in zip(damaged, moved):
                print(f"warning: checkpoint step {bad} in {self.directory} is damaged ({reason}); "
                      f"{'moved it to ' + target if target else 'left it in place'} and "
                      f"restored step {candidate}, the newest intact one", file=sys.stderr)
            return restored
        shown = "; ".join(f"step {s}: {r}" for s, r in damaged) or "none saved"
        raise DamagedCheckpointError(
            f"no intact checkpoint in {self.directory} ({shown}). Nothing was moved or "
            "deleted: restore the folder from a copy, or start afresh with a new --workdir.")

    def data_state(self, step: int) -> dict:
        """The data iterator position saved with `step`."""
        return self._manager.restore(step, args=ocp.args.Composite(
            data=ocp.args.JsonRestore()))["data"]

    def _move_aside(self, steps) -> list:
        """Moves damaged step folders out of Orbax's directory (kept, never deleted), so the
        resumed run can save those steps again; returns where each went (None: read-only)."""
        if self.read_only or not steps:
            return [None] * len(steps)
        targets = []
        for step in steps:
            target, n = os.path.join(self.damaged_directory, str(step)), 1
            while os.path.exists(target):
                target, n = os.path.join(self.damaged_directory, f"{step}.{n}"), n + 1
            targets.append(target)
        if jax.process_index() == 0:
            os.makedirs(self.damaged_directory, exist_ok=True)
            for step, target in zip(steps, targets):
                os.replace(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("moved damaged checkpoints")
        self._manager.reload()
        return targets

    def average_params(self, abstract_state, last_n: int):
        """(mean params of the last `last_n` intact checkpoints, their steps).

        Vaswani et al. 2017 (sec. 6.1) average the last 5 (base) or 20 (big) checkpoints,
        written at 10-minute intervals. The sum runs in fp32, one checkpoint at a time, so
        memory holds two copies of the parameters, not `last_n`. A damaged checkpoint is left
        out with a warning.
        """
        total, steps = None, []
        for step in self.all_steps()[::-1]:
            if len(steps) == last_n:
                break
            try:
                state, _ = self._restore_step(abstract_state, step)
            except DamagedCheckpointError as e:
                print(f"warning: checkpoint step {step} in {self.directory} is damaged ({e}); "
                      "it is left out of the average", file=sys.stderr)
                continue
            params = jax.tree.map(lambda x: x.astype(jnp.float32), state.params)
            total = params if total is None else jax.tree.map(jnp.add, total, params)
            steps.insert(0, step)
        if not steps:
            raise DamagedCheckpointError(f"no intact checkpoint in {self.directory} to average")
        mean = jax.tree.map(lambda t, a: (t / len(steps)).astype(a.dtype), total,
                            abstract_state.params)
        return mean, steps

    def wait(self):
        self._manager.wait_until_finished()
        self._seal_finished()

    def close(self):
        self.wait()
        self._manager.close()


def _saved_part(state):
    """What a checkpoint holds of a train state: step, params and opt_state, as a dict (the
    layout of every checkpoint written so far). LoRA's frozen base weights stay in the base
    run (config.init_from) and are loaded from there. A task's `extra` state is saved when it
    has one."""
    if hasattr(state, "opt_state") and hasattr(state, "frozen"):
        saved = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        if getattr(state, "extra", None) is not None:
            saved["extra"] = state.extra
        return saved
    return state


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


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


# What a resumed run must share with the saved one: the model's shape and the data pipeline
# (the data section, the global batch size and the seed decide which rows step N reads).
# Where the corpus is cached and what the backward pass recomputes (model.remat) change
# neither. Keys the saved config lacks were added to the codebase after it was written and
# keep their defaults, so they are not differences either.
_RESUME_SECTIONS = ("model", "data")
_RESUME_KEYS = ("task", "seed", "batch_size")
_IGNORED = {"cache_dir", "remat"}
# Where it runs and when it stops on purpose: not worth a note when they change.
_FREE = ("mesh", "sharding_rules", "stop_at_step")


def _differences(saved: dict, current: dict, prefix=""):
    """[(dotted key, saved value, current value)] for the keys present in both."""
    out = []
    for key, value in current.items():
        if key not in saved or key in _IGNORED:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            out += _differences(saved[key], value, f"{prefix}{key}.")
        elif saved[key] != value:
            out.append((f"{prefix}{key}", saved[key], value))
    return out


def check_resume_config(config, workdir) -> list[str]:
    """Refuses to resume a run folder whose saved model/data/batch config differs from this one.

    Returns notes on the settings that may change on resume and did (the optimizer, the step
    count, micro-batching: opt.grad_accum_steps splits the same batch differently and gives
    the same update), for the log.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    with open(path, encoding="utf-8") as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointMismatchError(
                f"{path} is damaged (not JSON: {e.msg}, line {e.lineno}); restore it from a "
                "copy, or use a new --workdir. Nothing was overwritten.") from None
    current = json.loads(config.to_json())
    # A LoRA run's base weights are reloaded from init_from at every start: a new one would
    # put the saved adapters over other weights.
    keys = _RESUME_KEYS + (("init_from",) if current.get("model", {}).get("lora_rank") else ())
    fixed = {**{s: current[s] for s in _RESUME_SECTIONS if s in current},
             **{k: current[k] for k in keys if k in current}}
    diffs = _differences(saved, fixed)
    if diffs:
        shown = "; ".join(f"{k}: saved {a!r} vs now {b!r}" for k, a, b in diffs[:4])
        raise CheckpointMismatchError(
            f"{workdir} holds a run with a different config ({shown}); resuming would not "
            "continue the same run. Use a new --workdir, or rerun with the saved values; "
            "nothing was overwritten.")
    changed = _differences(saved, {k: v for k, v in current.items()
                                   if k not in _RESUME_SECTIONS + _RESUME_KEYS + _FREE})
    return [f"{k} {a!r} -> {b!r}" for k, a, b in changed]
