"""Learning-rate schedule, optimizer and loss from a training config."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adamw")


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The peak learning rate: ``config.learning_rate`` per 256 examples of global batch."""
    return config.learning_rate * config.batch_size / 256


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
    """Linear warm-up from 0 over ``config.warmup_epochs``, then cosine decay to 0.

    Args:
      config: reads ``learning_rate`` (per 256 examples), ``batch_size``, ``warmup_epochs``.
      steps_per_epoch: optimizer steps in one pass over the training set.
      num_train_steps: total optimizer steps; the cosine reaches 0 at this step.

    Returns:
      A schedule ``step -> learning rate``.
    """
    warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), num_train_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate(config),
        warmup_steps=warmup_steps,
        decay_steps=num_train_steps,
        end_value=0.0,
    )


def weight_decay_mask(params: Any) -> Any:
    """True for kernels and embeddings (rank >= 2); biases and batch-norm scales are exempt."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer named by ``config.optimizer``.

    ``"sgd"``: L2 weight decay added to the gradient (as in the paper's ResNet recipe), then
    SGD with (Nesterov) momentum. ``"adamw"``: AdamW with decoupled weight decay. Both clip the
    global gradient norm first when ``config.grad_clip_norm > 0``.
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"config.optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}.")
    chain = []
    if config.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == "sgd":
        if config.weight_decay > 0:
            chain.append(optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask))
        chain.append(
            optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov)
        )
    else:
        chain.append(
            optax.adamw(learning_rate_fn, weight_decay=config.weight_decay, mask=weight_decay_mask)
        )
    return optax.chain(*chain)


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float
) -> jax.Array:
    """Per-example softmax cross entropy with smoothed one-hot targets.

    Args:
      logits: ``[batch, num_classes]``.
      labels: ``[batch]`` integer class ids.
      num_classes: number of classes.
      label_smoothing: mass spread uniformly over all classes (0 disables).

    Returns:
      ``[batch]`` losses in float32.
    """
    chex.assert_rank(logits, 2)
    chex.assert_shape(labels, (logits.shape[0],))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay ramped up as ``min(decay, (1 + step) / (10 + step))``.

    The ramp keeps the average from being dominated by the random initial weights in short
    runs; for long runs it reaches ``decay`` after a few thousand steps.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))

