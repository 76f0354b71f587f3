"""Relative multi-head self-attention for images: the self-attention baselines of the paper.

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

:class:`AttentionAugmentedConv` is the attention-augmented convolution of Bello et al. 2019,
the "conv + relative self-attention" row of Table 3: a convolution with ``features - d_v``
outputs concatenated with ``d_v`` channels of global relative self-attention.
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lambda_jax.layers import pooling
from lambda_jax.layers import position as position_lib

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
        if self.dim_out < 1 or self.heads < 1 or self.dim_out % self.heads:
            raise ValueError(
                f"RelativeSelfAttention.dim_out ({self.dim_out}) must be a positive multiple "
                f"of heads ({self.heads})."
            )
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
        return _offset_table(self, name, rows, depth, size,
                             "use a local window or build the layer at the new size")

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
        split = self.position_logits == "split"
        table_depth = key_depth // 2 if split else key_depth
        if self.window is None:
            row_table = self._table("row_embeddings", 2 * height - 1, table_depth, height)
            col_table = self._table("column_embeddings", 2 * width - 1, table_depth, width)
            out = _global_attention(
                queries, keys, values, row_table, col_table, split, accumulate
            )
        else:
            row_table = self._table("row_embeddings", self.window, table_depth, height)
            col_table = self._table("column_embeddings", self.window, table_depth, width)
            out = _local_attention(queries, keys, values, row_table, col_table, split, accumulate)
        out = out.astype(compute_dtype).reshape(batch, height, width, self.dim_out)
        chex.assert_shape(out, (batch, height, width, self.dim_out))
        return out


def _offset_table(
    module: nn.Module, name: str, rows: int, depth: int, size: int, remedy: str
) -> jax.Array:
    """The parameter ``name``: an offset embedding table ``[rows, depth]``, ``N(0, depth^-1/2)``.

    A global table (``rows = 2 * size - 1``) fixes the input size at init; applying the layer
    to another size raises an error that ends with ``remedy``, what the user can do instead.
    """
    if module.has_variable("params", name):
        built = module.get_variable("params", name).shape[0]
        if built != rows:
            raise ValueError(
                f"{type(module).__name__} was built for inputs with {(built + 1) // 2} "
                f"rows/columns and cannot be applied to {size}; {remedy}."
            )
    return module.param(
        name, nn.initializers.normal(depth**-0.5), (rows, depth), module.param_dtype
    )


def _offset_logits(
    queries: jax.Array, row_table: jax.Array, col_table: jax.Array, split: bool, accumulate
):
    """Row and column offset logits ``[batch, height, width, heads, rows]`` and ``[..., cols]``.

    ``split``: the row table meets the first half of each query and the column table the
    second; otherwise both meet the whole query.
    """
    row_queries = col_queries = queries
    if split:
        half = row_table.shape[-1]
        row_queries, col_queries = queries[..., :half], queries[..., half:]
    row = jnp.einsum(
        "byxhd,rd->byxhr",
        row_queries,
        row_table.astype(queries.dtype),
        preferred_element_type=accumulate,
    )
    col = jnp.einsum(
        "byxhd,rd->byxhr",
        col_queries,
        col_table.astype(queries.dtype),
        preferred_element_type=accumulate,
    )
    return row, col


def _global_attention(
    queries, keys, values, row_table, col_table, split, accumulate
) -> jax.Array:
    """Attention of every position to every position; returns ``[batch, H, W, heads, v]``."""
    batch, height, width, h, _ = queries.shape
    row, col = _offset_logits(queries, row_table, col_table, split, accumulate)
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


def windows(x: jax.Array, window: int, mode: str = "constant") -> jax.Array:
    """``[batch, H, W, ...]`` -> ``[batch, H, W, window*window, ...]``, row-major offsets.

    ``mode``: ``jnp.pad`` mode of the border, ``"constant"`` (zeros) or ``"reflect"``.
    """
    pad = window // 2
    height, width = x.shape[1:3]
    padded = jnp.pad(x, [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 3), mode=mode)
    return jnp.stack(
        [
            padded[:, dy : dy + height, dx : dx + width]
            for dy in range(window)
            for dx in range(window)
        ],
        axis=3,
    )


def _local_attention(
    queries, keys, values, row_table, col_table, split, accumulate
) -> jax.Array:
    """Attention within r x r windows; returns ``[batch, H, W, heads, v]``."""
    batch, height, width, h, _ = queries.shape
    window = row_table.shape[0]
    row, col = _offset_logits(queries, row_table, col_table, split, accumulate)
    position = (row[..., :, None] + col[..., None, :]).reshape(batch, height, width, h, -1)
    key_windows = windows(keys, window)  # [b, H, W, r*r, h, d]
    value_windows = windows(values, window)  # [b, H, W, r*r, h, v]
    inside = windows(jnp.ones((1, height, width), jnp.bool_), window)[0]  # [H, W, r*r]
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
        value_depth = self.dim_out // h
        lines = x if axis == "height" else jnp.swapaxes(x, 1, 2)  # attend along axis 1
        batch, length, others, _ = lines.shape

        def projection(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, use_bias=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"{axis}_{name}")

        # Lines are attended independently: fold them into the batch, one column each.
        lines = jnp.swapaxes(lines, 1, 2).reshape(batch * others, length, 1, -1)
        queries = projection(h * key_depth, "query")(lines) * key_depth**-0.5
        keys = projection(h * key_depth, "key")(lines)
        values = projection(h * value_depth, "value")(lines)
        compute_dtype = values.dtype
        table = _offset_table(
            self, f"{axis}_embeddings", 2 * length - 1, key_depth, length,
            "build the layer at the new size"
        )
        shape = (batch * others, length, 1, h)
        out = _global_attention(
            queries.reshape(*shape, key_depth),
            keys.reshape(*shape, key_depth),
            values.reshape(*shape, value_depth),
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
        if self.dim_out < 1 or self.heads < 1 or self.dim_out % self.heads:
            raise ValueError(
                f"AxialSelfAttention.dim_out ({self.dim_out}) must be a positive multiple of "
                f"heads ({self.heads})."
            )
        if self.key_depth is not None and self.key_depth < 1:
            raise ValueError(
                f"AxialSelfAttention.key_depth must be positive or None, got {self.key_depth}."
            )
        out = self._axis_pass(self._axis_pass(x, "height"), "width")
        chex.assert_shape(out, x.shape[:3] + (self.dim_out,))
        return out


class AttentionAugmentedConv(nn.Module):
    """Attention-augmented convolution (Bello et al. 2019, arXiv 1904.09925).

    ``AAConv(x) = Concat[Conv(x), MHA(x)]``: a ``kernel_size`` convolution with
    ``features - value_depth`` outputs and ``value_depth`` channels of global multi-head
    self-attention with relative row and column logits (:class:`RelativeSelfAttention` with
    ``position_logits="sum"``), whose heads are mixed by a 1x1 output projection
    ``W_O [value_depth, value_depth]``. Queries, keys and values are 1x1 projections with
    total depths ``key_depth``, ``key_depth``, ``value_depth`` split over the heads.

    Input ``x``: ``[batch, height, width, channels]``; output
    ``[batch, ceil(height / strides), ceil(width / strides), features]``, the convolution's
    channels first. With ``strides=2`` the convolution is strided and the attention runs on the
    input average-pooled with stride 2 (``stride_pool``; the paper pools 3x3), so
    both parts have the output's size. The relative tables ``[2*H'-1, key_depth/heads]`` and
    ``[2*W'-1, key_depth/heads]`` fix the (pooled) input size ``H' x W'`` at init.
    Projections have no bias (a batch norm follows in a ResNet).

    Attributes:
      features: output channels F_out.
      key_depth: total query/key depth d_k (``kappa * F_out`` in the paper); divisible by
        ``heads``.
      value_depth: attention channels d_v (``upsilon * F_out``); divisible by ``heads``, at
        most ``features`` (equal: no convolution, fully attentional).
      heads: number of heads N_h.
      kernel_size: side of the convolution's kernel.
      strides: 1 or 2.
      stride_pool: the downsampling of the attention input when ``strides=2``, one of
        :data:`lambda_jax.layers.pooling.STRIDE_POOLS`.
      dtype: compute dtype (``None``: from the input and the parameters).
      param_dtype: parameter dtype.
    """

    features: int
    key_depth: int
    value_depth: int
    heads: int = 8
    kernel_size: int = 3
    strides: int = 1
    stride_pool: str = "3x3_symmetric"
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def _check_settings(self) -> None:
        name = "AttentionAugmentedConv"
        if self.heads < 1:
            raise ValueError(f"{name}.heads must be positive, got {self.heads}.")
        for field in ("key_depth", "value_depth"):
            depth = getattr(self, field)
            if depth < 1 or depth % self.heads:
                raise ValueError(
                    f"{name}.{field} ({depth}) must be a positive multiple of heads "
                    f"({self.heads})."
                )
        if self.value_depth > self.features:
            raise ValueError(
                f"{name}.value_depth ({self.value_depth}) must be at most features "
                f"({self.features}): the attention channels are part of the output."
            )
        if self.kernel_size < 1:
            raise ValueError(f"{name}.kernel_size must be positive, got {self.kernel_size}.")
        if self.strides not in (1, 2):
            raise ValueError(f"{name}.strides must be 1 or 2, got {self.strides}.")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[batch, height, width, channels]``.

        Returns:
          ``[batch, ceil(height / strides), ceil(width / strides), features]``.
        """
        chex.assert_rank(x, 4)
        self._check_settings()
        batch, height, width, _ = x.shape
        out_height, out_width = -(-height // self.strides), -(-width // self.strides)
        parts = []
        if self.features > self.value_depth:
            padding = ((self.kernel_size - 1) // 2, self.kernel_size // 2)
            parts.append(
                nn.Conv(
                    self.features - self.value_depth,
                    (self.kernel_size, self.kernel_size),
                    strides=self.strides,
                    padding=(padding, padding),
                    use_bias=False,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name="conv",
                )(x)
            )
        context = x
        if self.strides > 1:
            context = pooling.stride_pool(x, self.stride_pool)
        attended = RelativeSelfAttention(
            dim_out=self.value_depth,
            heads=self.heads,
            key_depth=self.key_depth // self.heads,
            window=None,
            position_logits="sum",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )(context)
        parts.append(
            nn.Dense(
                self.value_depth,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="attention_output",
            )(attended)
        )
        out = jnp.concatenate(parts, axis=-1)
        chex.assert_shape(out, (batch, out_height, out_width, self.features))
        return out
