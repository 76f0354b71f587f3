"""Relative multi-head self-attention over 2-D positions, local or global.

:class:`RelativeSelfAttention` follows Ramachandran et al. 2019 ("Stand-Alone Self-Attention
in Vision Models", arXiv 1906.05909), the "local relative self-attention" row of the
LambdaNetworks paper's Table 3: queries, keys and values are 1x1 projections without bias, and
each query attends to an r x r neighbourhood (``window=r``) or to the whole image
(``window=None``) with logits

    logit[n, m] = q_n · k_m + q_n[:d/2] · R_row[y_m - y_n] + q_n[d/2:] · R_col[x_m - x_n]

where d is the per-head key depth and the row and column offset embeddings (``d/2`` each,
shared by the heads) are concatenated as in that paper (``position_logits="split"``). With
``position_logits="sum"`` the embeddings are those of Bello et al. 2019 ("Attention Augmented
Convolutional Networks", arXiv 1904.09925): ``d`` deep each, both dotted with the whole query,

    logit[n, m] = q_n · k_m + q_n · R_row[y_m - y_n] + q_n · R_col[x_m - x_n].

Queries are scaled by ``d^-1/2`` before all three products.
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.core import position as position_lib
from lambda_jax.layers import attention_ops

POSITION_LOGITS = ("split", "sum")


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention over 2-D positions with relative position logits.

    Input ``x``: ``[batch, height, width, channels]``; output ``[batch, height, width, dim_out]``.
    With ``h = heads``, ``d = key_depth`` (default ``dim_out // heads``), ``v = dim_out // heads``:
    queries and keys ``[batch, height, width, h, d]``, values ``[batch, height, width, h, v]``;
    the attention weights are ``[batch, height, width, h, r*r]`` for ``window=r`` and
    ``[batch, h, height*width, height*width]`` for global attention, whose row and column
    tables ``[2*height-1, e]``, ``[2*width-1, e]`` fix the input size at init (local windows:
    ``[r, e]``), with ``e = d/2`` for ``position_logits="split"`` and ``e = d`` for ``"sum"``.
    Local windows are zero padded at the border and padded positions are masked out.
    Logits and the softmax are computed in float32 whatever ``dtype`` is.

    Attributes:
      dim_out: output channels; divisible by ``heads``.
      heads: number of attention heads.
      key_depth: per-head query/key depth d (even); ``None`` means ``dim_out // heads``.
      window: odd side r of the local neighbourhood, or ``None`` for global attention.
      position_logits: ``"split"`` (Ramachandran et al. 2019: row and column embeddings of
        depth d/2 on the two halves of the query; d must be even) or ``"sum"`` (Bello et al.
        2019: row and column embeddings of depth d, each on the whole query).
      dtype: compute dtype (``None``: from the input and the parameters).
      param_dtype: parameter dtype.
    """

    dim_out: int
    heads: int = 8
    key_depth: Optional[int] = None
    window: Optional[int] = 7
    position_logits: str = "split"
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def _depths(self) -> tuple[int, int]:
        attention_ops.check_multiple_of_heads(
            "RelativeSelfAttention", "dim_out", self.dim_out, self.heads)
        if self.position_logits not in POSITION_LOGITS:
            raise ValueError(
                f"RelativeSelfAttention.position_logits must be one of {POSITION_LOGITS}, got "
                f"{self.position_logits!r}."
            )
        key_depth = self.key_depth or self.dim_out // self.heads
        if key_depth % 2 and self.position_logits == "split":
            raise ValueError(
                "RelativeSelfAttention.key_depth must be even with position_logits='split' "
                f"(half of it embeds row offsets, half column offsets), got {key_depth}."
            )
        if self.window is not None and (self.window < 1 or self.window % 2 == 0):
            raise ValueError(
                f"RelativeSelfAttention.window must be a positive odd number or None, got "
                f"{self.window}."
            )
        return key_depth, self.dim_out // self.heads

    def _table(self, name: str, rows: int, depth: int, size: int) -> jax.Array:
        return attention_ops.offset_table(
            self, name, rows, depth, size, "use a local window or build the layer at the new size"
        )

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
        queries, keys, values = attention_ops.head_projections(
            self, x, self.heads, key_depth, value_depth)
        compute_dtype = values.dtype
        accumulate = position_lib.accumulation_dtype(compute_dtype)
        split = self.position_logits == "split"
        table_depth = key_depth // 2 if split else key_depth
        if self.window is None:
            row_table = self._table("row_embeddings", 2 * height - 1, table_depth, height)
            col_table = self._table("column_embeddings", 2 * width - 1, table_depth, width)
            attend = attention_ops.global_attention
        else:
            row_table = self._table("row_embeddings", self.window, table_depth, height)
            col_table = self._table("column_embeddings", self.window, table_depth, width)
            attend = attention_ops.local_attention
        out = attend(queries, keys, values, row_table, col_table, split, accumulate)
        out = out.astype(compute_dtype).reshape(batch, height, width, self.dim_out)
        chex.assert_shape(out, (batch, height, width, self.dim_out))
        return out
