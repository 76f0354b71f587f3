"""The lambda convolution's output term as fused Pallas kernels (Triton on GPU, Mosaic on TPU,
the interpreter on CPU).

``pallas_position_output(q, V, E)`` equals ``einsum("bnhk,bnkv->bnhv", q,
lambda_convolution(V, E))`` with the heads merged, in value and gradient, and never holds the
``[batch, n, k, v]`` position lambdas in memory: a kernel builds one output row's lambdas on
chip and applies the queries to them at once; the backward pass rebuilds what it needs the
same way.

Layout (arranged by XLA around the kernels):

* The image is cut into strips of ``_STRIP`` output columns. A strip sees ``_STRIP + r - 1``
  value columns (a halo of ``c = (r - 1) // 2`` each side, zero outside the image), copied
  once into ``[rows, (column, u), v]``: a row offset ``dy`` is then a read of whole rows, a
  leading axis (free on TPU, one pointer offset on GPU).
* Along a row the r column offsets are folded into banded matrices,
  ``band[dy][(k, x), (X, u)] = E[dy, X - x, k, u]`` for ``0 <= X - x < r``, so one output
  row's lambdas are r matrix products ``λp[(k, x), v] = Σ_dy band[dy] @ V[y + dy]``.
* Head h's queries are applied as one product with the block-diagonal matrix
  ``Q_h[x', (k, x)] = q[x, h, k] [x == x']``.

Every operation is a 2-D matrix product, an elementwise broadcast or a reduction: Triton
lowers no slicing of values and only 2-D dots, Mosaic no cheap reshape of the lane axis.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.experimental.pallas as pl
import jax.numpy as jnp
import numpy as np

# Blocks. A program holds one strip of one image: all of its value, query and cotangent rows
# (one block, whose index stays the same over the strip's row tiles, so TPU keeps it in VMEM;
# the halo rows are read at an offset in it), and writes a tile of output rows. Blocks cannot
# overlap, so XLA copies out the strips' overlapping column windows once. Every array a kernel
# loads or stores has a power-of-two size and every matrix product sides of at least 16
# (Triton's rules), and the last two dimensions of every block are those of its whole array
# (TPU's rule): sizes are padded, never split.
_STRIP = 16  # output columns per strip
_ROWS = 8  # output rows per program of the row-parallel kernels
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))  # a^T @ b
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a @ b^T


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


class _Layout(NamedTuple):
    """The static sizes of one call (``_layout``)."""

    batch: int
    height: int
    width: int
    heads: int
    depth_k: int
    depth_v: int
    depth_u: int
    r: int
    accumulate: jnp.dtype
    c: int  # the halo, (r - 1) // 2
    strips: int  # strips of _STRIP output columns
    window: int  # the value columns X a strip reads: _STRIP + 2c
    tile_rows: int  # output rows per program of the row-parallel kernels
    tiles: int
    rows: int  # output rows, padded to whole tiles
    padded_rows: int  # rows + 2c: the value, query and cotangent rows of a strip
    kp: int  # k, v and u padded to powers of two
    vp: int
    up: int
    lanes: int  # (X, u) padded to a power of two
    kx: int  # (k, x): kp * _STRIP


def _layout(queries, values, kernel) -> _Layout:
    batch, height, width, depth_v, depth_u = values.shape
    r, depth_k = kernel.shape[0], kernel.shape[2]
    c = (r - 1) // 2
    tile_rows, up = min(_ROWS, height), _pow2(depth_u, least=1)
    tiles = -(-height // tile_rows)
    return _Layout(
        batch=batch, height=height, width=width, heads=queries.shape[-2], depth_k=depth_k,
        depth_v=depth_v, depth_u=depth_u, r=r,
        accumulate=jnp.promote_types(values.dtype, jnp.float32), c=c,
        strips=-(-width // _STRIP), window=_STRIP + 2 * c, tile_rows=tile_rows, tiles=tiles,
        rows=tiles * tile_rows, padded_rows=tiles * tile_rows + 2 * c, kp=_pow2(depth_k),
        vp=_pow2(depth_v), up=up, lanes=_pow2((_STRIP + 2 * c) * up),
        kx=_pow2(depth_k) * _STRIP)


def _window_columns(lay: _Layout) -> np.ndarray:
    """``[strips, window]``: the columns of the width padded by c that each strip reads."""
    return np.arange(lay.strips)[:, None] * _STRIP + np.arange(lay.window)[None, :]


def _bands(kernel: jax.Array, lay: _Layout) -> jax.Array:
    """``[r, r, k, u]`` -> ``band [r, (k, x), (X, u)]`` (zero outside the band)."""
    kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, lay.kp - lay.depth_k), (0, lay.up - lay.depth_u)))
    offset = np.arange(lay.window)[None, :] - np.arange(_STRIP)[:, None]  # [x, X]: X - x
    inside = ((offset >= 0) & (offset < lay.r))[None, :, :, None, None]
    bands = jnp.where(inside, kernel[:, np.clip(offset, 0, lay.r - 1)], 0)  # [r, x, X, k, u]
    bands = jnp.transpose(bands, (0, 3, 1, 2, 4)).reshape(lay.r, lay.kx, -1)
    return jnp.pad(bands, ((0, 0), (0, 0), (0, lay.lanes - bands.shape[-1])))


def _value_strips(values: jax.Array, lay: _Layout) -> jax.Array:
    """``[b, H, W, v, u]`` -> ``[b, strips, padded_rows, (X, u), v]``, c zero rows each side."""
    c = lay.c
    padded = jnp.pad(values, ((0, 0), (c, lay.rows - lay.height + c),
                              (c, lay.strips * _STRIP - lay.width + c),
                              (0, lay.vp - lay.depth_v), (0, lay.up - lay.depth_u)))
    windows = padded[:, :, _window_columns(lay)]  # [b, rows, strips, X, v, u]
    windows = jnp.transpose(windows, (0, 2, 1, 3, 5, 4)).reshape(
        lay.batch, lay.strips, lay.padded_rows, -1, lay.vp)
    return jnp.pad(windows, ((0, 0),) * 3 + ((0, lay.lanes - windows.shape[3]), (0, 0)))


def _query_strips(queries: jax.Array, lay: _Layout) -> jax.Array:
    """``[b, H, W, h, k]`` -> ``[b, strips, padded_rows, h, (k, x)]``, c zero rows each side."""
    padded = jnp.pad(queries, ((0, 0), (lay.c, lay.rows - lay.height + lay.c),
                               (0, lay.strips * _STRIP - lay.width), (0, 0),
                               (0, lay.kp - lay.depth_k)))
    padded = padded.reshape(lay.batch, lay.padded_rows, lay.strips, _STRIP, lay.heads, lay.kp)
    return jnp.transpose(padded, (0, 2, 1, 4, 5, 3)).reshape(
        lay.batch, lay.strips, lay.padded_rows, lay.heads, lay.kx)


def _grad_strips(grad: jax.Array, lay: _Layout) -> jax.Array:
    """``[b, H, W, h*v]`` -> ``[b, strips, padded_rows, h, x, v]``, c zero rows each side."""
    grad = grad.reshape(lay.batch, lay.height, lay.width, lay.heads, lay.depth_v)
    padded = jnp.pad(grad, ((0, 0), (lay.c, lay.rows - lay.height + lay.c),
                            (0, lay.strips * _STRIP - lay.width), (0, 0),
                            (0, lay.vp - lay.depth_v)))
    padded = padded.reshape(lay.batch, lay.padded_rows, lay.strips, _STRIP, lay.heads, lay.vp)
    return jnp.transpose(padded, (0, 2, 1, 4, 3, 5))


def _from_output_strips(out: jax.Array, lay: _Layout) -> jax.Array:
    """``[b, strips, rows, h, x, v]`` -> ``[b, H, W, h*v]``."""
    out = jnp.transpose(out, (0, 2, 1, 4, 3, 5)).reshape(
        lay.batch, lay.rows, lay.strips * _STRIP, lay.heads, lay.vp)
    out = out[:, :lay.height, :lay.width, :, :lay.depth_v]
    return out.reshape(lay.batch, lay.height, lay.width, lay.heads * lay.depth_v)


def _from_query_strips(grad: jax.Array, lay: _Layout) -> jax.Array:
    """``[b, strips, rows, h, (k, x)]`` -> ``[b, H, W, h, k]``."""
    grad = grad.reshape(lay.batch, lay.strips, lay.rows, lay.heads, lay.kp, _STRIP)
    grad = jnp.transpose(grad, (0, 2, 1, 5, 3, 4)).reshape(
        lay.batch, lay.rows, lay.strips * _STRIP, lay.heads, lay.kp)
    return grad[:, :lay.height, :lay.width, :, :lay.depth_k]


def _from_value_strips(grad: jax.Array, lay: _Layout) -> jax.Array:
    """``[b, strips, rows, (X, u), v]`` -> ``[b, H, W, v, u]``, overlapping windows summed."""
    grad = grad[..., :lay.window * lay.up, :].reshape(
        lay.batch, lay.strips, lay.rows, lay.window, lay.up, lay.vp)
    total = jnp.zeros((lay.batch, lay.rows, lay.strips * _STRIP + 2 * lay.c, lay.up, lay.vp),
                      grad.dtype)
    total = total.at[:, :, _window_columns(lay)].add(jnp.moveaxis(grad, 1, 2))
    total = total[:, :lay.height, lay.c:lay.c + lay.width, :lay.depth_u, :lay.depth_v]
    return jnp.swapaxes(total, -1, -2)


# ---- kernels: refs are one strip of one image (block shapes in the calls below) ----


def _selection(lay: _Layout) -> jax.Array:
    """``[x', (k, x)]``: 1 where ``x == x'``; times a row of queries, the matrix ``Q_h``."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (_STRIP, lay.kx), 0)
    columns = jax.lax.broadcasted_iota(jnp.int32, (_STRIP, lay.kx), 1)
    return (columns % _STRIP == rows).astype(lay.accumulate)


def _position_lambdas(bands_ref, values_ref, row, lay):
    """``λp[(k, x), v]`` of output ``row``: one product per kernel row dy."""
    lambdas = jnp.zeros((lay.kx, lay.vp), lay.accumulate)
    for dy in range(lay.r):
        lambdas += jnp.dot(bands_ref[dy], values_ref[row + dy],
                           preferred_element_type=lay.accumulate)
    return lambdas


def _head_queries(queries_ref, row, head, selection):
    """``Q_h [x', (k, x)]`` of a padded query row."""
    return queries_ref[row, pl.ds(head, 1), :].astype(selection.dtype) * selection


def _lambda_grads(queries_ref, grads_ref, row, selection, lay):
    """``dλp[(k, x), v] = Σ_h q_h ⊗ g_h`` of a padded query row."""
    return sum(
        jax.lax.dot_general(_head_queries(queries_ref, row, head, selection), grads_ref[row, head],
                            _CONTRACT_FIRST, preferred_element_type=lay.accumulate)
        for head in range(lay.heads))


def _forward_kernel(lay, bands_ref, values_ref, queries_ref, out_ref):
    first = pl.program_id(2) * lay.tile_rows
    selection = _selection(lay)

    def row(i, carry):
        y = first + i
        lambdas = _position_lambdas(bands_ref, values_ref, y, lay)
        for head in range(lay.heads):
            out_ref[i, head] = jnp.dot(_head_queries(queries_ref, y + lay.c, head, selection),
                                       lambdas, preferred_element_type=lay.accumulate)
        return carry

    jax.lax.fori_loop(0, lay.tile_rows, row, 0)


def _row_grads_kernel(lay, bands_ref, values_ref, queries_ref, grads_ref, dq_ref, dv_ref):
    """dq of a tile's rows and dV of its value rows.

    dV of a value row gathers the lambda gradients of the r output rows that read it, so every
    output element is written once and no program reads another's writes. Each is rebuilt
    (h small products) rather than kept for the next rows: Triton cannot slice a value.
    """
    first = pl.program_id(2) * lay.tile_rows
    selection = _selection(lay)

    def row(i, carry):
        y = first + i
        lambdas = _position_lambdas(bands_ref, values_ref, y, lay)
        for head in range(lay.heads):
            products = jax.lax.dot_general(grads_ref[y + lay.c, head], lambdas, _CONTRACT_LAST,
                                           preferred_element_type=lay.accumulate)  # [x', (k, x)]
            dq_ref[i, pl.ds(head, 1), :] = jnp.sum(products * selection, axis=0, keepdims=True)
        dv = jnp.zeros((lay.lanes, lay.vp), lay.accumulate)
        for dy in range(lay.r):
            # Value row y + c is read at offset dy by output row y + c - dy (padded: y + 2c - dy).
            lambda_grads = _lambda_grads(queries_ref, grads_ref, y + 2 * lay.c - dy, selection, lay)
            dv += jax.lax.dot_general(bands_ref[dy].astype(lay.accumulate), lambda_grads,
                                      _CONTRACT_FIRST, preferred_element_type=lay.accumulate)
        dv_ref[i] = dv
        return carry

    jax.lax.fori_loop(0, lay.tile_rows, row, 0)


def _kernel_grads_kernel(lay, values_ref, queries_ref, grads_ref, de_ref):
    """dE[dy] of one strip: the band's gradient summed over rows, then folded onto the kernel.

    One program per kernel row dy keeps the accumulator one band ([(k, x), (X, u)]) small
    enough for a GPU program's registers; the lambda gradients are rebuilt for each dy.
    """
    dy = pl.program_id(2)
    selection = _selection(lay)

    def row(y, band_grad):
        lambda_grads = _lambda_grads(queries_ref, grads_ref, y + lay.c, selection, lay)
        return band_grad + jax.lax.dot_general(
            lambda_grads, values_ref[y + dy].astype(lay.accumulate), _CONTRACT_LAST,
            preferred_element_type=lay.accumulate)

    band_grad = jax.lax.fori_loop(0, lay.rows, row, jnp.zeros((lay.kx, lay.lanes), lay.accumulate))
    # dE[dy, dx, k, u] = Σ_x band_grad[(k, x), (x + dx, u)]: mask one diagonal, sum over x by
    # a product, then over X lane by lane.
    shape = (lay.kx, lay.lanes)
    offset = (jax.lax.broadcasted_iota(jnp.int32, shape, 1) // lay.up
              - jax.lax.broadcasted_iota(jnp.int32, shape, 0) % _STRIP)
    sum_x = (jax.lax.broadcasted_iota(jnp.int32, (lay.kp, lay.kx), 1) // _STRIP
             == jax.lax.broadcasted_iota(jnp.int32, (lay.kp, lay.kx), 0)).astype(lay.accumulate)
    channel = jax.lax.broadcasted_iota(jnp.int32, (1, lay.lanes), 1) % lay.up
    out_channel = jax.lax.broadcasted_iota(jnp.int32, (1, lay.up), 1)
    for dx in range(lay.r):
        per_k = jnp.dot(sum_x, jnp.where(offset == dx, band_grad, 0),
                        preferred_element_type=lay.accumulate)  # [k, (X, u)]
        de_ref[dx] = sum(
            jnp.where(out_channel == j,
                      jnp.sum(jnp.where(channel == j, per_k, 0), axis=1, keepdims=True), 0)
            for j in range(lay.up))


def _strip_spec(array_shape, tile_rows=None):
    """A block of one strip of one image: all rows, or ``tile_rows`` rows of the grid's tile."""
    if tile_rows is None:
        return pl.BlockSpec((None, None, *array_shape[2:]),
                            lambda b, j, _: (b, j) + (0,) * (len(array_shape) - 2))
    return pl.BlockSpec((None, None, tile_rows, *array_shape[3:]),
                        lambda b, j, t: (b, j, t) + (0,) * (len(array_shape) - 3))


def _whole_spec(array_shape):
    return pl.BlockSpec(tuple(array_shape), lambda *_: (0,) * len(array_shape))


def _forward(queries, values, kernel, lay, interpret):
    bands = _bands(kernel.astype(values.dtype), lay)
    value_strips = _value_strips(values, lay)
    query_strips = _query_strips(queries, lay)
    out_shape = (lay.batch, lay.strips, lay.rows, lay.heads, _STRIP, lay.vp)
    out = pl.pallas_call(
        functools.partial(_forward_kernel, lay),
        grid=(lay.batch, lay.strips, lay.tiles),
        in_specs=[_whole_spec(bands.shape), _strip_spec(value_strips.shape),
                  _strip_spec(query_strips.shape)],
        out_specs=_strip_spec(out_shape, lay.tile_rows),
        out_shape=jax.ShapeDtypeStruct(out_shape, lay.accumulate),
        interpret=interpret,
    )(bands, value_strips, query_strips)
    return _from_output_strips(out, lay)


def _backward(queries, values, kernel, grad, lay, interpret):
    bands = _bands(kernel.astype(values.dtype), lay)
    value_strips = _value_strips(values, lay)
    query_strips = _query_strips(queries, lay)
    grad_strips = _grad_strips(grad.astype(lay.accumulate), lay)
    dq_shape = (lay.batch, lay.strips, lay.rows, lay.heads, lay.kx)
    dv_shape = (lay.batch, lay.strips, lay.rows, lay.lanes, lay.vp)
    strip_specs = [_strip_spec(value_strips.shape), _strip_spec(query_strips.shape),
                   _strip_spec(grad_strips.shape)]
    dq, dv = pl.pallas_call(
        functools.partial(_row_grads_kernel, lay),
        grid=(lay.batch, lay.strips, lay.tiles),
        in_specs=[_whole_spec(bands.shape)] + strip_specs,
        out_specs=[_strip_spec(dq_shape, lay.tile_rows), _strip_spec(dv_shape, lay.tile_rows)],
        out_shape=[jax.ShapeDtypeStruct(dq_shape, lay.accumulate),
                   jax.ShapeDtypeStruct(dv_shape, lay.accumulate)],
        interpret=interpret,
    )(bands, value_strips, query_strips, grad_strips)
    de_shape = (lay.batch, lay.strips, lay.r, lay.r, lay.kp, lay.up)
    de = pl.pallas_call(
        functools.partial(_kernel_grads_kernel, lay),
        grid=(lay.batch, lay.strips, lay.r),
        in_specs=strip_specs,
        out_specs=pl.BlockSpec((None, None, None, lay.r, lay.kp, lay.up),
                               lambda b, j, dy: (b, j, dy, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(de_shape, lay.accumulate),
        interpret=interpret,
    )(value_strips, query_strips, grad_strips)
    de = jnp.sum(de, axis=(0, 1))[:, :, :lay.depth_k, :lay.depth_u]  # one term per program
    return (_from_query_strips(dq, lay).astype(queries.dtype),
            _from_value_strips(dv, lay).astype(values.dtype), de.astype(kernel.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _position_output(queries, values, kernel, interpret):
    return _forward(queries, values, kernel, _layout(queries, values, kernel), interpret)


def _position_output_fwd(queries, values, kernel, interpret):
    # Only the inputs are kept: the backward kernels rebuild lambdas and their gradients.
    lay = _layout(queries, values, kernel)
    return _forward(queries, values, kernel, lay, interpret), (queries, values, kernel)


def _position_output_bwd(interpret, residuals, grad):
    queries, values, kernel = residuals
    return _backward(queries, values, kernel, grad, _layout(queries, values, kernel), interpret)


_position_output.defvjp(_position_output_fwd, _position_output_bwd)


def pallas_position_output(queries: jax.Array, values: jax.Array, kernel: jax.Array, *,
                           interpret: bool | None = None) -> jax.Array:
    """The queries applied to an image's lambda convolution, ``Σ_k q λp``, by Pallas kernels.

    ``λp[b, n, k, v] = Σ_{m in scope(n)} Σ_u E[m - n, k, u] V[b, m, v, u]`` over an r x r
    scope, zero outside the image. The forward pass is one kernel over (batch, strips of 16
    output columns, tiles of 8 output rows); the backward pass is one kernel for the query
    and value gradients over the same grid and one for the kernel's gradient over (batch,
    strips, kernel rows), whose per-program terms XLA sums. All accumulate in float32.

    Args:
      queries: ``[batch, height, width, h, k]``.
      values: ``[batch, height, width, v, u]``.
      kernel: ``[r, r, k, u]``, r odd; index ``o + (r - 1) // 2`` holds the offset ``o = m - n``.
      interpret: run the kernels in Pallas's interpreter; ``None``: on the CPU backend only.

    Returns:
      ``[batch, height, width, h*v]`` (head-major) in ``promote_types(values.dtype, float32)``,
      equal to ``einsum("bnhk,bnkv->bnhv", queries, lambda_convolution(values, kernel))``.
    """
    shapes = (f"queries {tuple(queries.shape)}, values {tuple(values.shape)}, "
              f"kernel {tuple(kernel.shape)}")
    if queries.ndim != 5 or values.ndim != 5 or kernel.ndim != 4:
        raise ValueError("pallas_position_output needs images: queries [batch, height, width, "
                         "h, k], values [batch, height, width, v, u], kernel [r, r, k, u]; got "
                         + shapes + ".")
    if kernel.shape[0] % 2 == 0 or kernel.shape[1] != kernel.shape[0]:
        raise ValueError(f"the kernel must be r x r with r odd; got {shapes}.")
    if kernel.shape[2] != queries.shape[-1] or kernel.shape[3] != values.shape[-1]:
        raise ValueError("the kernel [r, r, k, u] must match the queries' k and the values' u; "
                         f"got {shapes}.")
    chex.assert_rank([queries, values, kernel], [5, 5, 4])
    chex.assert_shape(queries, (*values.shape[:3], None, kernel.shape[2]))
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    out = _position_output(queries, values, kernel, bool(interpret))
    chex.assert_shape(out, (*values.shape[:3], queries.shape[-2] * values.shape[-2]))
    return out
