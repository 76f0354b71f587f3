"""Trains and evaluates a model from a config.

    python train.py --config=configs/default.py --workdir=/tmp/lambda_digits
    python train.py --config=configs/cifar10.py --workdir=/tmp/cifar10 --config.batch_size=256

Several processes (a GPU cluster, or several on one machine), one command per process:

    python train.py --config=... --workdir=gs://bucket/run \
        --coordinator_address=HOST:PORT --num_processes=N --process_id=I

--coordinator_address, --num_processes and --process_id go to jax.distributed.initialize;
without them, --config.distributed=True lets JAX detect the cluster (TPU pods, SLURM, ...).
The workdir may be local or remote (gs://...); every process must see the same one.

Rerunning with the same --workdir resumes from its newest intact checkpoint; a damaged one is
moved to <workdir>/checkpoints_damaged/. A resume whose config changes what the run means is
refused unless --allow_config_changes is passed. SIGTERM or Ctrl-C saves a checkpoint and stops.

Exit status: 0 when training finished; 75 (EX_TEMPFAIL) after a stop on SIGTERM or Ctrl-C that
saved a checkpoint, on every process of a multi-host run (requeue the job to resume); 1 on an
error, including a NaN or infinite loss.
"""

import logging as std_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lambda_jax.train import EXIT_PREEMPTED, NonFiniteError, train_and_evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and metrics.")
config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_bool("allow_config_changes", False,
                  "Resume although fields that define the run (model, data, optimizer, learning "
                  "rate, length, ...) differ from the checkpoint's; logs each change and the "
                  "learning rate before and after.")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0's coordinator for a multi-process run; with "
                    "--num_processes and --process_id, passed to jax.distributed.initialize.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id")


def initialize_distributed() -> None:
    """Starts JAX's distributed runtime from the flags, or by detection with
    ``config.distributed``; a single process needs neither."""
    given = {name: FLAGS[name].value for name in _CLUSTER_FLAGS if FLAGS[name].value is not None}
    if given:
        missing = [f"--{name}" for name in _CLUSTER_FLAGS if name not in given]
        if missing:
            raise app.UsageError(f"{', '.join(missing)} missing: a multi-process run needs "
                                 "--coordinator_address, --num_processes and --process_id.")
        if not 0 <= given["process_id"] < given["num_processes"]:
            raise app.UsageError(f"--process_id={given['process_id']} must be in [0, "
                                 f"--num_processes={given['num_processes']}).")
        jax.distributed.initialize(**given)
    elif FLAGS.config.distributed:
        jax.distributed.initialize()


class _QuietLibraries(std_logging.Filter):
    """Keeps Orbax's per-save INFO lines off the console; warnings still pass."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    initialize_distributed()
    logging.info("JAX process %d of %d, devices %d (%d local, %s).", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count(),
                 jax.devices()[0].platform)
    try:
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                    allow_config_changes=FLAGS.allow_config_changes)
    except NonFiniteError as error:
        logging.error("%s", error)
        sys.exit(1)
    if result["preempted"]:
        logging.info("Stopped early at step %d; run the same command again to resume (exit "
                     "status %d).", result["step"], EXIT_PREEMPTED)
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    app.run(main)
