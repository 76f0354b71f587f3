"""Position lambdas over the whole input from a relative embedding table (global context).

The table ``[2*S_1-1, ..., 2*S_s-1, k, u]`` holds the offset ``m - n`` (context position
minus query position) at index ``m - n + S - 1``.
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from lambda_jax.core.numerics import accumulation_dtype


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


def _relative_rows(queries: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """``relative_position_index(spatial_shape)[queries]`` computed in the graph: ``[c, n]``."""
    n = math.prod(spatial_shape)
    contexts = np.arange(n)
    rows = 0
    stride = n
    for size in spatial_shape:
        stride //= size
        query_coord = (queries // stride) % size
        context_coord = (contexts // stride) % size
        rows = rows * (2 * size - 1) + context_coord[None, :] - query_coord[:, None] + size - 1
    return rows


def global_position_lambdas(
    values: jax.Array, table: jax.Array, chunk_bytes: int = 2**25
) -> jax.Array:
    """Position lambdas over the whole input, ``λp_n = Σ_m,u E[n,m,k,u] V[m,v,u]``.

    The embeddings E of all (query, context) pairs take ``n*n*k*u`` numbers; when they
    would exceed ``chunk_bytes`` the queries are processed in chunks whose E is built,
    used and rebuilt for the gradient, so memory stays at one chunk's E (plus the
    ``[batch, n, k, v]`` lambdas) instead of growing with n^2.

    Args:
      values: ``[batch, *spatial, v, u]``.
      table: ``[2*S_1-1, ..., 2*S_s-1, k, u]``.
      chunk_bytes: the most memory one chunk's embeddings may take.

    Returns:
      ``[batch, n, k, v]`` in ``accumulation_dtype(values.dtype)``.
    """
    batch, *spatial, depth_v, depth_u = values.shape
    n = math.prod(spatial)
    depth_k = table.shape[-2]
    chex.assert_shape(table, [2 * size - 1 for size in spatial] + [None, depth_u])
    flat_values = values.reshape(batch, n, depth_v, depth_u)
    accumulate = accumulation_dtype(values.dtype)
    row_bytes = n * depth_k * depth_u * jnp.dtype(values.dtype).itemsize
    chunk = max((c for c in range(1, n + 1) if n % c == 0 and c * row_bytes <= chunk_bytes),
                default=1)
    if chunk == n:
        embeddings = relative_embeddings(table, spatial).astype(values.dtype)
        return jnp.einsum(
            "nmku,bmvu->bnkv", embeddings, flat_values, preferred_element_type=accumulate
        )
    flat_table = table.reshape(-1, depth_k, depth_u).astype(values.dtype)

    @jax.checkpoint
    def one_chunk(start):
        embeddings = flat_table[_relative_rows(start + jnp.arange(chunk), spatial)]
        return jnp.einsum(
            "nmku,bmvu->bnkv", embeddings, flat_values, preferred_element_type=accumulate
        )

    out = jax.lax.map(one_chunk, jnp.arange(0, n, chunk))  # [n // chunk, batch, chunk, k, v]
    return jnp.moveaxis(out, 0, 1).reshape(batch, n, depth_k, depth_v)
