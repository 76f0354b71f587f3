"""Training: optimizer and schedule, train and eval steps, data parallelism, checkpoints."""

from lambda_jax.train.checkpoint import (
    CheckpointError,
    Checkpointer,
    DamagedCheckpointError,
    NonFiniteError,
)
from lambda_jax.train.config_check import MAY_CHANGE_ON_RESUME, ConfigChangeError
from lambda_jax.train.loop import EXIT_PREEMPTED, train_and_evaluate, validate_config
from lambda_jax.train.optim import create_learning_rate_fn, create_optimizer, cross_entropy_loss
from lambda_jax.train.parallel import DataParallel
from lambda_jax.train.steps import TrainState, create_train_state, eval_step, train_step

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConfigChangeError",
    "DamagedCheckpointError",
    "EXIT_PREEMPTED",
    "MAY_CHANGE_ON_RESUME",
    "NonFiniteError",
    "DataParallel",
    "TrainState",
    "create_learning_rate_fn",
    "create_optimizer",
    "create_train_state",
    "cross_entropy_loss",
    "eval_step",
    "train_and_evaluate",
    "train_step",
    "validate_config",
]
