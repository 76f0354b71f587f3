"""The lambda convolution of an image as one matrix product with banded kernel matrices."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from lambda_jax.core.numerics import accumulation_dtype


def band_block(width: int, receptive_field: int) -> int:
    """Output columns per banded product: fewest multiply-adds, at least 8 columns.

    A block of B output columns reads B + r - 1 input columns; the whole width (B = W)
    needs no padding and reads W columns.
    """
    def cost(block):
        if block >= width:
            return width * width
        return -(-width // block) * block * (block + receptive_field - 1)

    candidates = [block for block in (8, 16, 32, 64) if block < width] + [width]
    return min(candidates, key=cost)


def band_matrices(kernel: jax.Array, width: int, block: int) -> tuple[jax.Array, np.ndarray]:
    """The kernel as banded matrices over blocks of ``block`` output columns.

    Args:
      kernel: ``[r, r, k, u]``.
      width: the image width W.
      block: output columns per block B (``band_block``); ``B = W``: one block, no padding.

    Returns:
      ``bands [r, B, X, k, u]`` with ``bands[dy, x, X] = kernel[dy, X - x]`` inside the
      kernel and 0 outside, and the input columns ``[blocks, X]`` of each block in the
      width zero-padded by ``(r - 1) // 2`` on the left (X = W, or B + r - 1).
    """
    r = kernel.shape[0]
    c = (r - 1) // 2
    if block == width:
        offset = np.arange(width)[None, :] - np.arange(width)[:, None] + c  # [x, X]
        columns = np.arange(width)[None, :] + c
    else:
        offset = np.arange(block + 2 * c)[None, :] - np.arange(block)[:, None]  # [x, X]
        columns = (np.arange(-(-width // block))[:, None] * block
                   + np.arange(block + 2 * c)[None, :])
    inside = (offset >= 0) & (offset < r)  # the offset X - x lies in the kernel
    bands = kernel[:, np.clip(offset, 0, r - 1)] * inside[None, :, :, None, None]
    return bands, columns


def band_windows(values: jax.Array, columns: np.ndarray, c: int, below: int = 0) -> jax.Array:
    """The input columns of every block, with c zero rows above and ``c + below`` below:
    ``[b, H, W, v, u]`` -> ``[b, H + 2c + below, blocks, X, v, u]``."""
    right = columns.max() + 1 - values.shape[2] - c
    return jnp.pad(values, ((0, 0), (c, c + below), (c, right), (0, 0), (0, 0)))[:, :, columns]


def banded_lambda_convolution(values: jax.Array, kernel: jax.Array) -> jax.Array:
    """The lambda convolution of an image as matrix products with banded kernel matrices.

    For each of the r kernel rows and each block of B output columns, the kernel row is a
    ``[B, B + r - 1]`` banded (Toeplitz) matrix per (k, u); the position lambdas are one
    matrix product of those with the value rows each output row sees:
    ``λp[b, y, x, k, v] = Σ_{dy, X, u} V[b, y + dy - c, X, v, u] T[dy, x, X, k, u]``.
    It does ``(B + r - 1) / r`` times the convolution's multiply-adds (with B = W when
    that is fewest), all of them in one dense matrix product.

    Args:
      values: ``[batch, height, width, v, u]``.
      kernel: ``[r, r, k, u]`` (r odd).

    Returns:
      ``[batch, height * width, k, v]`` in ``accumulation_dtype(values.dtype)``, equal to
      ``lambda_convolution(values, kernel)``.
    """
    batch, height, width, depth_v, depth_u = values.shape
    r = kernel.shape[0]
    c = (r - 1) // 2
    chex.assert_shape(kernel, (r, r, None, depth_u))
    bands, columns = band_matrices(kernel.astype(values.dtype), width, band_block(width, r))
    windows = band_windows(values, columns, c)  # [b, H + 2c, blocks, X, v, u]
    rows = jnp.stack([windows[:, dy:dy + height] for dy in range(r)], axis=2)
    lambdas = jnp.einsum("bydjXvu,dxXku->byjxkv", rows, bands,
                         preferred_element_type=accumulation_dtype(values.dtype))
    lambdas = lambdas.reshape(batch, height, -1, *lambdas.shape[-2:])[:, :, :width]
    return lambdas.reshape(batch, height * width, *lambdas.shape[-2:])
