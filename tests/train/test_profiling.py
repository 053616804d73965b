"""The profiler trace of a step range, and the compilation cache a restarted run reads."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import smoke_config
from train import errors, loop, profiling, tasks

lm = tasks.get("lm")
ROOT = pathlib.Path(__file__).resolve().parents[2]
SHORT = {"num_train_steps": 4, "log_every_steps": 1, "eval_every_steps": 4,
         "checkpoint_every_steps": 100}


def _train_losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"]) for m in map(json.loads, lines) if m["split"] == "train"]


def test_profile_steps_write_a_trace_and_leave_the_losses_alone(corpus_file, tmp_path):
    loop.train_and_evaluate(smoke_config(corpus_file, **SHORT), str(tmp_path / "plain"), lm)
    traced = smoke_config(corpus_file, profile_steps="2-3", **SHORT)
    loop.train_and_evaluate(traced, str(tmp_path / "traced"), lm)
    assert _train_losses(tmp_path / "traced") == _train_losses(tmp_path / "plain")
    files = [p.name for p in (tmp_path / "traced" / profiling.PROFILE_DIR).rglob("*")]
    assert any(name.endswith(".xplane.pb") for name in files), files  # TensorBoard
    assert any(name.endswith(".trace.json.gz") for name in files), files  # Perfetto
    assert not (tmp_path / "plain" / profiling.PROFILE_DIR).exists()


@pytest.mark.parametrize("spec,steps", [("", None), ("5", (5, 5)), ("2-4", (2, 4)),
                                        (" 3-3 ", (3, 3))])
def test_profile_step_ranges(spec, steps):
    assert profiling.parse_steps(spec) == steps


@pytest.mark.parametrize("spec", ["0", "4-2", "a-b", "3-", "1:4", "-2"])
def test_bad_profile_step_ranges_are_one_config_error(spec):
    with pytest.raises(errors.ConfigError, match="--config.profile_steps=FIRST-LAST"):
        profiling.parse_steps(spec)


def _entries(cache):
    return sorted(name for name in os.listdir(cache) if name.endswith("-cache"))


def test_a_resumed_run_adds_no_compilation_cache_entries(corpus_file, tmp_path):
    """A preempted run restarted: every program comes from the run's compilation cache."""
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE",
                                                                    "JAX_PERSISTENT_CACHE"))}
    args = [sys.executable, "-m", "train.main", "--config=experiments/gpt.py:smoke",
            f"--workdir={tmp_path / 'run'}", f"--config.data.source={corpus_file}",
            f"--config.compilation_cache_dir={cache}", "--config.num_train_steps=4",
            "--config.eval_every_steps=2", "--config.checkpoint_every_steps=100"]
    for stop in ("--config.stop_at_step=2", "--config.stop_at_step=0"):
        proc = subprocess.run(args + [stop], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if stop.endswith("=2"):
            first = _entries(cache)
            assert "stopped early" in proc.stdout + proc.stderr
    assert len(first) >= 3, first  # init, the train step, the eval step at least
    assert _entries(cache) == first
    assert [s for s, _ in _train_losses(tmp_path / "run")][-1] == 4


def test_a_cache_folder_that_cannot_be_made_is_one_config_error(tmp_path):
    import jax
    blocker = tmp_path / "file"
    blocker.write_text("")
    session_cache = jax.config.jax_compilation_cache_dir  # the tests' own (tests/conftest.py)
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        with pytest.raises(errors.ConfigError,
                           match="compilation_cache_dir=.*cannot be made.*pass a folder"):
            profiling.use_compilation_cache(str(blocker / "xla"))
    finally:
        jax.config.update("jax_compilation_cache_dir", session_cache)
