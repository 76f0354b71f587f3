"""Relative multi-head self-attention for images: the self-attention baseline of the paper.

The layer follows Ramachandran et al. 2019 ("Stand-Alone Self-Attention in Vision Models",
arXiv 1906.05909), the "local relative self-attention" row of the LambdaNetworks paper's
Table 3: queries, keys and values are 1x1 projections without bias, and each query attends to
an r x r neighbourhood (``window=r``) or to the whole image (``window=None``) with logits

    logit[n, m] = q_n · k_m + q_n[:d/2] · R_row[y_m - y_n] + q_n[d/2:] · R_col[x_m - x_n]

where d is the per-head key depth and the row and column offset embeddings (``d/2`` each,
shared by the heads) are concatenated as in that paper. Queries are scaled by ``d^-1/2``.
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lambda_jax.layers import position as position_lib


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention over 2-D positions with relative position logits.

    Input ``x``: ``[batch, height, width, channels]``; output ``[batch, height, width, dim_out]``.
    With ``h = heads``, ``d = key_depth`` (default ``dim_out // heads``), ``v = dim_out // heads``:
    queries and keys ``[batch, height, width, h, d]``, values ``[batch, height, width, h, v]``;
    the attention weights are ``[batch, height, width, h, r*r]`` for ``window=r`` and
    ``[batch, h, height*width, height*width]`` for global attention, whose row and column
    tables ``[2*height-1, d/2]``, ``[2*width-1, d/2]`` fix the input size at init.
    Local windows are zero padded at the border and padded positions are masked out.
    Logits and the softmax are computed in float32 whatever ``dtype`` is.

    Attributes:
      dim_out: output channels; divisible by ``heads``.
      heads: number of attention heads.
      key_depth: per-head query/key depth d (even); ``None`` means ``dim_out // heads``.
      window: odd side r of the local neighbourhood, or ``None`` for global attention.
      dtype: compute dtype (``None``: from the input and the parameters).
      param_dtype: parameter dtype.
    """

    dim_out: int
    heads: int = 8
    key_depth: Optional[int] = None
    window: Optional[int] = 7
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def _depths(self) -> tuple[int, int]:
        if self.dim_out < 1 or self.heads < 1 or self.dim_out % self.heads:
            raise ValueError(
                f"RelativeSelfAttention.dim_out ({self.dim_out}) must be a positive multiple "
                f"of heads ({self.heads})."
            )
        key_depth = self.key_depth or self.dim_out // self.heads
        if key_depth % 2:
            raise ValueError(
                "RelativeSelfAttention.key_depth must be even (half of it embeds row "
                f"offsets, half column offsets), got {key_depth}."
            )
        if self.window is not None and (self.window < 1 or self.window % 2 == 0):
            raise ValueError(
                f"RelativeSelfAttention.window must be a positive odd number or None, got "
                f"{self.window}."
            )
        return key_depth, self.dim_out // self.heads

    def _table(self, name: str, rows: int, depth: int, size: int) -> jax.Array:
        if self.has_variable("params", name):
            built = self.get_variable("params", name).shape[0]
            if built != rows:
                raise ValueError(
                    "RelativeSelfAttention with window=None was built for inputs with "
                    f"{(built + 1) // 2} rows/columns and cannot be applied to {size}; use "
                    "a local window or build the layer at the new size."
                )
        return self.param(name, nn.initializers.normal(depth**-0.5), (rows, depth), self.param_dtype)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[batch, height, width, channels]``.

        Returns:
          ``[batch, height, width, dim_out]``.
        """
        chex.assert_rank(x, 4)
        key_depth, value_depth = self._depths()
        batch, height, width, _ = x.shape
        h = self.heads

        def projection(features: int, name: str) -> nn.Dense:
            return nn.Dense(
                features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )

        queries = projection(h * key_depth, "query")(x) * key_depth**-0.5
        keys = projection(h * key_depth, "key")(x)
        values = projection(h * value_depth, "value")(x)
        compute_dtype = values.dtype
        accumulate = position_lib.accumulation_dtype(compute_dtype)
        queries = queries.reshape(batch, height, width, h, key_depth)
        keys = keys.reshape(batch, height, width, h, key_depth)
        values = values.reshape(batch, height, width, h, value_depth)
        half = key_depth // 2
        if self.window is None:
            row_table = self._table("row_embeddings", 2 * height - 1, half, height)
            col_table = self._table("column_embeddings", 2 * width - 1, half, width)
            out = _global_attention(queries, keys, values, row_table, col_table, accumulate)
        else:
            row_table = self._table("row_embeddings", self.window, half, height)
            col_table = self._table("column_embeddings", self.window, half, width)
            out = _local_attention(queries, keys, values, row_table, col_table, accumulate)
        out = out.astype(compute_dtype).reshape(batch, height, width, self.dim_out)
        chex.assert_shape(out, (batch, height, width, self.dim_out))
        return out


def _offset_logits(queries: jax.Array, row_table: jax.Array, col_table: jax.Array, accumulate):
    """Row and column offset logits ``[batch, height, width, heads, rows]`` and ``[..., cols]``."""
    half = row_table.shape[-1]
    row = jnp.einsum(
        "byxhd,rd->byxhr",
        queries[..., :half],
        row_table.astype(queries.dtype),
        preferred_element_type=accumulate,
    )
    col = jnp.einsum(
        "byxhd,rd->byxhr",
        queries[..., half:],
        col_table.astype(queries.dtype),
        preferred_element_type=accumulate,
    )
    return row, col


def _global_attention(queries, keys, values, row_table, col_table, accumulate) -> jax.Array:
    """Attention of every position to every position; returns ``[batch, H, W, heads, v]``."""
    batch, height, width, h, _ = queries.shape
    row, col = _offset_logits(queries, row_table, col_table, accumulate)
    # Offset y_m - y_n sits at table index y_m - y_n + height - 1.
    row_index = np.arange(height)[None, :] - np.arange(height)[:, None] + height - 1
    col_index = np.arange(width)[None, :] - np.arange(width)[:, None] + width - 1
    row = jnp.take_along_axis(row, row_index[None, :, None, None, :], axis=-1)  # [b,H,W,h,H']
    col = jnp.take_along_axis(col, col_index[None, None, :, None, :], axis=-1)  # [b,H,W,h,W']
    content = jnp.einsum(
        "byxhd,bpqhd->byxhpq", queries, keys, preferred_element_type=accumulate
    )
    logits = content + row[..., :, None] + col[..., None, :]
    weights = jax.nn.softmax(logits.reshape(batch, height, width, h, -1), axis=-1)
    flat_values = values.reshape(batch, height * width, h, -1)
    return jnp.einsum(
        "byxhm,bmhv->byxhv",
        weights.astype(values.dtype),
        flat_values,
        preferred_element_type=accumulate,
    )


def _windows(x: jax.Array, window: int) -> jax.Array:
    """``[batch, H, W, ...]`` -> ``[batch, H, W, window*window, ...]``, zero padded."""
    pad = window // 2
    height, width = x.shape[1:3]
    padded = jnp.pad(x, [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 3))
    return jnp.stack(
        [
            padded[:, dy : dy + height, dx : dx + width]
            for dy in range(window)
            for dx in range(window)
        ],
        axis=3,
    )


def _local_attention(queries, keys, values, row_table, col_table, accumulate) -> jax.Array:
    """Attention within r x r windows; returns ``[batch, H, W, heads, v]``."""
    batch, height, width, h, _ = queries.shape
    window = row_table.shape[0]
    row, col = _offset_logits(queries, row_table, col_table, accumulate)
    position = (row[..., :, None] + col[..., None, :]).reshape(batch, height, width, h, -1)
    key_windows = _windows(keys, window)  # [b, H, W, r*r, h, d]
    value_windows = _windows(values, window)  # [b, H, W, r*r, h, v]
    inside = _windows(jnp.ones((1, height, width), jnp.bool_), window)[0]  # [H, W, r*r]
    content = jnp.einsum(
        "byxhd,byxjhd->byxhj", queries, key_windows, preferred_element_type=accumulate
    )
    logits = jnp.where(inside[None, :, :, None, :], content + position, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum(
        "byxhj,byxjhv->byxhv",
        weights.astype(values.dtype),
        value_windows,
        preferred_element_type=accumulate,
    )
