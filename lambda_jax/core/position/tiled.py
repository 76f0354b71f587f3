"""The local position term of an image's output, tile by tile of output rows, from banded
products that are never held for the whole image."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from lambda_jax.core.numerics import accumulation_dtype
from lambda_jax.core.position.banded import band_block, band_matrices, band_windows


def _tile_rows(height: int, row_bytes: int, tile_bytes: int) -> int:
    """Output rows per tile: as many as fit in ``tile_bytes`` (at least one), then evened
    out over the tiles that takes, so the last tile pads as few rows as possible."""
    rows = min(height, max(1, tile_bytes // row_bytes))
    tiles = -(-height // rows)
    return -(-height // tiles)


def _tiled_output(queries, values, kernel, tile_bytes):
    """``Σ_k q λp`` by banded products over tiles of output rows: ``[batch, H, W, h*v]``."""
    batch, height, width, depth_v, depth_u = values.shape
    heads, depth_k = queries.shape[-2:]
    r = kernel.shape[0]
    c = (r - 1) // 2
    dtype = values.dtype
    accumulate = accumulation_dtype(dtype)
    block = band_block(width, r)
    bands, columns = band_matrices(kernel.astype(dtype), width, block)
    blocks, span = columns.shape
    # [r, B, X, k, u] -> [(dy, X, u), (x, k)]: the contraction of one matrix product.
    bands = jnp.transpose(bands, (0, 2, 4, 1, 3)).reshape(r * span * depth_u, block * depth_k)
    row_bytes = batch * blocks * depth_v * r * span * depth_u * jnp.dtype(dtype).itemsize
    rows = _tile_rows(height, row_bytes, tile_bytes)
    tiles = -(-height // rows)
    below = tiles * rows - height  # zero rows that even the tiles out, cut from the output
    # [b, H + 2c + below, blocks, X, v, u] -> [b, blocks, v, H + 2c + below, X, u]: a tile's
    # r shifted row windows then stack into [..., rows, r, X, u], the contraction contiguous.
    windows = jnp.transpose(band_windows(values, columns, c, below), (0, 2, 4, 1, 3, 5))
    queries = jnp.pad(queries, ((0, 0), (0, below), (0, blocks * block - width), (0, 0),
                                (0, 0)))
    queries = queries.reshape(batch, tiles, rows, blocks, block, heads, depth_k)

    @jax.checkpoint
    def tile(start, tile_queries):
        window = jax.lax.dynamic_slice_in_dim(windows, start, rows + 2 * c, axis=3)
        stacked = jnp.stack([window[:, :, :, dy:dy + rows] for dy in range(r)], axis=4)
        lambdas = jnp.dot(stacked.reshape(-1, bands.shape[0]), bands,
                          preferred_element_type=accumulate)
        lambdas = lambdas.reshape(batch, blocks, depth_v, rows, block, depth_k)
        return jnp.einsum("btjxhk,bjvtxk->btjxhv", tile_queries, lambdas.astype(dtype),
                          preferred_element_type=accumulate)

    out = jax.lax.map(lambda args: tile(*args),
                      (jnp.arange(tiles) * rows, jnp.moveaxis(queries, 1, 0)))
    out = jnp.moveaxis(out, 0, 1).reshape(batch, tiles * rows, blocks * block, heads * depth_v)
    return out[:, :height, :width]


def tiled_position_output(queries: jax.Array, values: jax.Array, kernel: jax.Array,
                          tile_bytes: int = 2**21) -> jax.Array:
    """The queries applied to an image's position lambdas, ``Σ_k q λp``, tile by tile.

    The position lambdas of a tile of output rows are one matrix product of the value rows
    it sees with banded kernel matrices (as :func:`banded_lambda_convolution`), contracted
    with the tile's queries at once; the tiles run one after another and each is recomputed
    in the backward pass, so neither the band rows nor the ``[batch, n, k, v]`` position
    lambdas of the whole image are ever held: memory is one tile's band rows
    (``tile_bytes``, or one output row's where a row needs more) on top of the inputs and the
    output.

    Args:
      queries: ``[batch, height, width, h, k]``.
      values: ``[batch, height, width, v, u]``.
      kernel: ``[r, r, k, u]`` (r odd).
      tile_bytes: the most memory one tile's band rows may take (2 MiB: larger tiles were
        no faster on CPU at the Table 3 layers and take more memory).

    Returns:
      ``[batch, height, width, h*v]`` (head-major) in ``accumulation_dtype(values.dtype)``,
      equal to ``einsum("bnhk,bnkv->bnhv", queries, lambda_convolution(values, kernel))``.
    """
    batch, height, width, depth_v, depth_u = values.shape
    chex.assert_shape(queries, (batch, height, width, None, kernel.shape[-2]))
    chex.assert_shape(kernel, (kernel.shape[0], kernel.shape[0], None, depth_u))
    out = _tiled_output(queries, values, kernel, tile_bytes)
    chex.assert_shape(out, (batch, height, width, queries.shape[-2] * depth_v))
    return out
