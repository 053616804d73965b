"""The benchmark tool end to end at the smoke shape: training timed with the CPU memory
setting, generation timed in a child process without it (train/host.py)."""
import os
import subprocess
import sys

from tests.experiments.test_gpu_check import ROOT


def test_bench_times_training_then_generation_in_a_child_process():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("KEEP_FREED_MEMORY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--config=experiments/gpt.py:smoke",
         "--steps=2", "--warmup=1", "--prompt_len=4", "--new_tokens=4", "--mesh=cpu_devices=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    train = [line for line in lines if line.startswith("train: ")]
    generate = [line for line in lines if line.startswith("generate (")]
    assert len(train) == 1 and float(train[0].split()[1].replace(",", "")) > 0
    # One device line, with the two CPU devices asked for: the child process for generation
    # does not time training again.
    devices = [line for line in lines if line.startswith("device: ")]
    assert len(devices) == 1 and devices[0].startswith("device: cpu x2")
    assert [g.split(",")[0] for g in generate] == ["generate (greedy", "generate (top-k 40"]
    assert lines.index(train[0]) < lines.index(generate[0])

