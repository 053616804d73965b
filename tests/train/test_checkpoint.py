"""Damaged checkpoints: detected by checksum, skipped for the newest intact one, never deleted."""
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from tests.conftest import smoke_config, tree_digest
from train import checkpoint, errors, loop, runs, tasks

lm = tasks.get("lm")
RUN = {"num_train_steps": 30, "checkpoint_every_steps": 10, "keep_checkpoints": 3,
       "eval_every_steps": 30}


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory):
    """A run folder with checkpoints 10, 20, 30, and the params of each step."""
    workdir = tmp_path_factory.mktemp("ckpt") / "run"
    config = smoke_config(corpus_file, **RUN)
    loop.train_and_evaluate(config, str(workdir), lm)
    return config, workdir


def _params_at(config, workdir, step):
    """Params of one step, read directly (no fallback)."""
    from train import step as step_lib
    s = step_lib.build(lm, config, mesh_config={"data": -1})
    ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
    state, _ = ckpt.restore(s.abstract, step=step)
    ckpt.close()
    return jax.device_get(state.params)


def _copy(workdir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(workdir, target)
    return target


def _largest_chunk(step_dir):
    files = [p for p in pathlib.Path(step_dir).rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _garble(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_every_finished_save_records_checksums_that_match(trained):
    _, workdir = trained
    for step in (10, 20, 30):
        step_dir = workdir / "checkpoints" / str(step)
        sums = json.loads((step_dir / checkpoint.CHECKSUMS_FILE).read_text())
        assert "state/_METADATA" in sums and "data/metadata" in sums
        assert checkpoint.find_damage(str(step_dir)) is None


@pytest.mark.parametrize("damage", ["garbled array chunk", "truncated array chunk",
                                    "truncated metadata", "garbled iterator state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(
        trained, tmp_path, capfd, damage):
    config, workdir = trained
    run = _copy(workdir, tmp_path)
    step_dir = run / "checkpoints" / "30"
    target = {"garbled array chunk": _largest_chunk(step_dir),
              "truncated array chunk": _largest_chunk(step_dir),
              "truncated metadata": step_dir / "state" / "_METADATA",
              "garbled iterator state": step_dir / "data" / "metadata"}[damage]
    (_truncate if "truncated" in damage else _garble)(target)
    before = tree_digest(run)
    params, step = runs.restore_params(config, str(run), lm)  # read-only: tools
    assert step == 20
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 _params_at(config, workdir, 20))
    err = capfd.readouterr().err
    assert "checkpoint step 30" in err and "damaged" in err and "left it in place" in err
    assert str(target.relative_to(step_dir)) in err
    assert tree_digest(run) == before  # a read-only restore touches nothing


def test_resuming_moves_the_damaged_checkpoint_aside_and_trains_on(trained, tmp_path, capfd,
                                                                   corpus_file):
    config, workdir = trained
    run = _copy(workdir, tmp_path)
    _garble(_largest_chunk(run / "checkpoints" / "30"))
    damaged = tree_digest(run / "checkpoints" / "30")
    longer = smoke_config(corpus_file, **{**RUN, "num_train_steps": 40})
    loop.train_and_evaluate(longer, str(run), lm)
    err = capfd.readouterr().err
    assert "checkpoint step 30" in err and "moved it to" in err
    moved = run / checkpoint.DAMAGED_DIR / "30"
    assert tree_digest(moved) == damaged  # kept byte for byte
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in records if r["split"] == "train"][-4:]
    assert resumed == [25, 30, 35, 40]  # steps 21-30 trained again, then on to 40
    assert sorted(int(d) for d in os.listdir(run / "checkpoints")) == [20, 30, 40]


def test_no_intact_checkpoint_is_a_clean_refusal_that_deletes_nothing(trained, tmp_path):
    config, workdir = trained
    run = _copy(workdir, tmp_path)
    for step in (10, 20, 30):
        _truncate(run / "checkpoints" / str(step) / "state" / "_METADATA")
    before = tree_digest(run)
    with pytest.raises(errors.DamagedCheckpointError,
                       match=r"no intact checkpoint.*step 30: .*step 20: .*step 10: .*Nothing "
                             r"was moved or deleted"):
        loop.train_and_evaluate(config, str(run), lm)
    assert tree_digest(run) == before


def test_cpu_saves_skip_replica_parallel_slicing(tmp_path):
    """On CPU the arrays are written without per-replica slicing (train/checkpoint.py
    _cpu_array_handler); the saved state still restores bit for bit on another mesh
    (the resume tests above)."""
    import orbax.checkpoint as ocp
    checkpoint.Checkpointer(str(tmp_path), async_save=False).close()
    assert jax.default_backend() == "cpu"
    assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
