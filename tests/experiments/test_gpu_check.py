"""The GPU check script's CPU path: it runs end to end and prints its whole table."""
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_prints_every_row():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PY=str(
        ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python3")
    proc = subprocess.run([str(ROOT / "experiments" / "gpu_check.sh"), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    text = "\n".join(rows)
    for needle in ("device", "measured bf16 matmul", "GPT-2 124M", "GPT-2 350M", "BERT-base",
                   "attention=cudnn", "attention=xla", "Transformer-base", "Qwen3-0.6B",
                   "window 256", "decoding GPT-2", "decoding SmolLM2"):
        assert needle in text, needle
    trained = [r for r in rows if "tokens/s" not in r and "%" in r]
    assert len(trained) >= 5  # 124M, 350M, BERT, Qwen3, xla attention (cuDNN fails on a CPU)
    for row in trained:
        tokens_per_s = float(row.split("|")[2].replace(",", ""))
        assert tokens_per_s > 0
