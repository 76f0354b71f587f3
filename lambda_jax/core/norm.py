"""Batch norm as a pure function of arrays, computed as ``flax.linen.BatchNorm`` computes it."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp


def apply_batch_norm(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    stats: Mapping[str, jax.Array],
    *,
    train: bool,
    momentum: float,
    epsilon: float,
    axis_name: Optional[Any] = None,
    dtype: Optional[Any] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch norm over every axis but the last, computed as ``nn.BatchNorm`` computes it.

    Statistics are taken in float32 (or wider), with ``var = E[x^2] - E[x]^2`` clipped at 0,
    and averaged over ``axis_name`` when it is given (cross-device batch norm).

    Args:
      x: ``[..., channels]``.
      params: ``{"scale": [channels], "bias": [channels]}``.
      stats: ``{"mean": [channels], "var": [channels]}``, the running averages.
      train: normalise with the batch's statistics and update the running averages
        (``new = momentum * old + (1 - momentum) * batch``); else use ``stats``.
      momentum: momentum of the running averages.
      epsilon: added to the variance.
      axis_name: mapped axis to average the batch statistics over, or None.
      dtype: output dtype (None: from ``x`` and the parameters).

    Returns:
      ``(y [..., channels], new stats)``; the stats are ``stats`` unchanged when not ``train``.
    """
    if train:
        reduced = x.astype(jnp.promote_types(dtype or x.dtype, jnp.float32))
        axes = tuple(range(x.ndim - 1))
        mean, mean_square = reduced.mean(axes), jax.lax.square(reduced).mean(axes)
        if axis_name is not None:
            mean, mean_square = jax.lax.pmean(jnp.stack([mean, mean_square]), axis_name)
        var = jnp.maximum(0.0, mean_square - jax.lax.square(mean))
        stats = {
            "mean": momentum * stats["mean"] + (1 - momentum) * mean,
            "var": momentum * stats["var"] + (1 - momentum) * var,
        }
    else:
        mean, var = stats["mean"], stats["var"]
        stats = dict(stats)
    y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * params["scale"]) + params["bias"]
    return y.astype(dtype or jnp.result_type(x, params["scale"], params["bias"])), stats
