"""The train state and the per-device train and eval steps.

Both steps are written for one device's share of the global batch and communicate only
through collectives over ``axis_name``; :mod:`lambda_jax.train.parallel` maps them over the
devices with ``jax.pmap`` or ``jax.jit(jax.shard_map(...))``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from lambda_jax.train.optim import cross_entropy_loss, ema_decay_at


class TrainState(flax.struct.PyTreeNode):
    """Everything a training run updates; saved whole in each checkpoint.

    Attributes:
      step: scalar int32, optimizer steps taken.
      params: model parameters.
      batch_stats: batch-norm running statistics.
      opt_state: optimizer state.
      ema_params: exponential moving average of ``params``, used for evaluation.
      ema_batch_stats: exponential moving average of ``batch_stats``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any


def create_train_state(
    rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple
) -> TrainState:
    """Initialises the model on one example of ``image_shape = (height, width, channels)``."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=params,
        ema_batch_stats=batch_stats,
    )


def normalize_images(
    images: jax.Array,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """The model's input from a batch of images, on the device.

    Args:
      images: ``[batch, height, width, channels]``: uint8 pixels as the input pipeline
        sends them, or floating-point images already normalised.
      mean, std: per-channel statistics of the ``[0, 1]`` pixels, length 1 or
        ``channels`` (``lambda_jax.data.DatasetInfo.mean`` and ``.std``); required for
        uint8 images, ignored for floating-point ones.
      dtype: the dtype returned.

    Returns:
      ``[batch, height, width, channels]`` of ``dtype``: ``(images / 255 - mean) / std``
      computed in float32, for uint8 input; floating-point input cast to ``dtype``.
    """
    chex.assert_rank(images, 4)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(dtype)
    if images.dtype != jnp.uint8:
        raise TypeError(f"images must be uint8 pixels or floating point, got {images.dtype}.")
    if mean is None or std is None:
        raise ValueError("uint8 images need the data set's mean and std to be normalised: "
                         "pass mean=info.mean, std=info.std to the step.")
    scaled = images.astype(jnp.float32) / jnp.float32(255)
    normalized = (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return normalized.astype(dtype)


def _top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """``[batch]`` float32, 1 where the label is among the ``k`` largest logits."""
    _, top = lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    num_classes: int,
    label_smoothing: float,
    ema_decay: float,
    axis_name: str,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    input_dtype: jnp.dtype = jnp.float32,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's share of the batch.

    Args:
      state: the replicated train state.
      batch: ``image`` ``[per_device_batch, height, width, channels]`` uint8 (normalised
        here with ``mean`` and ``std``) or floating point (used as given), and ``label``
        ``[per_device_batch]`` int32.
      rng: base dropout key; folded with the step and the device index.
      axis_name: the mapped device axis; gradients, loss and batch-norm statistics are
        averaged over it, so every device ends with the same state.
      mean, std, input_dtype: see :func:`normalize_images`.

    Returns:
      The new state and scalar metrics ``loss``, ``accuracy``, ``learning_rate`` and
      ``grad_norm`` (global L2 norm of the mean gradient).
    """
    images = normalize_images(batch["image"], mean, std, input_dtype)
    labels = batch["label"]
    chex.assert_shape(labels, (images.shape[0],))
    dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(axis_name))

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        chex.assert_shape(logits, (images.shape[0], num_classes))
        loss = cross_entropy_loss(logits, labels, num_classes, label_smoothing).mean()
        return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    decay = ema_decay_at(state.step, ema_decay)

    def average(old, new):
        return (decay * old + (1.0 - decay) * new).astype(new.dtype)

    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=jax.tree.map(average, state.ema_params, params),
        ema_batch_stats=jax.tree.map(average, state.ema_batch_stats, batch_stats),
    )
    accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32).mean()
    metrics = {
        "loss": lax.pmean(loss, axis_name),
        "accuracy": lax.pmean(accuracy, axis_name),
        "learning_rate": learning_rate_fn(state.step),
        # Of the gradient the optimizer receives (the device mean, before clipping).
        "grad_norm": optax.global_norm(grads),
    }
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    num_classes: int,
    axis_name: str,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    input_dtype: jnp.dtype = jnp.float32,
) -> dict[str, jax.Array]:
    """Sums of eval metrics over this device's share of a padded batch, summed over devices.

    Evaluates the EMA weights. ``batch`` holds ``image``
    ``[per_device_batch, height, width, channels]`` (uint8, normalised here with ``mean``
    and ``std`` as by :func:`normalize_images`, or floating point), ``label``
    ``[per_device_batch]`` and ``mask`` ``[per_device_batch]`` (0 for padding). Returns
    scalar sums ``loss`` (cross entropy without label smoothing), ``top1``, ``top5`` and
    ``count``.
    """
    images = normalize_images(batch["image"], mean, std, input_dtype)
    labels = batch["label"]
    chex.assert_equal_shape((labels, batch["mask"]))
    logits = model.apply(
        {"params": state.ema_params, "batch_stats": state.ema_batch_stats}, images, train=False
    )
    mask = batch["mask"].astype(jnp.float32)
    sums = {
        "loss": jnp.sum(cross_entropy_loss(logits, labels, num_classes, 0.0) * mask),
        "top1": jnp.sum(_top_k_correct(logits, labels, 1) * mask),
        "top5": jnp.sum(_top_k_correct(logits, labels, min(5, num_classes)) * mask),
        "count": jnp.sum(mask),
    }
    return lax.psum(sums, axis_name)
