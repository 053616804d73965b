"""Steady-state training and generation throughput of an experiment config (not a test).

  python -m experiments.bench --config=experiments/gpt.py:bench_small
  python -m experiments.bench --config=experiments/gpt.py:bench_124m --generate=False
  python -m experiments.bench --config=experiments/bert.py:bert_bench_mini
  python -m experiments.bench --config=experiments/gpt.py:bench_124m --mesh=data=1,fsdp=2
  python -m experiments.bench --config=experiments/gpt.py:bench_small --mesh=cpu_devices=0

Training: the real jitted train_step (AdamW, clipping, donated state) of the config's task on a
random batch of the task's shapes (task.bench_batch; for BERT, 15% of positions masked): the
median of --steps timed steps after --warmup untimed ones. The median shrugs off a noisy
neighbour on a shared machine; experiments/bench_reference.py times the baselines the same
way. MFU counts non-embedding + attention FLOPs (LM head excluded, as for the baselines in
docs/benchmarks.md) over the peak of train/metrics.py: on CPU a measured fp32 matmul (the faster of a
measurement before and one after the steps), on GPU/TPU the data-sheet bf16 peak. Training
runs with train.main's CPU allocator setting (train/host.py).
Generation (GPT configs): a 32-token prompt continued by 128 tokens with the KV cache, batch 1
and 8, the whole loop in one jitted scan, timed in a child process without that setting, as
experiments.sample runs (--train=False times generation alone).
"""
import functools
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from models import gpt
from train import cli, config as config_lib, host, memory, metrics as metrics_lib, sharding, tasks
from train.errors import ConfigError
from train import step as step_lib
from train.tasks import lm

config_flags.DEFINE_config_file("config", None, "Experiment file with a bench preset.",
                                lock_config=True)
flags.DEFINE_string("mesh", "", "Mesh override, e.g. data=2,fsdp=2,tensor=2 or cpu_devices=2 "
                    "(default: the config's); per-device memory is printed for it.")
flags.DEFINE_integer("steps", 10, "Timed training steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation) before timing.")
flags.DEFINE_bool("train", True, "Time training.")
flags.DEFINE_bool("generate", True, "Also time generation with the KV cache (GPT configs).")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens for the generation timing.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens for the generation timing.")
FLAGS = flags.FLAGS
for _name in ("steps", "prompt_len", "new_tokens"):
    cli.at_least(_name, 1)
cli.at_least("warmup", 0)


def parse_mesh(text: str) -> dict:
    """--mesh=data=2,fsdp=2 -> {"data": 2, "fsdp": 2}; a malformed entry is a ConfigError."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in ("data", "fsdp", "tensor", "cpu_devices") or not value.lstrip("-").isdigit():
            raise ConfigError(f"--mesh={text}: {part!r} is not axis=count with axis one of "
                              "data, fsdp, tensor, cpu_devices (e.g. --mesh=data=2,fsdp=2)")
        out[name] = int(value)
    return out


def _timed(fn, repeats):
    """Best wall time of `repeats` calls of fn() (fn blocks until its result is ready)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_training(config, peak, verbose=True):
    """Returns (tokens/s, MFU, compile seconds); prints per-device memory when verbose."""
    task = tasks.get(config.task)
    s = step_lib.build(task, config)
    abstract = s.abstract
    batch = task.bench_batch(config)
    with jax.set_mesh(s.mesh):
        state = s.init_fn(jax.random.key(0))
        batch = sharding.global_batch(batch, s.batch_shard)
        train_step = s.jit_train_step(task, config)
        rng = jax.random.key(1)
        t0 = time.perf_counter()
        compiled = train_step.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - t0
        stats = compiled.memory_analysis()
        mib = 2.0 ** -20
        if verbose:
            lora_note = ("" if abstract.frozen is None else
                         f" (LoRA: {memory.per_device_bytes(abstract.params) * mib:,.1f} MiB "
                         "of them trained)")
            print(f"memory per device: parameters "
                  f"{memory.per_device_bytes((abstract.params, abstract.frozen)) * mib:,.1f} MiB"
                  f"{lora_note} | optimizer state "
                  f"{memory.per_device_bytes(abstract.opt_state) * mib:,.1f} MiB | activations +"
                  f" workspace (XLA temp) {stats.temp_size_in_bytes * mib:,.1f} MiB")
        for _ in range(FLAGS.warmup):
            state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
        times = []
        for _ in range(FLAGS.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch, rng)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
    tps = config.batch_size * config.data.max_len / seconds
    return tps, task.flops_per_token(config) * tps / peak, compile_s


