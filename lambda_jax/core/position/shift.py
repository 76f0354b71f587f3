"""The local position term of the output as r^s shifted value slices weighted by ``q·E``, with
a custom gradient of the same shifted passes."""

from __future__ import annotations

import itertools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from lambda_jax.core.numerics import accumulation_dtype


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
