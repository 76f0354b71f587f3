"""Position lambdas: relative embeddings (global context) and the lambda convolution (local context).

Conventions shared by every function here (s = number of spatial axes, 1 to 3):

* values: ``[batch, *spatial, v, u]`` with ``n = prod(spatial)`` positions;
* a relative embedding is indexed by the offset of the context position m from the
  query position n, ``m - n``. The global table has shape ``[2*S_1-1, ..., 2*S_s-1, k, u]``
  and holds the offset ``m - n`` at index ``m - n + S - 1``; the local kernel has shape
  ``[r, ..., r, k, u]`` and holds the offset ``m - n`` at index ``m - n + (r - 1) // 2``.
  With ``r = 2*S - 1`` the two are the same array and give the same position lambdas.
* position lambdas: ``[batch, n, k, v]``, accumulated in float32 (or wider).
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

_CONV_DIMENSION_NUMBERS = {
    1: ("NHC", "HIO", "NHC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype sums over positions accumulate in: float32, or wider if ``dtype`` is."""
    return jnp.promote_types(dtype, jnp.float32)


def relative_position_index(spatial_shape: Sequence[int]) -> np.ndarray:
    """Flat index into a relative table for every (query, context) pair.

    Args:
      spatial_shape: ``(S_1, ..., S_s)``.

    Returns:
      int32 array ``[n, n]``: entry ``[n, m]`` is the row of the table flattened to
      ``[prod(2*S_i - 1), k, u]`` that holds the offset ``m - n``.
    """
    index = np.zeros((1, 1), dtype=np.int64)
    for size in spatial_shape:
        pos = np.arange(size)
        offset = pos[None, :] - pos[:, None] + size - 1  # [S, S], m - n shifted to >= 0
        index = index[:, None, :, None] * (2 * size - 1) + offset[None, :, None, :]
        index = index.reshape(index.shape[0] * size, index.shape[2] * size)
    return index.astype(np.int32)


def relative_embeddings(table: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Expands a relative table to the embeddings E of every (query, context) pair.

    Args:
      table: ``[2*S_1-1, ..., 2*S_s-1, k, u]``.
      spatial_shape: ``(S_1, ..., S_s)``.

    Returns:
      ``[n, n, k, u]`` with ``E[n, m] = table[m - n + S - 1]``.
    """
    s = len(spatial_shape)
    chex.assert_shape(table, [2 * size - 1 for size in spatial_shape] + [None, None])
    flat = table.reshape((-1,) + table.shape[s:])
    return flat[relative_position_index(spatial_shape)]


def global_position_lambdas(values: jax.Array, table: jax.Array) -> jax.Array:
    """Position lambdas over the whole input, ``λp_n = Σ_m,u E[n,m,k,u] V[m,v,u]``.

    Args:
      values: ``[batch, *spatial, v, u]``.
      table: ``[2*S_1-1, ..., 2*S_s-1, k, u]``.

    Returns:
      ``[batch, n, k, v]`` in ``accumulation_dtype(values.dtype)``.
    """
    spatial = values.shape[1:-2]
    embeddings = relative_embeddings(table, spatial).astype(values.dtype)
    flat_values = values.reshape(values.shape[0], -1, *values.shape[-2:])
    return jnp.einsum(
        "nmku,bmvu->bnkv",
        embeddings,
        flat_values,
        preferred_element_type=accumulation_dtype(values.dtype),
    )


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
