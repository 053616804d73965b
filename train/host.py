"""Host-process settings for runs on CPU, applied by the entry points before JAX starts.

XLA:CPU allocates a step's temporaries afresh at every execution: hundreds of MiB at the bench
shapes (logits, attention weights, activations kept for the backward pass). glibc's malloc
serves each allocation above 32 MiB with a new mmap and unmaps it on free, so every training
step would fault all of those pages in again (hundreds of thousands of minor faults a step;
tests/train/test_host.py counts them).

`keep_freed_memory()` tells glibc (mallopt(3)) to serve every thread from the main heap, never
to mmap, and to keep freed memory instead of trimming it, so the next step reuses the pages
it already has. It must run before JAX starts its threads: a thread keeps the malloc arena it
first used. The process's resident memory then stays at its peak, which is what a training
process reaches anyway.

It applies only where the run is on CPU: accelerator runs allocate their big buffers on the
device, and their hosts keep the default allocator. Set KEEP_FREED_MEMORY=0 to turn it off.

`split_cpu_devices(n)` (config.mesh.cpu_devices) exposes the host's cores as n XLA devices, so
the mesh's data axis runs n batch shards side by side instead of splitting every op across
the cores. Whether that pays depends on the shape (small ops gain, large matmuls lose), so it
is a per-preset choice measured with experiments/bench.py.
"""
import ctypes
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8  # <malloc.h>
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def runs_on_cpu() -> bool:
    """Whether JAX will pick the CPU backend, decided without starting JAX (which would
    start its threads): JAX_PLATFORMS when set, else whether an accelerator plugin is
    installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def keep_freed_memory() -> bool:
    """Applies the glibc settings above on a Linux CPU run; returns whether they were applied."""
    if os.environ.get("KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not runs_on_cpu():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))


def return_large_buffers() -> bool:
    """Large allocations (>= 1 MiB) get their own mappings, returned to the system when freed.

    glibc otherwise raises its mmap threshold after each large free (up to 32 MiB), so the
    transient tensor buffers of a checkpoint import pile up in the heap and the peak resident
    set grows by their sum. Under keep_freed_memory (training) mmap is off and this is moot.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, 1 << 20) == 1


def split_cpu_devices(count: int) -> bool:
    """On a CPU run, makes JAX expose `count` host devices; returns whether it did.

    Must run before JAX's backend starts. Once it has started with another device count,
    raises ConfigError (train.main reports it as one line).
    """
    if count <= 1 or not runs_on_cpu():
        return False
    import jax  # pylint: disable=import-outside-toplevel
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:  # the backend has started already (a caller used JAX first)
        if jax.device_count() == count:
            return True
        from train.errors import ConfigError  # pylint: disable=import-outside-toplevel
        raise ConfigError(f"config.mesh.cpu_devices={count} could not be applied: JAX has "
                          f"already started with {jax.device_count()} devices. Set it "
                          "before the first JAX call, or leave it at 0.") from e
    return True
