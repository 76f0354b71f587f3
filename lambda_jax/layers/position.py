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

import itertools
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


def _band_block(width: int, receptive_field: int) -> int:
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


def _band_matrices(kernel: jax.Array, width: int, block: int) -> tuple[jax.Array, np.ndarray]:
    """The kernel as banded matrices over blocks of ``block`` output columns.

    Args:
      kernel: ``[r, r, k, u]``.
      width: the image width W.
      block: output columns per block B (``_band_block``); ``B = W``: one block, no padding.

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


def _band_windows(values: jax.Array, columns: np.ndarray, c: int, below: int = 0) -> jax.Array:
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
    bands, columns = _band_matrices(kernel.astype(values.dtype), width, _band_block(width, r))
    windows = _band_windows(values, columns, c)  # [b, H + 2c, blocks, X, v, u]
    rows = jnp.stack([windows[:, dy:dy + height] for dy in range(r)], axis=2)
    lambdas = jnp.einsum("bydjXvu,dxXku->byjxkv", rows, bands,
                         preferred_element_type=accumulation_dtype(values.dtype))
    lambdas = lambdas.reshape(batch, height, -1, *lambdas.shape[-2:])[:, :, :width]
    return lambdas.reshape(batch, height * width, *lambdas.shape[-2:])


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
    block = _band_block(width, r)
    bands, columns = _band_matrices(kernel.astype(dtype), width, block)
    blocks, span = columns.shape
    # [r, B, X, k, u] -> [(dy, X, u), (x, k)]: the contraction of one matrix product.
    bands = jnp.transpose(bands, (0, 2, 4, 1, 3)).reshape(r * span * depth_u, block * depth_k)
    row_bytes = batch * blocks * depth_v * r * span * depth_u * jnp.dtype(dtype).itemsize
    rows = _tile_rows(height, row_bytes, tile_bytes)
    tiles = -(-height // rows)
    below = tiles * rows - height  # zero rows that even the tiles out, cut from the output
    # [b, H + 2c + below, blocks, X, v, u] -> [b, blocks, v, H + 2c + below, X, u]: a tile's
    # r shifted row windows then stack into [..., rows, r, X, u], the contraction contiguous.
    windows = jnp.transpose(_band_windows(values, columns, c, below), (0, 2, 4, 1, 3, 5))
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


def _offsets(receptive_field: int, spatial: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
    """The kernel offsets that reach into the input: ``(flat kernel index, start)`` pairs.

    ``start`` is the offset's corner in the input zero-padded by ``(r - 1) // 2``; offsets
    whose window lies wholly in the padding add nothing and are left out.
    """
    centre = (receptive_field - 1) // 2
    return [
        (o, start)
        for o, start in enumerate(itertools.product(range(receptive_field), repeat=len(spatial)))
        if all(abs(first - centre) < size for first, size in zip(start, spatial))
    ]


def _shifted(padded: jax.Array, start: Sequence[int], spatial: Sequence[int], axis: int):
    """``padded[..., start_i : start_i + spatial_i, ...]`` over the spatial axes from ``axis``."""
    index = [slice(None)] * padded.ndim
    for i, (first, size) in enumerate(zip(start, spatial)):
        index[axis + i] = slice(first, first + size)
    return padded[tuple(index)]


def _pad_spatial(x: jax.Array, width: int, axis: int, rank: int) -> jax.Array:
    pads = [(0, 0)] * x.ndim
    for i in range(rank):
        pads[axis + i] = (width, width)
    return jnp.pad(x, pads)


def _weights(queries: jax.Array, kernel: jax.Array) -> jax.Array:
    """a = q·E: ``[batch, *spatial, h, k]``, ``[o, k, u]`` -> ``[o, u, batch, *spatial, h]``."""
    return jnp.einsum("...hk,oku->ou...h", queries, kernel)


def _offset_kernel(kernel: jax.Array, offsets) -> jax.Array:
    """The kernel rows of ``offsets``: ``[r, ..., r, k, u]`` -> ``[len(offsets), k, u]``."""
    s = kernel.ndim - 2
    flat = kernel.reshape(-1, *kernel.shape[s:])
    return flat[np.array([o for o, _ in offsets])]


def _shift_output(queries, values, kernel):
    """Σ_o,u a[o,u,n,h] V[n+o,v,u] over the r^s shifted value slices: ``[batch, *spatial, h*v]``.

    Each head's sum is one elementwise pass whose output keeps v as its last axis; the heads
    are then concatenated. Written as one ``[..., h, v]`` sum reshaped to ``h*v``, XLA's CPU
    fusion recovers h and v from the flat index of every element and runs 15x slower.
    """
    batch, *spatial, _, depth_u = values.shape
    s = len(spatial)
    r = kernel.shape[0]
    offsets = _offsets(r, spatial)
    weights = _weights(queries, _offset_kernel(kernel, offsets))
    padded = _pad_spatial(values, (r - 1) // 2, 1, s)
    windows = [_shifted(padded, start, spatial, 1) for _, start in offsets]  # [b, *S, v, u]
    heads = []
    for head in range(queries.shape[-2]):
        out = 0
        for o, window in enumerate(windows):
            for j in range(depth_u):
                out = out + weights[o, j, ..., head, None] * window[..., j]
        heads.append(out)
    return jnp.concatenate(heads, axis=-1)


@jax.custom_vjp
def _shift_output_vjp(queries, values, kernel):
    return _shift_output(queries, values, kernel)


def _shift_output_fwd(queries, values, kernel):
    # The weights a are recomputed in the backward pass: they cost one small matmul and
    # would otherwise keep h*r^s*u numbers per position alive.
    return _shift_output(queries, values, kernel), (queries, values, kernel)


def _shift_output_bwd(residuals, grad):
    """Gradients as r^s shifted passes; XLA's own transpose of the forward is 20x slower.

    grad: ``[batch, *spatial, h*v]``. With a = q·E:
    ``da[o,u,n,h] = Σ_v g[n,h,v] V[n+o,v,u]``, ``dq = Σ_o,u da E``, ``dE = Σ_n,h da q``,
    ``dV[m,v,u] = Σ_o,h a[o,u,m-o,h] g[m-o,h,v]``.
    """
    queries, values, kernel = residuals
    batch, *spatial, depth_v, depth_u = values.shape
    s = len(spatial)
    r, c = kernel.shape[0], (kernel.shape[0] - 1) // 2
    heads = queries.shape[-2]
    grad = grad.reshape(*grad.shape[:-1], heads, depth_v)
    offsets = _offsets(r, spatial)
    offset_kernel = _offset_kernel(kernel, offsets)

    padded_values = _pad_spatial(values, c, 1, s)
    # One product-and-sum over v per (offset, u): as one einsum over u, XLA's CPU backend
    # makes it a batched matmul of [h, v] x [v, u] per position, 5x slower with u = 2 (as
    # fast with u = 1; benchmarks/roofline.py, scope table).
    grad_weights = jnp.stack(
        [
            jnp.stack([
                jnp.einsum("...hv,...v->...h", grad, window[..., j]) for j in range(depth_u)
            ])
            for window in (_shifted(padded_values, start, spatial, 1) for _, start in offsets)
        ]
    )  # [offsets, u, batch, *spatial, h]
    grad_queries = jnp.einsum("ou...h,oku->...hk", grad_weights, offset_kernel)
    grad_offsets = jnp.einsum("ou...h,...hk->oku", grad_weights, queries)
    grad_kernel = jnp.zeros((r**s,) + kernel.shape[s:], grad_offsets.dtype)
    grad_kernel = grad_kernel.at[np.array([o for o, _ in offsets])].set(grad_offsets)

    weights = _pad_spatial(_weights(queries, offset_kernel), c, 3, s)
    grad_by_head = _pad_spatial(jnp.moveaxis(grad, -2, 0), c, 2, s)  # [h, batch, *S+2c, v]
    grad_values = [0] * depth_u
    for o, (_, start) in enumerate(offsets):
        source = [2 * c - first for first in start]  # the query m - o of context position m
        for j in range(depth_u):
            for head in range(heads):
                grad_values[j] = grad_values[j] + (
                    _shifted(weights[o, j, ..., head], source, spatial, 1)[..., None]
                    * _shifted(grad_by_head[head], source, spatial, 1)
                )
    grad_values = jnp.stack(grad_values, axis=-1)
    return (
        grad_queries.astype(queries.dtype),
        grad_values.astype(values.dtype),
        grad_kernel.reshape(kernel.shape).astype(kernel.dtype),
    )


_shift_output_vjp.defvjp(_shift_output_fwd, _shift_output_bwd)


def shifted_position_output(queries: jax.Array, values: jax.Array, kernel: jax.Array) -> jax.Array:
    """The queries applied to the lambda convolution's position lambdas, ``Σ_k q λp``.

    Equal to ``einsum("bnhk,bnkv->bnhv", queries, lambda_convolution(values, kernel))`` with
    heads and values merged, but computed in the other order: the queries are contracted
    with the kernel first, ``a = q·E`` (``[batch, *spatial, h]`` per offset and u), then the
    r^s shifted value slices are summed weighted by ``a`` (h*(k+v) instead of k*v
    multiply-adds per offset). The gradients are computed by the same shifted passes, which
    is faster than the convolution's own gradient.

    Args:
      queries: ``[batch, *spatial, h, k]``.
      values: ``[batch, *spatial, v, u]``.
      kernel: ``[r, ..., r, k, u]`` (one r per spatial axis, r odd).

    Returns:
      ``[batch, *spatial, h*v]`` (head-major) in ``accumulation_dtype(values.dtype)``.
    """
    batch, *spatial, depth_v, depth_u = values.shape
    s = len(spatial)
    chex.assert_rank(kernel, s + 2)
    chex.assert_shape(queries, (batch, *spatial, None, kernel.shape[-2]))
    chex.assert_shape(kernel, (kernel.shape[0],) * s + (None, depth_u))
    accumulate = accumulation_dtype(values.dtype)
    out = _shift_output_vjp(
        queries.astype(accumulate), values.astype(accumulate), kernel.astype(accumulate)
    )
    chex.assert_shape(out, (batch, *spatial, queries.shape[-2] * depth_v))
    return out


# Formulations of the local position term. Those in LAMBDA_IMPLEMENTATIONS build the
# position lambdas [batch, n, k, v]; those in OUTPUT_IMPLEMENTATIONS go straight to the
# output [batch, *spatial, h*v]. All give equal values and gradients.
LAMBDA_IMPLEMENTATIONS = ("conv", "banded")
OUTPUT_IMPLEMENTATIONS = ("shift", "tiled")
IMPLEMENTATIONS = ("auto",) + LAMBDA_IMPLEMENTATIONS + OUTPUT_IMPLEMENTATIONS
# Formulations written for images [batch, height, width, ...] only.
IMAGE_IMPLEMENTATIONS = ("banded", "tiled")
# On CPU, sequences and volumes use "shift" up to this many kernel offsets times u, "conv"
# above it: the shifted sums unroll one term per offset, u and head, so their compile time
# grows with them.
SHIFT_MAX_OFFSETS = 169


def _check_images(implementation: str, spatial: Sequence[int]) -> None:
    if implementation in IMAGE_IMPLEMENTATIONS and len(spatial) != 2:
        raise ValueError(
            f"implementation={implementation!r} needs images [batch, height, width, "
            f"channels]; got {len(spatial)} spatial axes {tuple(spatial)}. Use 'auto', "
            "'shift' or 'conv'."
        )


def resolve_local_implementation(
    implementation: str,
    spatial: Sequence[int],
    receptive_field: int,
    dim_u: int,
    backend: str | None = None,
) -> str:
    """The formulation that computes a local layer: ``implementation`` with ``"auto"``
    resolved for inputs of spatial size ``spatial`` (1 to 3 axes) and an r^s x u kernel.

    ``"auto"`` depends on the backend the computation is compiled for:

    * images, every backend: ``"tiled"``. Its compiled training memory (XLA's memory
      analysis of a layer's gradient step) is 0.3-0.85x ``"conv"``'s at every lambda shape of
      the Table 3 ResNet-50s and the LambdaResNets (r=23 with u=1, r=7 with u=4; at most
      1.25x is asserted by tests/test_memory.py), where ``"banded"`` takes 1.6-5.2x. On CPU
      it is also the fastest formulation at the r=23 shapes but the 7x7 one; at the r=7, u=4
      shapes ``"banded"`` or ``"shift"`` trains up to 1.35x faster at 1.7-3.5x ``"conv"``'s
      memory (benchmarks/README.md, ``benchmarks/local_formulations.py``). On GPU and TPU
      no measurement exists yet; ``"tiled"`` is chosen there because all of its work is
      dense matrix products (which run on the tensor cores and the MXU) and it needs the
      least memory. ``"shift"`` is elementwise work on the vector units, ``"conv"`` a
      convolution with u input channels that the convolution units run at a small fraction
      of their rate.
    * sequences and volumes, CPU: ``"shift"`` while ``r ** rank * u <= SHIFT_MAX_OFFSETS``,
      else ``"conv"``.
    * sequences and volumes, GPU and TPU: ``"conv"``, the formulation on the matrix units.

    Args:
      implementation: one of ``IMPLEMENTATIONS``.
      spatial: ``(S_1, ..., S_s)``.
      receptive_field: the scope r.
      dim_u: the intra-depth u.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` (any other name counts as an accelerator);
        ``None``: ``jax.default_backend()`` at trace time.

    Returns:
      A name in ``LAMBDA_IMPLEMENTATIONS`` or ``OUTPUT_IMPLEMENTATIONS``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )
    _check_images(implementation, spatial)
    if implementation != "auto":
        return implementation
    if len(spatial) == 2:
        return "tiled"
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu" and receptive_field ** len(spatial) * dim_u <= SHIFT_MAX_OFFSETS:
        return "shift"
    return "conv"


def local_position_lambdas(
    values: jax.Array, kernel: jax.Array, implementation: str = "conv"
) -> jax.Array:
    """The local position lambdas by a formulation of ``LAMBDA_IMPLEMENTATIONS``.

    Args:
      values: ``[batch, *spatial, v, u]``.
      kernel: ``[r, ..., r, k, u]``.
      implementation: ``"conv"`` (the reference) or ``"banded"`` (images only).

    Returns:
      ``[batch, n, k, v]``.
    """
    if implementation == "conv":
        return lambda_convolution(values, kernel)
    if implementation == "banded":
        _check_images(implementation, values.shape[1:-2])
        return banded_lambda_convolution(values, kernel)
    raise ValueError(
        f"implementation must be one of {LAMBDA_IMPLEMENTATIONS} to build position lambdas, "
        f"got {implementation!r}."
    )


def local_position_output(
    queries: jax.Array, values: jax.Array, kernel: jax.Array, implementation: str = "shift"
) -> jax.Array:
    """The local position term of the output, ``Σ_k q λp``, by a formulation of
    ``OUTPUT_IMPLEMENTATIONS``.

    Args:
      queries: ``[batch, *spatial, h, k]``.
      values: ``[batch, *spatial, v, u]``.
      kernel: ``[r, ..., r, k, u]``.
      implementation: ``"shift"`` or ``"tiled"`` (images only).

    Returns:
      ``[batch, *spatial, h*v]`` (head-major) in ``accumulation_dtype(values.dtype)``.
    """
    if implementation == "shift":
        return shifted_position_output(queries, values, kernel)
    if implementation == "tiled":
        _check_images(implementation, values.shape[1:-2])
        return tiled_position_output(queries, values, kernel)
    raise ValueError(
        f"implementation must be one of {OUTPUT_IMPLEMENTATIONS} for the output term, "
        f"got {implementation!r}."
    )
