"""One table of what a GPU session should measure: MFU, flash attention, decoding, memory.

  experiments/gpu_check.sh            # on a GPU machine, about 5-8 minutes
  experiments/gpu_check.sh --smoke    # tiny shapes: checks the script itself on a CPU

Rows: the device; its measured bf16 matmul peak; training (bf16 compute, fp32 master weights,
AdamW) of GPT-2 124M and 350M at seq 1024 and BERT-base at seq 512, each with tokens/s, MFU
against the data-sheet bf16 peak and against the measured peak, compile time and peak device
memory; Qwen3-0.6B (the Llama family: GQA, q/k norms, SwiGLU); GPT-2 350M with cuDNN flash
attention forced on and off, and SmolLM2-135M with a 256-token sliding window through cuDNN;
greedy decoding tokens/s with the KV cache, GPT-2 124M and SmolLM2-135M. Transformer-base
(64 + 64 tokens) runs at a fixed batch of 256 rather than a searched largest batch.
"""
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import bench
from experiments import bert as bert_experiment
from experiments import gpt as gpt_experiment
from experiments import llama as llama_experiment
from experiments import transformer as transformer_experiment
from train import metrics as metrics_lib

flags.DEFINE_bool("smoke", False, "Tiny shapes and few steps (checks the script on CPU).")
FLAGS = flags.FLAGS

# name, experiment, preset, seq, batch (per step, all devices)
CASES = (
    ("GPT-2 124M", gpt_experiment, "gpt2", 1024, 16),
    ("GPT-2 350M", gpt_experiment, "gpt2_medium", 1024, 8),
    ("BERT-base", bert_experiment, "base", 512, 32),
    # Not a searched "largest batch that fits": 256 pairs of 64 + 64 tokens is about 15 GiB
    # of activations in bf16, well inside an 80 GB card.
    ("Transformer-base 64/64", transformer_experiment, "transformer_bench_base", 64, 256),
    ("Qwen3-0.6B", llama_experiment, "qwen3_0_6b", 1024, 8),
)


def _config(experiment, preset, seq, batch, attention="fast"):
    config = experiment.get_config("smoke" if FLAGS.smoke else preset)
    if not FLAGS.smoke:
        config.data.max_len, config.batch_size = seq, batch
        config.model.dtype = "bfloat16"
    config.model.dropout_rate = 0.0
    if "attention_dropout_rate" in config.model:
        config.model.attention_dropout_rate = 0.0
    config.model.attention = attention
    return config


def _peak_memory():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return f"{peak / 2 ** 30:.1f} GiB" if peak else "-"


def _train_row(name, config, sheet_peak, measured_peak):
    try:
        tps, mfu_sheet, compile_s = bench.bench_training(config, sheet_peak, verbose=False)
    except Exception as e:  # one failing case (e.g. cuDNN unavailable) must not hide the rest
        return f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |"
    mfu_measured = mfu_sheet * sheet_peak / measured_peak
    return (f"| {name} | {tps:,.0f} | {100 * mfu_sheet:.1f}% | {100 * mfu_measured:.1f}% | "
            f"{compile_s:.0f}s | {_peak_memory()} |")


def main(argv):
    del argv
    FLAGS.steps, FLAGS.warmup = (2, 1) if FLAGS.smoke else (10, 2)
    FLAGS.prompt_len, FLAGS.new_tokens = (8, 8) if FLAGS.smoke else (32, 128)
    t0 = time.time()
    device = jax.devices()[0]
    sheet_peak, source = metrics_lib.peak_flops()
    measured = metrics_lib.measure_matmul_flops(
        1024 if FLAGS.smoke else 8192, dtype=jnp.bfloat16) * jax.device_count()
    print(f"| check | value | | | | |\n|---|---|---|---|---|---|\n"
          f"| device | {device.device_kind} x{jax.device_count()} ({jax.__version__}) | | | | |\n"
          f"| peak, {source} | {sheet_peak / 1e12:.1f} TFLOP/s | | | | |\n"
          f"| peak, measured bf16 matmul | {measured / 1e12:.1f} TFLOP/s | | | | |")
    print("| training (bf16, AdamW) | tokens/s | MFU data sheet | MFU measured | compile | "
          "peak memory |")
    for name, experiment, preset, seq, batch in CASES:
        config = _config(experiment, preset, seq, batch)
        label = f"{name}, seq {config.data.max_len}, batch {config.batch_size}"
        print(_train_row(label, config, sheet_peak, measured), flush=True)
    for attention in ("cudnn", "xla"):
        config = _config(gpt_experiment, "gpt2_medium", 1024, 8, attention)
        print(_train_row(f"GPT-2 350M, attention={attention}", config, sheet_peak, measured),
              flush=True)
    config = _config(llama_experiment, "smollm2_135m", 1024, 8, "cudnn")
    config.model.sliding_window = 256
    print(_train_row("SmolLM2-135M, window 256, attention=cudnn", config, sheet_peak, measured),
          flush=True)
    for name, experiment, preset in (("GPT-2 124M", gpt_experiment, "gpt2"),
                                     ("SmolLM2-135M", llama_experiment, "smollm2_135m")):
        config = _config(experiment, preset, 1024, 1)
        rates = [bench.bench_generation(config, b, temperature=0.0) for b in (1, 8)]
        print(f"| decoding {name}, greedy, {FLAGS.prompt_len}+{FLAGS.new_tokens} tokens | "
              f"batch 1: {rates[0]:,.0f} tok/s | batch 8: {rates[1]:,.0f} tok/s | | | |")
    print(f"(gpu_check took {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    app.run(main)
