"""Batch norm in linen: ``nn.BatchNorm`` configured from a module's fields (layers and ResNets),
and the variables of a module that normalises with :func:`lambda_jax.core.norm.apply_batch_norm`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lambda_jax.core.norm import apply_batch_norm

__all__ = ["BatchNormVariables", "apply_batch_norm", "batch_norm"]


def batch_norm(module: nn.Module, train: bool, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    """``nn.BatchNorm`` over the last axis of ``[..., channels]`` inputs.

    Takes ``axis_name``, ``bn_momentum``, ``bn_epsilon``, ``dtype`` and ``param_dtype`` from
    ``module``; batch statistics when ``train``, running averages otherwise. ``zero_scale``
    starts the scale at zero (the last batch norm of a residual branch).
    """
    return nn.BatchNorm(
        use_running_average=not train,
        axis_name=module.axis_name,
        momentum=module.bn_momentum,
        epsilon=module.bn_epsilon,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


class BatchNormVariables(nn.Module):
    """The variables of ``nn.BatchNorm(features)``, under the same names, for a module that
    normalises with :func:`apply_batch_norm`.

    Calling it returns ``(params, stats)``: ``{"scale", "bias"}`` arrays ``[features]`` and
    ``{"mean", "var"}`` ``batch_stats`` variables (``.value`` to read or write).
    """

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        shape = (self.features,)
        mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)
        params = {"scale": self.param("scale", nn.initializers.ones, shape, self.param_dtype),
                  "bias": self.param("bias", nn.initializers.zeros, shape, self.param_dtype)}
        return params, {"mean": mean, "var": var}
