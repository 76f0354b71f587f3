"""The lambda convolution: the paper's formulation of local position lambdas, one
``jax.lax.conv_general_dilated`` call (the reference every other formulation equals)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from lambda_jax.core.numerics import accumulation_dtype

_CONV_DIMENSION_NUMBERS = {
    1: ("NHC", "HIO", "NHC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def lambda_convolution(values: jax.Array, kernel: jax.Array, causal: bool = False) -> jax.Array:
    """The lambda convolution: position lambdas over an r x ... x r scope, zero padded.

    One ``jax.lax.conv_general_dilated`` call: the value depth v is folded into the
    batch, u is the input channel axis and k the output channel axis.

    Args:
      values: ``[batch, *spatial, v, u]``.
      kernel: ``[r, ..., r, k, u]`` (one r per spatial axis, r odd).
      causal: for sequences: each query sees itself and the ``r - 1`` positions before it
        (padding on the left only); the kernel's index j then holds the offset
        ``j - (r - 1)`` and r may be even.

    Returns:
      ``[batch, n, k, v]`` in ``accumulation_dtype(values.dtype)``.
    """
    batch, *spatial, depth_v, depth_u = values.shape
    s = len(spatial)
    depth_k = kernel.shape[-2]
    chex.assert_rank(kernel, s + 2)
    folded = jnp.moveaxis(values, -2, 1).reshape(batch * depth_v, *spatial, depth_u)
    rhs = jnp.swapaxes(kernel, -1, -2).astype(values.dtype)  # [r.., u, k]: I=u, O=k
    out = jax.lax.conv_general_dilated(
        folded,
        rhs,
        window_strides=(1,) * s,
        padding=[(kernel.shape[0] - 1, 0)] if causal else "SAME",
        dimension_numbers=_CONV_DIMENSION_NUMBERS[s],
        preferred_element_type=accumulation_dtype(values.dtype),
    )  # [batch * v, *spatial, k]
    out = out.reshape(batch, depth_v, math.prod(spatial), depth_k)
    return jnp.transpose(out, (0, 2, 3, 1))
