"""The CPU allocator setting: when it applies, and that steps stop faulting their memory in."""
import os
import subprocess
import sys
import textwrap

import pytest

from train import host

# A jitted function whose temporaries (a 4096 x 8192 fp32 product, 128 MiB) are allocated at
# every call; prints the minor page faults of the third call.
_PROBE = textwrap.dedent("""
    import resource, sys
    from train import host
    applied = host.keep_freed_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda a, b: jax.nn.softmax(a @ b, axis=0) @ b.T)
    a, b = jnp.ones((4096, 256)), jnp.ones((256, 8192))
    f(a, b).block_until_ready(); f(a, b).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(keep):
    env = dict(os.environ, JAX_PLATFORMS="cpu", KEEP_FREED_MEMORY=keep, XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))))
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_kept_memory_stops_the_page_faults_of_each_step():
    applied_off, faults_off = _faults("0")
    applied_on, faults_on = _faults("1")
    assert not applied_off and applied_on
    # The product and its softmax are 128 MiB each: tens of thousands of fresh 4 KiB pages.
    assert faults_off > 20_000
    assert faults_on < faults_off / 10


def test_only_cpu_runs_are_tuned(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host.runs_on_cpu() and not host.keep_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host.runs_on_cpu()
    monkeypatch.setenv("KEEP_FREED_MEMORY", "0")
    assert not host.keep_freed_memory()


def test_cpu_devices_applies_only_to_cpu_runs_and_only_before_jax_starts(monkeypatch):
    import jax
    from train.errors import ConfigError
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host.split_cpu_devices(4)  # accelerator run: the CPU's devices are left alone
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not host.split_cpu_devices(0) and not host.split_cpu_devices(1)
    jax.devices()  # the test session's backend has started (8 devices, tests/conftest.py)
    assert host.split_cpu_devices(jax.device_count())  # already so: nothing to change
    with pytest.raises(ConfigError, match=r"cpu_devices=3 could not be applied.*"
                                          r"before the first JAX call"):
        host.split_cpu_devices(3)
