"""Multi-host training through jax.distributed: two CPU processes against one.

Two processes with 2 devices each must train exactly like one process with 4 devices (same
global batches, same losses), and a single process must resume their run folder.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from train import multihost

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = ["--config.num_train_steps=6", "--config.log_every_steps=1",
         "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3"]


def command(workdir, corpus, *extra):
    return [sys.executable, "-m", "train.main", "--config=experiments/gpt.py:smoke",
            f"--workdir={workdir}", f"--config.data.source={corpus}", *extra]


def cpu_env(num_devices):
    # Replaces (not extends) the XLA_FLAGS that conftest set for this pytest process.
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")


def run_processes(commands, env, logs, timeout=240):
    """Starts every command at once and waits for all; kills them all if one fails."""
    procs = []
    try:
        for cmd, log in zip(commands, logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
        for proc, log in zip(procs, logs):
            if proc.wait(timeout=timeout) != 0:
                raise AssertionError(f"{log} exited {proc.returncode}:\n"
                                     f"{pathlib.Path(log).read_text()[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def losses(workdir, split="train"):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == split}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_and_one_resumes(corpus_file, tmp_path):
    port = free_port()
    two = [command(tmp_path / "two", corpus_file, *STEPS, f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}") for i in range(2)]
    run_processes(two, cpu_env(2), [tmp_path / f"process{i}.log" for i in range(2)])
    run_processes([command(tmp_path / "one", corpus_file, *STEPS)], cpu_env(4),
                  [tmp_path / "one.log"])

    two_losses, one_losses = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert list(two_losses) == [1, 2, 3, 4, 5, 6]  # one writer: every step logged once
    # Same global batches, so the same losses up to the order of the cross-device sums.
    assert list(two_losses.values()) == pytest.approx(list(one_losses.values()), rel=1e-5)
    assert list(losses(tmp_path / "two", "eval").values()) == pytest.approx(
        list(losses(tmp_path / "one", "eval").values()), rel=1e-5)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3", "6"]
    log1 = (tmp_path / "process1.log").read_text()
    assert "parameters |" not in log1 and "eval loss" not in log1  # process 0 alone prints

    # The two-process run folder resumes in one process with 4 devices, from step 6.
    run_processes([command(tmp_path / "two", corpus_file, *STEPS,
                           "--config.num_train_steps=8")], cpu_env(4), [tmp_path / "resume.log"])
    assert list(losses(tmp_path / "two")) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "resuming at step 6" in (tmp_path / "resume.log").read_text()


def test_incomplete_multihost_flags_are_one_error_line(tmp_path, corpus_file):
    proc = subprocess.run(command(tmp_path / "run", corpus_file, "--process_id=1"), cwd=ROOT,
                          env=cpu_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--num_processes" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_cluster_detection_reads_slurm_like_jax(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    assert not multihost.launched_as_cluster()  # a plain machine: no initialize()
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert multihost.launched_as_cluster()
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job stays a single process
    assert not multihost.launched_as_cluster()
