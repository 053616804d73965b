"""Per-device memory of a configured training step, before any data is read or any step runs.

`python -m train.main --config=... --workdir=... --dry_run` compiles the real jitted train step
for the configured mesh and prints, per device: parameters, optimizer state (from the shard
shapes of the sharded abstract state), and what XLA's buffer assignment reports for the whole
step (arguments, outputs, temporaries = activations and workspace). That is enough to size a
cluster job before submitting it: FSDP divides parameters + optimizer state by the fsdp size,
tensor parallelism divides the matrices it splits by the tensor size.
"""
import time

import flax.linen as nn
import jax
import numpy as np

from train import step as step_lib


def per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of sharded jax.ShapeDtypeStruct leaves."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def compile_step(config, task, devices=None):
    """(compiled train step, abstract sharded state, compile seconds) with nothing allocated."""
    s = step_lib.build(task, config, devices=devices)
    abstract = s.abstract
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s.batch_shard),
                         jax.eval_shape(lambda: task.init_batch(config, config.batch_size)))
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        step = s.jit_train_step(task, config)
        t0 = time.perf_counter()
        compiled = step.lower(abstract, batch, jax.random.key(0)).compile()
    return compiled, abstract, time.perf_counter() - t0


def memory_report(config, task, devices=None) -> dict:
    """Per-device bytes: params, optimizer state, and XLA's arguments/outputs/temp/peak."""
    compiled, abstract, compile_s = compile_step(config, task, devices)
    stats = compiled.memory_analysis()
    report = {
        "num_params": sum(x.size for x in jax.tree.leaves((abstract.params, abstract.frozen))),
        "params": per_device_bytes((abstract.params, abstract.frozen)),
        "optimizer": per_device_bytes(abstract.opt_state),
        "compile_seconds": compile_s,
    }
    if abstract.frozen is not None:  # LoRA: what training every weight would hold instead
        trained = per_device_bytes(abstract.params)
        report["trainable_params"] = sum(x.size for x in jax.tree.leaves(abstract.params))
        # The optimizer keeps the same state per trained byte (AdamW: two moments).
        report["full_optimizer"] = int(report["optimizer"] / max(trained, 1) * report["params"])
    for name in ("argument", "output", "temp"):
        report[name] = int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
    # The state is donated, so the outputs reuse the arguments' buffers.
    report["total"] = report["argument"] + report["temp"]
    return report


def format_report(report: dict, config) -> str:
    gib = 2.0 ** 30
    lines = [f"{report['num_params']:,} parameters | mesh {dict(config.mesh)} over "
             f"{jax.device_count()} devices | batch {config.batch_size} x "
             f"{config.data.max_len} | compiled in {report['compile_seconds']:.1f}s",
             "per device:"]
    for key, label in (("params", "parameters"), ("optimizer", "optimizer state"),
                       ("temp", "activations + workspace (XLA temp)"),
                       ("argument", "step arguments (state + batch)"),
                       ("total", "total (arguments + temp)")):
        lines.append(f"  {label:<36} {report[key] / gib:10.3f} GiB")
    if "full_optimizer" in report:
        saved = report["full_optimizer"] - report["optimizer"]
        lines.append(f"LoRA: {report['trainable_params']:,} trained parameters "
                     f"({100 * report['trainable_params'] / report['num_params']:.2f}%); "
                     f"full fine-tuning would hold {report['full_optimizer'] / gib:.3f} GiB of "
                     f"optimizer state per device, {saved / gib:.3f} GiB more")
    return "\n".join(lines)