def bench_generation(config, batch_size, **sampling):
    """New tokens per second for a prompt of FLAGS.prompt_len continued by FLAGS.new_tokens."""
    model = lm.build_model(config)
    params = nn.meta.unbox(jax.jit(lambda r: lm.init_params(model, config, r))(
        jax.random.key(0)))
    generate = jax.jit(functools.partial(gpt.generate, lm.build_model(config, decode=True),
                                         max_new_tokens=FLAGS.new_tokens, **sampling))
    prompt = jnp.ones((batch_size, FLAGS.prompt_len), jnp.int32)
    generate(params, prompt, jax.random.key(0)).block_until_ready()
    seconds = _timed(lambda: generate(params, prompt, jax.random.key(1)).block_until_ready(), 3)
    return batch_size * FLAGS.new_tokens / seconds


def kv_cache_line(config) -> str:
    """The KV cache per token with the config's kv heads against every head cached."""
    m = config.model
    gqa = gpt.cache_bytes_per_token(lm.build_model(config, decode=True))
    full = gpt.cache_bytes_per_token(lm.build_model(config, decode=True,
                                                    num_kv_heads=m.num_heads))
    kv_heads = m.num_kv_heads or m.num_heads
    return (f"KV cache ({m.dtype}): {gqa:,.0f} bytes/token with {kv_heads} kv heads vs "
            f"{full:,.0f} with all {m.num_heads} ({gqa / full:.3f}; num_kv_heads / num_heads = "
            f"{kv_heads / m.num_heads:.3f})")


def main(argv):
    del argv
    config = FLAGS.config
    if config is None:
        cli.fail("--config is required, e.g. --config=experiments/gpt.py:bench_small")
    try:
        config.mesh.update(parse_mesh(FLAGS.mesh))
        config_lib.validate(config)
    except ConfigError as e:
        cli.fail(str(e))
    generate = FLAGS.generate and config.task == "lm"
    if FLAGS.train:
        # As train.main does: CPU steps reuse their memory (train/host.py).
        kept_memory = host.keep_freed_memory()
        host.split_cpu_devices(config.mesh.get("cpu_devices", 0))  # --mesh=cpu_devices=N
        peak, source = metrics_lib.peak_flops()
        tps, mfu, compile_s = bench_training(config, peak)
        if "measured" in source:
            # Measured again after the steps, keeping the faster: a neighbour's burst during
            # one measurement would otherwise inflate MFU.
            again = metrics_lib.peak_flops()[0]
            mfu, peak = mfu * peak / max(peak, again), max(peak, again)
        print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | peak "
              f"{peak / 1e9:.1f} GFLOP/s ({source})")
        print(f"train: {tps:,.0f} tokens/s | MFU {100 * mfu:.1f}% | compile {compile_s:.1f}s | "
              f"batch {config.batch_size} x seq {config.data.max_len}", flush=True)
        if generate and kept_memory:
            # Generation is timed as experiments.sample runs it, in a process without that
            # setting (--train=False never applies it): one malloc arena shared by every
            # thread slows the decode loop.
            subprocess.run([sys.executable, "-m", "experiments.bench", *sys.argv[1:],
                            "--train=False"], check=True)
            return
    if generate and config.model.get("family") == "llama":
        print(kv_cache_line(config))
    if generate:
        for name, sampling in (("greedy", dict(temperature=0.0)),
                               ("top-k 40", dict(temperature=1.0, top_k=40))):
            rates = [bench_generation(config, b, **sampling) for b in (1, 8)]
            print(f"generate ({name}, {FLAGS.prompt_len}-token prompt, {FLAGS.new_tokens} new): "
                  f"batch 1: {rates[0]:,.0f} | batch 8: {rates[1]:,.0f} new tokens/s")


if __name__ == "__main__":
    cli.run(main)
