"""Batch norm configured from a module's fields, shared by the layers and the ResNets."""

from __future__ import annotations

import flax.linen as nn


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
