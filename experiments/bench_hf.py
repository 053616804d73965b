"""Import time and peak host memory of a Hugging Face GPT-2 folder: ours against transformers.

  python -m experiments.bench_hf --sizes=124m,774m

For each size a randomly initialised GPT2LMHeadModel is saved once (safetensors, fp32) under
--cache_dir; then, each in a fresh process so the peaks do not mix, (a) our import
(train/pretrained.py: header checks, then every tensor placed on the devices) and (b)
transformers' GPT2LMHeadModel.from_pretrained in torch load it, then read every parameter
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

flags.DEFINE_string("sizes", "124m,774m", "Comma-separated GPT-2 sizes: 124m, 350m, 774m.")
flags.DEFINE_string("cache_dir", "/tmp/bench_hf", "Where the random checkpoints are saved.")
flags.DEFINE_integer("repeats", 2, "Timed loads per side (the fastest is reported).")
flags.DEFINE_string("side", "", "Internal: run one measurement (ours | torch) and print JSON.")
flags.DEFINE_string("folder", "", "Internal: the folder to load.")
FLAGS = flags.FLAGS
cli.at_least("repeats", 1)

SHAPES = {"124m": (12, 768, 12), "350m": (24, 1024, 16), "774m": (36, 1280, 20)}


def _make_folder(size):
    folder = os.path.join(FLAGS.cache_dir, f"gpt2_{size}")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers
    layers, width, heads = SHAPES[size]
    torch.manual_seed(0)
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
        from experiments import gpt as gpt_exp
        from train import pretrained, step, tasks
        jax.numpy.zeros(1).block_until_ready()  # the backend's own memory, before the base

        def load():
            config = gpt_exp.get_config("gpt2")
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
            model = transformers.GPT2LMHeadModel.from_pretrained(folder)
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
    print(f"{'size':>5} {'weights MiB':>11} {'ours s':>7} {'torch s':>8} {'speed-up':>8} "
          f"{'ours peak/weights':>17} {'torch peak/weights':>18}")
    for size, weights, r in rows:
        print(f"{size:>5} {weights:11.0f} {r['ours']['seconds']:7.2f} "
              f"{r['torch']['seconds']:8.2f} {r['torch']['seconds'] / r['ours']['seconds']:7.2f}x "
              f"{r['ours']['peak_growth_mib'] / weights:17.2f} "
              f"{r['torch']['peak_growth_mib'] / weights:18.2f}")


if __name__ == "__main__":
    cli.run(main)
