"""Multi-host runs through JAX's own runtime: one process per host, all running this program.

`maybe_initialize_distributed` joins the processes with `jax.distributed.initialize`, from
explicit flags or from what SLURM / a Cloud TPU pod slice tells JAX. Afterwards each process
feeds its slice of every global batch (train/sharding.global_batch) and Orbax saves and
restores collectively. The run folder must be on a filesystem every host shares; files in it
are written by process 0 alone, and `write_once` makes the others wait until they exist.
"""
import os

import jax
from jax.experimental import multihost_utils

from data.errors import DataError
from train.errors import ConfigError


# The variables SLURM documents for every task of a job step (srun), the ones
# jax.distributed.initialize() reads there.
_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID",
                    "SLURM_NTASKS")


def launched_as_cluster() -> bool:
    """Whether SLURM or a multi-host Cloud TPU slice started this process as one of several."""
    # jax.distributed.initialize() finds these environments by itself, but it also accepts a
    # one-task SLURM job, where it would hide every GPU but one; so we ask first. SLURM is
    # read from its documented variables. A Cloud TPU slice is known only from the GCE
    # metadata server or GKE's variables, and JAX has no public function that asks them, so
    # its own detectors (the ones initialize() uses) are called; on a plain machine they read
    # only environment variables. Should a JAX release move them, TPU slices fall back to the
    # explicit --coordinator_address/--num_processes/--process_id flags.
    if all(name in os.environ for name in _SLURM_VARIABLES):
        return int(os.environ["SLURM_NTASKS"]) > 1
    try:
        from jax._src import clusters  # pylint: disable=import-outside-toplevel
        detectors = (clusters.GceTpuCluster, clusters.GkeTpuCluster)
    except (ImportError, AttributeError):
        return False
    for env in detectors:
        if env.is_env_present():
            return env.get_process_count() > 1
    return False


def maybe_initialize_distributed(coordinator_address=None, num_processes=None,
                                 process_id=None) -> bool:
    """Joins a multi-process run before any JAX device is touched; returns whether it did."""
    explicit = {"--coordinator_address": coordinator_address,
                "--num_processes": num_processes, "--process_id": process_id}
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) < len(explicit):
        missing = [name for name in explicit if name not in given]
        raise ConfigError(f"{' and '.join(given)} need {' and '.join(missing)} too; pass all "
                          "three (same address and count on every process), or none under "
                          "SLURM or on a TPU pod slice")
    if given:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--coordinator_address={coordinator_address!r} is not host:port "
                              "(process 0's address and a free port, e.g. 10.0.0.1:1234)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id} must be in 0..num_processes-1 and "
                              f"--num_processes={num_processes} at least 1")
        # CPU processes talk through gloo, already the default of jax 0.10's
        # jax_cpu_collectives_implementation option: nothing to set for CPU runs.
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if launched_as_cluster():
        jax.distributed.initialize()
        return True
    return False


def write_once(path: str, write) -> None:
    """Calls write() on process 0 when `path` is missing; every process returns once it exists.

    The other processes wait at a barrier and then read the same file, so a shared run folder
    never holds a file written twice at once or read half-written.
    """
    error = None
    if jax.process_index() == 0 and not os.path.exists(path):
        try:
            write()
        except Exception as e:  # raised after the barrier, so no process is left waiting
            error = e
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"write_once {os.path.basename(path)}")
    if error is not None:
        raise error
    if not os.path.exists(path):
        raise DataError(f"process 0 did not write {path} (see its error), or this host cannot "
                        "see it: the workdir must be on a filesystem every host shares")
