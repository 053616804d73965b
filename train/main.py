"""Command-line entry point: trains the experiment given by --config into --workdir.

  python -m train.main --config=experiments/gpt.py:tiny --workdir=runs/gpt_tiny \\
      --config.opt.learning_rate=3e-4 --config.mesh.fsdp=2

Rerunning with the same --workdir resumes from its latest checkpoint. --dry_run compiles the
train step for the configured mesh and prints per-device memory, then exits (nothing is
trained, read or written). Multi-host: the same
command on every host; under SLURM or on a TPU pod slice JAX finds the other processes itself,
elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I (docs/clusters.md).
"""
import sys

from absl import flags, logging
from ml_collections import config_flags

from data.errors import DataError
from train import cli, config as config_lib, errors, host, loop, memory, multihost
from train import pretrained, profiling, tasks
from train.errors import ConfigError

flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, tokenizer.")
config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/gpt.py:tiny",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0, the same on every process.")
flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes take part.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..num_processes-1.")
flags.DEFINE_bool("dry_run", False, "Compile the train step for the configured mesh, print "
                  "per-device memory (parameters, optimizer state, activations) and exit.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    host.keep_freed_memory()  # CPU runs: reuse the step's memory (before JAX starts threads)
    config, fl = flags.FLAGS.config, flags.FLAGS
    try:
        pretrained.configure(config)  # init_from=hf:DIR: the architecture of DIR
        task = tasks.get(config.task)
        if task.configure is not None:
            task.configure(config)  # keys that follow from others (sft: the base run's shape)
        config_lib.validate(config)  # (train_and_evaluate checks --workdir)
        # Both first: the CPU device count and jax.distributed.initialize cannot change once
        # a JAX device has been used.
        host.split_cpu_devices(config.mesh.get("cpu_devices", 0))
        multihost.maybe_initialize_distributed(fl.coordinator_address, fl.num_processes,
                                               fl.process_id)
        profiling.use_compilation_cache(config.get("compilation_cache_dir", ""))
        if fl.dry_run:
            print(memory.format_report(memory.memory_report(config, task), config))
            return
        loop.train_and_evaluate(config, fl.workdir, task)
    except (DataError, errors.CheckpointMismatchError, ConfigError) as e:
        cli.fail(str(e))
    except errors.DivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
