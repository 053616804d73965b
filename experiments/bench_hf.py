"""Import time and peak host memory of a Hugging Face folder: ours against transformers.

  python -m experiments.bench_hf --sizes=124m,774m
  python -m experiments.bench_hf --sizes=qwen3_0_6b

For each size a randomly initialised GPT2LMHeadModel (124m, 350m, 774m) or Qwen3ForCausalLM
(qwen3_0_6b, Qwen3-0.6B's shape) is saved once (safetensors, fp32) under --cache_dir; then,
each in a fresh process so the peaks do not mix, (a) our import (train/pretrained.py: header
checks, then every tensor placed on the devices) and (b) transformers'
AutoModelForCausalLM.from_pretrained in torch load it, then read every parameter
once (from_pretrained memory-maps the file, so the weights only come into memory when first
used). The file is read into the page cache first. Reported: wall time and the
growth of the peak resident set (ru_maxrss) over the process's size just before loading,
as a multiple of the weights' size. Needs the test requirements (torch, transformers).
"""
import json
import os
import resource
import subprocess
import sys
import time

from absl import flags

from train import cli

flags.DEFINE_string("sizes", "124m,774m", "Comma-separated sizes: GPT-2's 124m, 350m, 774m; "
                    "qwen3_0_6b.")
flags.DEFINE_string("cache_dir", "/tmp/bench_hf", "Where the random checkpoints are saved.")
flags.DEFINE_integer("repeats", 2, "Timed loads per side (the fastest is reported).")
flags.DEFINE_string("side", "", "Internal: run one measurement (ours | torch) and print JSON.")
flags.DEFINE_string("folder", "", "Internal: the folder to load.")
FLAGS = flags.FLAGS
cli.at_least("repeats", 1)

SHAPES = {"124m": (12, 768, 12), "350m": (24, 1024, 16), "774m": (36, 1280, 20),
          "qwen3_0_6b": None}


def _make_folder(size):
    folder = os.path.join(FLAGS.cache_dir, f"gpt2_{size}" if SHAPES[size] else size)
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers
    torch.manual_seed(0)
    if SHAPES[size] is None:  # Qwen/Qwen3-0.6B's config.json
        config = transformers.Qwen3Config(
            vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            max_position_embeddings=40960, rope_parameters={"rope_type": "default",
                                                            "rope_theta": 1000000.0},
            tie_word_embeddings=True)
        transformers.Qwen3ForCausalLM(config).save_pretrained(folder)
        return folder
    layers, width, heads = SHAPES[size]
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _measure(side, folder):
    """One load in this process: seconds and peak-RSS growth in MiB."""
    if side == "ours":
        import jax
        from experiments import gpt as gpt_exp, llama as llama_exp
        from train import pretrained, step, tasks
        jax.numpy.zeros(1).block_until_ready()  # the backend's own memory, before the base
        llama = "gpt2_" not in os.path.basename(folder)

        def load():
            config = llama_exp.get_config("smoke") if llama else gpt_exp.get_config("gpt2")
            config.init_from = "hf:" + folder
            pretrained.configure(config)
            s = step.build(tasks.get("lm"), config, mesh_config={"data": -1})
            params = pretrained.load_params(config, s.abstract.params, s.state_shardings.params)
            jax.block_until_ready(params)
            return params
    else:
        import torch
        import transformers

        def load():
            # from_pretrained memory-maps the file; summing every parameter reads it in, as
            # the first forward pass would, so both sides end with the weights in memory.
            model = transformers.AutoModelForCausalLM.from_pretrained(folder)
            with torch.no_grad():
                sum(float(p.sum()) for p in model.parameters())
            return model
    base = _current_mib()
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        model = load()
        times.append(time.perf_counter() - start)
        del model
    return {"seconds": min(times), "peak_growth_mib": _peak_mib() - base}


def main(argv):
    if FLAGS.side:
        print(json.dumps(_measure(FLAGS.side, FLAGS.folder)))
        return
    rows = []
    for size in FLAGS.sizes.split(","):
        if size not in SHAPES:
            cli.fail(f"--sizes: unknown size {size!r}; use {sorted(SHAPES)}")
        folder = _make_folder(size)
        weights = os.path.join(folder, "model.safetensors")
        weights_mib = os.path.getsize(weights) / 2 ** 20
        with open(weights, "rb") as f:  # into the page cache: disk speed is not measured
            while f.read(1 << 26):
                pass
        result = {}
        for side in ("ours", "torch"):
            out = subprocess.run([sys.executable, "-m", "experiments.bench_hf", f"--side={side}",
                                  f"--folder={folder}", f"--repeats={FLAGS.repeats}"],
                                 capture_output=True, text=True, check=True)
            result[side] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((size, weights_mib, result))
    print(f"{'size':>10} {'weights MiB':>11} {'ours s':>7} {'torch s':>8} {'speed-up':>8} "
          f"{'ours peak/weights':>17} {'torch peak/weights':>18}")
    for size, weights, r in rows:
        print(f"{size:>10} {weights:11.0f} {r['ours']['seconds']:7.2f} "
              f"{r['torch']['seconds']:8.2f} {r['torch']['seconds'] / r['ours']['seconds']:7.2f}x "
              f"{r['ours']['peak_growth_mib'] / weights:17.2f} "
              f"{r['torch']['peak_growth_mib'] / weights:18.2f}")


if __name__ == "__main__":
    cli.run(main)
