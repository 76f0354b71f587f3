"""The attention-augmented convolution of Bello et al. 2019, the "conv + relative
self-attention" row of the LambdaNetworks paper's Table 3."""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.core import pooling
from lambda_jax.layers.attention_ops import check_multiple_of_heads
from lambda_jax.layers.conv import he_conv
from lambda_jax.layers.relative_attention import RelativeSelfAttention


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
        :data:`lambda_jax.core.pooling.STRIDE_POOLS`.
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
            check_multiple_of_heads(name, field, getattr(self, field), self.heads)
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
            conv_features = self.features - self.value_depth
            parts.append(he_conv(self, conv_features, self.kernel_size, self.strides, "conv")(x))
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
