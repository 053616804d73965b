"""What a run keeps of XLA's work: the persistent compilation cache, and profiler traces.

Compilation cache (config.compilation_cache_dir): XLA's compiled programs are written to a
folder keyed by the program, the compile options and the devices, so a resumed or preempted
run, or a second run of the same shapes, loads them instead of compiling again. Every program
is kept, however quick its compile: a run's small programs (init, eval, the data-parallel
reshards) add up to seconds on a restart. JAX reads its cache folder once per process, at the
first compilation; a folder already chosen (JAX_COMPILATION_CACHE_DIR in the environment, or an
earlier call) is kept.

Profiler (config.profile_steps="FIRST-LAST"): a jax.profiler trace of those training steps,
both included, in <workdir>/profile/, for TensorBoard's profile plugin (the .xplane.pb) or
Perfetto (the .trace.json.gz). The trace starts before FIRST is dispatched and stops once LAST
has finished on the device, so the steps are whole in it; tracing does not change any number.
"""
import os

import jax

from train.errors import ConfigError

PROFILE_DIR = "profile"
CACHE_MAX_BYTES = 8 << 30  # the least recently used programs go first beyond this


def use_compilation_cache(path: str) -> str | None:
    """Points JAX's persistent compilation cache at `path` ("" leaves it off); returns the
    folder in use, which is the earlier one when the process already chose one."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"config.compilation_cache_dir={path!r} cannot be made ({e.strerror}); "
                          "pass a folder you can write to, or an empty value to turn the "
                          "cache off") from None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # A size bound turns on JAX's least-recently-used eviction and, with it, a file lock, so
    # runs sharing the folder never read an entry another is still writing.
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path


def parse_steps(spec: str) -> tuple[int, int] | None:
    """(first, last) of "FIRST-LAST" or "STEP"; None for ""; ConfigError for anything else."""
    spec = str(spec).strip()
    if not spec:
        return None
    first, dash, last = spec.partition("-")
    try:
        steps = int(first), int(last if dash else first)
    except ValueError:
        steps = None
    if steps is None or not 1 <= steps[0] <= steps[1]:
        raise ConfigError(f"config.profile_steps={spec!r} is not a range of steps; pass "
                          "--config.profile_steps=FIRST-LAST (e.g. 10-12, both included, "
                          "counted from 1) or one step, e.g. 10; empty turns it off")
    return steps


class StepProfiler:
    """Starts a jax.profiler trace before step `first` and stops it after step `last`."""

    def __init__(self, spec: str, workdir: str, log=print):
        self.steps = parse_steps(spec)
        self.directory = os.path.join(workdir, PROFILE_DIR)
        self.active = False
        self.log = log

    def before(self, step: int) -> None:
        """Called with the number of the step about to run (1 for the first)."""
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs) -> None:
        """Called with the step just dispatched and its outputs (waited for at the last)."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()
            self.log(f"profiled steps {self.steps[0]}-{self.steps[1]}: trace in "
                     f"{self.directory} (tensorboard --logdir {self.directory}, or the "
                     ".trace.json.gz in ui.perfetto.dev)")

    def stop(self) -> None:
        """Ends a trace still running (the run stopped inside the range)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
