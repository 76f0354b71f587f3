"""Checks of a training config: values at start, and what a resume may change.

A resumed run continues the saved one only if it means the same thing. The fields in
:data:`MAY_CHANGE_ON_RESUME` say how and where the run executes; every other field (model and
overrides, data set and splits, image size, augmentation, batch size, optimizer and its
settings, learning rate, warm-up, length, dtype, seed, EMA, label smoothing)
defines the run and must not change, or the cosine schedule, the data order or the weights'
meaning silently change with it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import ml_collections

from lambda_jax.train.checkpoint import CheckpointError
from lambda_jax.train.optim import OPTIMIZERS

DTYPES = ("float32", "bfloat16")

# How and where the run executes: free to change between a checkpoint and its resume.
MAY_CHANGE_ON_RESUME = (
    "async_checkpoints",
    "checkpoint_every_steps",
    "data_dir",
    "distributed",
    "eval_batch_size",  # evaluation pads to it; training never sees it
    "eval_crop_fraction", "eval_interpolation",  # the evaluation transform only
    "eval_every_steps",
    "init_from",  # read only when a run starts without checkpoints
    "keep_checkpoints",
    "log_every_steps",
    "num_workers",
    "parallelism",
)
# Model overrides that say how the model computes, not what it is: every local formulation of
# the lambda layer computes the same function with the same variables.
MODEL_OVERRIDES_MAY_CHANGE = ("lambda_implementation",)


class ConfigChangeError(CheckpointError):
    """A resume whose config changes fields that define the run."""


def _number(config: ml_collections.ConfigDict, field: str) -> float:
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"config.{field} must be a finite number, got {value!r}.")
    return float(value)


def _integer(config: ml_collections.ConfigDict, field: str) -> int:
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"config.{field} must be an integer, got {value!r}.")
    return int(value)


def check_values(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ValueError`` naming the field for a value no run can use.

    Args:
      config: a training config (``configs/default.py`` lists every field).
      num_devices: devices of all hosts; the global batch sizes must split over them.
    """
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {DTYPES}, got {config.dtype!r}.")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"config.optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}.")
    for field in ("batch_size", "eval_batch_size"):
        value = _integer(config, field)
        if value < 1 or value % num_devices:
            raise ValueError(
                f"config.{field}={value} is the global batch and must be a positive multiple of "
                f"the device count ({num_devices}); for example "
                f"--config.{field}={max(1, value // num_devices) * num_devices}."
            )
    for field in ("log_every_steps", "keep_checkpoints"):
        if _integer(config, field) < 1:
            raise ValueError(f"config.{field} must be at least 1, got {config[field]}.")
    for field in ("eval_every_steps", "checkpoint_every_steps"):
        if _integer(config, field) < 0:
            raise ValueError(f"config.{field} must be >= 0 (0: once per epoch), got {config[field]}.")
    num_train_steps = _integer(config, "num_train_steps")
    if num_train_steps == 0 or num_train_steps < -1:
        raise ValueError(f"config.num_train_steps must be positive, or -1 to train "
                         f"config.num_epochs, got {num_train_steps}.")
    if num_train_steps == -1 and _number(config, "num_epochs") <= 0:
        raise ValueError(f"config.num_epochs must be positive (or set config.num_train_steps), "
                         f"got {config.num_epochs}.")
    if _number(config, "learning_rate") <= 0:
        raise ValueError(f"config.learning_rate must be positive, got {config.learning_rate}.")
    for field in ("weight_decay", "warmup_epochs", "grad_clip_norm"):
        if _number(config, field) < 0:
            raise ValueError(f"config.{field} must be >= 0, got {config[field]}.")
    for field in ("ema_decay", "label_smoothing", "momentum"):
        if not 0 <= _number(config, field) < 1:
            raise ValueError(f"config.{field} must be in [0, 1), got {config[field]}.")


def check_data_size(config: ml_collections.ConfigDict, num_train_examples: int) -> None:
    """Raises ``ValueError`` if one global batch is larger than the training set."""
    if config.batch_size > num_train_examples:
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the training set "
            f"({num_train_examples} examples of {config.dataset!r}); lower config.batch_size."
        )


def run_defining(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``config`` (a dict) that must not change on resume."""
    defining = {k: v for k, v in config.items() if k not in MAY_CHANGE_ON_RESUME}
    overrides = defining.get("model_overrides")
    if isinstance(overrides, Mapping):
        defining["model_overrides"] = {k: v for k, v in overrides.items()
                                       if k not in MODEL_OVERRIDES_MAY_CHANGE}
    return defining


def config_changes(saved: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple]:
    """``{field: (saved value, new value)}`` for each run-defining field that differs.

    Both arguments are plain dicts (``ConfigDict.to_dict()`` or a checkpoint's JSON); a field
    missing on one side shows as ``None`` there.
    """
    saved, config = run_defining(saved), run_defining(config)
    return {k: (saved.get(k), config.get(k)) for k in sorted(set(saved) | set(config))
            if saved.get(k) != config.get(k)}


def describe_changes(changes: Mapping[str, tuple]) -> str:
    """``image_size: 8 -> 16; optimizer: 'sgd' -> 'adamw'``."""
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
