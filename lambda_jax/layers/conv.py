"""The square, bias-free, He-initialised convolution of the ResNets and their slot layers."""

from __future__ import annotations

import flax.linen as nn


def fixed_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padding of the height and width for a ``kernel_size`` window: ``(k - 1) // 2`` before,
    the rest after."""
    # Fixed by the kernel size (not by the input size), as in the reference ResNets.
    low = (kernel_size - 1) // 2
    return ((low, kernel_size - 1 - low),) * 2


def he_conv(module: nn.Module, features: int, kernel_size: int, stride: int, name: str) -> nn.Conv:
    """Bias-free ``kernel_size`` x ``kernel_size`` convolution with He (fan-out) initialisation
    in ``module``'s dtypes: ``[batch, H, W, C]`` -> ``[batch, ceil(H / stride),
    ceil(W / stride), features]``."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=stride,
        padding=fixed_padding(kernel_size),
        use_bias=False,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )
