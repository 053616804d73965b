"""Run logging: metrics.jsonl + TensorBoard, a progress bar, throughput and MFU.

Step metrics come back from the device as sums plus a token count, so averages over logged
steps (and over hosts) are exact rather than means of means.
"""
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from data import sources
from train import events

# Dense bf16 peak FLOP/s per chip from the vendors' data sheets, keyed by jax device_kind.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L4": 121e12, "NVIDIA B200": 2250e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def measure_matmul_flops(n: int = 1024, repeats: int = 5, rounds: int = 12,
                         dtype=jnp.float32) -> float:
    """FLOP/s of a jitted n x n matmul on the default device (the CPU 'peak').

    The best of `rounds` short rounds: on a shared machine a neighbour's burst slows some
    rounds, and a single long timing can land in such a burst and halve the peak.
    """
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = f(a, a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2.0 * n ** 3 / best


def peak_kind(device_kind: str):
    """The PEAK_FLOPS key for a jax device_kind: the same name, else the longest key it starts
    with ("NVIDIA H100 PCIe ..." is a PCIe card, not the "NVIDIA H100" SXM part); None if none."""
    if device_kind in PEAK_FLOPS:
        return device_kind
    prefixes = [kind for kind in PEAK_FLOPS if device_kind.startswith(kind)]
    return max(prefixes, key=len) if prefixes else None


def cpu_key() -> str:
    """This CPU's model, the cores this process may use and the jax version: what the matmul
    peak depends on."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} | {cores} cores | jax {jax.__version__}"


def cpu_peak_flops(cache_dir: str | None = None) -> tuple[float, str]:
    """The measured CPU matmul peak, kept per machine in `cache_dir`/cpu_peak_flops.json.

    Measured the first time a run starts on this CPU (about 1.4 s), then read: every run on the
    machine divides by the same peak, so their MFUs compare. Delete the file to measure again;
    `experiments.bench` always measures afresh. No `cache_dir`: measured every time.
    """
    if not cache_dir:
        return measure_matmul_flops(), "measured fp32 matmul"
    path, key = os.path.join(cache_dir, "cpu_peak_flops.json"), cpu_key()
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table = table if isinstance(table, dict) else {}
    known = table.get(key)
    if isinstance(known, (int, float)) and known > 0:
        return float(known), f"fp32 matmul measured once on this CPU, {path}"
    peak = measure_matmul_flops()
    try:  # moved into place whole: processes starting together never read half a file
        sources.write_atomic(path, json.dumps({**table, key: peak}, indent=1).encode())
    except OSError:
        pass  # a read-only cache: measured again next time
    return peak, "measured fp32 matmul"


def peak_flops(cache_dir: str | None = None) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, how it was obtained), the denominator of MFU.

    On CPU the matmul is measured (once per machine when `cache_dir` is given, see
    cpu_peak_flops) and already uses every core, however many fake devices XLA was told to
    create; accelerators are one chip's peak times the device count.
    """
    device = jax.devices()[0]
    if device.platform == "cpu":
        return cpu_peak_flops(cache_dir)
    kind = peak_kind(device.device_kind)
    if kind is not None:
        return PEAK_FLOPS[kind] * jax.device_count(), f"{kind} bf16 data sheet"
    return (measure_matmul_flops(4096) * jax.device_count(),
            f"measured fp32 matmul ({device.device_kind} not in table)")


def summarize(sums: dict) -> dict:
    """Turns summed step metrics into means: loss, perplexity, accuracy."""
    count = max(float(sums.get("weight_sum", 0.0)), 1e-9)
    out = {}
    if "loss_sum" in sums:
        out["loss"] = float(sums["loss_sum"]) / count
        out["perplexity"] = float(np.exp(min(out["loss"], 50.0)))
    if "correct_sum" in sums:
        out["accuracy"] = float(sums["correct_sum"]) / count
    for key, value in sums.items():
        if not key.endswith("_sum") and key != "weight_sum":
            out[key] = float(value)
    return out


# Per-step values that are read at the last step of a log window, not summed over it.
_LAST_VALUE_METRICS = ("grad_norm", "param_norm", "learning_rate")
_NOT_LOGGED = ("nonfinite",)  # the loop's own flag (train/step.py)


def pair_means(sums: dict, names) -> dict:
    """For preference pairs: summarize's loss and accuracy (no perplexity), and for each of
    `names` the mean sums[name + "_sum"] / pairs (weight_sum counts the pairs)."""
    out = summarize({k: v for k, v in sums.items() if k[:-4] not in names})
    out.pop("perplexity", None)
    count = max(float(sums.get("weight_sum", 0.0)), 1e-9)
    out.update({name: float(sums[name + "_sum"]) / count for name in names
                if name + "_sum" in sums})
    return out


def train_means(step_sums, summarize, steps_per_sec, tokens_per_step, step_seconds_at_peak):
    """Means over the logged steps (exact: sums / counts), last norms and rate, throughput, MFU."""
    summed = {k: sum(m[k] for m in step_sums) for k in step_sums[0]
              if k not in _LAST_VALUE_METRICS + _NOT_LOGGED}
    summed.update({k: step_sums[-1][k] for k in _LAST_VALUE_METRICS})
    out = summarize(summed)
    if steps_per_sec is not None:
        out["tokens_per_sec"] = steps_per_sec * tokens_per_step
        out["mfu"] = steps_per_sec * step_seconds_at_peak  # model FLOP/s over peak FLOP/s
    return out


def last_wall_time(workdir):
    """Wall time already spent by earlier runs in this workdir (0 for a new run)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0.0
    last = 0.0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                last = max(last, float(json.loads(line).get("wall_time", 0.0)))
            except (ValueError, AttributeError):
                continue
    return last


class MetricWriter:
    """Appends metric dicts to metrics.jsonl and TensorBoard (only on process 0)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._file = self._tb = None
        if self.enabled:
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = events.EventWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict):
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._tb.write(int(step), {f"{split}/{key}": value for key, value in metrics.items()
                                   if isinstance(value, (int, float))})

    def close(self):
        if self.enabled:
            self._file.close()
            self._tb.close()


class Throughput:
    """Training steps per second between log points, with compilation and evaluation left out.

    `restart()` is called once the device has caught up (after the first, compiling step, after
    each log point's device_get and after evaluation); `tick()` counts each step dispatched
    after that.
    """

    def __init__(self):
        self._start, self._steps = None, 0

    def restart(self):
        self._start, self._steps = time.time(), 0

    def tick(self):
        self._steps += 1

    def steps_per_sec(self):
        """None until at least one step has been timed."""
        if self._start is None or self._steps == 0:
            return None
        return self._steps / max(time.time() - self._start, 1e-9)


class ProgressBar:
    """tqdm bar over training steps showing loss, tokens/s and ETA (process 0 only)."""

    def __init__(self, first_step: int, total_steps: int):
        self._bar = tqdm.tqdm(total=total_steps, initial=first_step, unit="step",
                              dynamic_ncols=True, disable=jax.process_index() != 0,
                              mininterval=1.0)

    def update_to(self, step: int, **postfix):
        self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, line: str):
        if not self._bar.disable:  # tqdm.write is a class method: it prints even when disabled
            self._bar.write(line)

    def close(self):
        self._bar.close()
