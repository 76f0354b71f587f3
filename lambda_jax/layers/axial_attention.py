"""Axial self-attention: global attention along the height, then along the width."""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.core import position as position_lib
from lambda_jax.layers import attention_ops


class AxialSelfAttention(nn.Module):
    """Axial self-attention (Ho et al. 2019, arXiv 1912.12180; Wang et al. 2020, "Axial-DeepLab",
    arXiv 2003.07853): the "axial self-attention" row of the LambdaNetworks paper's Table 4.

    Two multi-head attention passes, each global along one axis: every position attends to its
    column (the height pass), then the result to its row (the width pass), so information
    reaches the whole image in two steps and the weights take ``[batch, h, n, height]`` and
    ``[batch, h, n, width]`` instead of ``[batch, h, n, n]``. Each pass has its own 1x1
    query, key and value projections (no bias) and relative logits along its axis,
    ``logit[n, m] = q_n · k_m + q_n · R[p_m - p_n]`` with queries scaled by ``d^-1/2``.

    Input ``x``: ``[batch, height, width, channels]``; output ``[batch, height, width,
    dim_out]``. With ``h = heads``, ``d = key_depth`` (default ``dim_out // heads``) and
    ``v = dim_out // heads``, the tables ``[2*height-1, d]`` and ``[2*width-1, d]`` fix the
    input size at init. Logits and the softmax are computed in float32 whatever ``dtype`` is.

    Attributes:
      dim_out: output channels of both passes; divisible by ``heads``.
      heads: number of attention heads.
      key_depth: per-head query/key depth d; ``None`` means ``dim_out // heads``.
      dtype: compute dtype (``None``: from the input and the parameters).
      param_dtype: parameter dtype.
    """

    dim_out: int
    heads: int = 8
    key_depth: Optional[int] = None
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def _axis_pass(self, x: jax.Array, axis: str) -> jax.Array:
        """Attention along ``axis`` ("height" or "width") of ``x`` ``[batch, H, W, C]``."""
        h = self.heads
        key_depth = self.key_depth or self.dim_out // h
        lines = x if axis == "height" else jnp.swapaxes(x, 1, 2)  # attend along axis 1
        batch, length, others, _ = lines.shape
        # Lines are attended independently: fold them into the batch, one column each.
        lines = jnp.swapaxes(lines, 1, 2).reshape(batch * others, length, 1, -1)
        queries, keys, values = attention_ops.head_projections(
            self, lines, h, key_depth, self.dim_out // h, prefix=f"{axis}_")
        compute_dtype = values.dtype
        table = attention_ops.offset_table(
            self, f"{axis}_embeddings", 2 * length - 1, key_depth, length,
            "build the layer at the new size"
        )
        out = attention_ops.global_attention(
            queries,
            keys,
            values,
            table,
            jnp.zeros((1, key_depth), table.dtype),  # one column: no column offsets
            False,
            position_lib.accumulation_dtype(compute_dtype),
        )
        out = out.astype(compute_dtype).reshape(batch, others, length, self.dim_out)
        return out if axis == "width" else jnp.swapaxes(out, 1, 2)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[batch, height, width, channels]``.

        Returns:
          ``[batch, height, width, dim_out]``.
        """
        chex.assert_rank(x, 4)
        attention_ops.check_multiple_of_heads(
            "AxialSelfAttention", "dim_out", self.dim_out, self.heads)
        if self.key_depth is not None and self.key_depth < 1:
            raise ValueError(
                f"AxialSelfAttention.key_depth must be positive or None, got {self.key_depth}."
            )
        out = self._axis_pass(self._axis_pass(x, "height"), "width")
        chex.assert_shape(out, x.shape[:3] + (self.dim_out,))
        return out
