"""Masked (causal) lambdas for sequences as a flax.linen module, query n seeing only the
context positions m <= n; the maths is :mod:`lambda_jax.core.causal`."""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.core.causal import (
    DecodeState,
    causal_content_lambdas,
    decode_content_step,
    decode_position_step,
    init_decode_state,
)
from lambda_jax.core.content import apply_lambdas
from lambda_jax.core.numerics import accumulation_dtype, project
from lambda_jax.core.position import lambda_convolution
from lambda_jax.core.settings import CAUSAL_POSITIONS, CausalSettings
from lambda_jax.layers.lambda_layer import Kernel

__all__ = ["CAUSAL_POSITIONS", "CausalLambdaLayer", "DecodeState", "causal_content_lambdas",
           "decode_content_step", "decode_position_step", "init_decode_state"]


class CausalLambdaLayer(CausalSettings, nn.Module):
    """Masked lambda layer for sequences: query n sees only the context positions m <= n.

    Input ``x``: ``[batch, length, channels]``; output ``[batch, length, dim_out]``. The
    queries ``[batch, n, h, k]`` and values ``[batch, n, v, u]`` are layer normalised over
    the channels of each position (batch statistics over positions would leak the future
    into the past during training); the keys ``[batch, n, k, u]`` are softmaxed over each
    visible prefix. With ``position="local"`` the position lambdas are the causal lambda
    convolution over the r positions ending at n, whose kernel ``[r, k, u]`` holds the
    offset ``j - (r - 1)`` at index j. The queries are applied to the lambdas by
    :func:`lambda_jax.functional.apply_lambdas`.

    Decode step by step with ``init_decode_state`` and ``decode_state=``: each step costs
    the same at any position.

    Attributes:
      dim_out: output channels; divisible by ``heads``.
      dim_k: query/key depth k.
      heads: number of queries per position h.
      dim_u: intra-depth u.
      position: ``"local"`` (causal lambda convolution) or ``"none"`` (content only).
      receptive_field: scope r of the causal lambda convolution (any positive number).
      use_layernorm: layer-normalise the queries and values.
      epsilon: epsilon of the layer norm.
      dtype: compute dtype (``None``: from the input and the parameters).
      param_dtype: parameter dtype.
    """

    param_dtype: Any = jnp.float32

    __repr__ = nn.Module.__repr__

    def init_decode_state(self, batch_size: int) -> DecodeState:
        """The decoding state before the first position.

        Args:
          batch_size: number of sequences decoded together.

        Returns:
          A ``DecodeState`` for ``apply(variables, x_t, decode_state=state)``.
        """
        window = self.receptive_field - 1 if self.position == "local" else 0
        dtype = self.dtype if self.dtype is not None else self.param_dtype
        return init_decode_state(
            batch_size, self.dim_k, self.dim_u, self.dim_out // self.heads, window, dtype)

    @nn.compact
    def __call__(self, x: jax.Array, decode_state: Optional[DecodeState] = None):
        """Applies the layer.

        Args:
          x: ``[batch, length, channels]``; ``[batch, 1, channels]`` with ``decode_state``.
          decode_state: the state from ``init_decode_state`` or from the previous step.

        Returns:
          ``[batch, length, dim_out]``; with ``decode_state``, the pair
          ``([batch, 1, dim_out], next DecodeState)``.
        """
        self.check(x)
        if decode_state is not None and x.shape[1] != 1:
            raise ValueError("CausalLambdaLayer decode_state needs one position per step, "
                             f"[batch, 1, channels]; got an input of shape {tuple(x.shape)}.")
        batch, length, channels = x.shape
        h, k, u = self.heads, self.dim_k, self.dim_u
        v = self.dim_out // h

        def projected(features: int, stddev: float, name: str, dtype: Any) -> jax.Array:
            kernel = Kernel(channels, features, stddev, self.param_dtype, name=name)()
            return project(x, kernel, dtype)

        queries = projected(k * h, (k * channels) ** -0.5, "query", self.dtype)
        values = projected(v * u, channels**-0.5, "value", self.dtype)
        if self.use_layernorm:
            queries, values = (
                nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=name)(features)
                for name, features in (("query_norm", queries), ("value_norm", values)))
        compute_dtype = queries.dtype
        accumulate = accumulation_dtype(compute_dtype)
        keys = projected(k * u, channels**-0.5, "key", accumulate).reshape(batch, length, u, k)
        queries = queries.reshape(batch, length, h, k)
        values = jnp.swapaxes(values.reshape(batch, length, u, v), -1, -2)  # [b, n, v, u]
        kernel = None
        if self.position == "local":
            kernel = self.param("local_embeddings", nn.initializers.normal(1.0),
                                (self.receptive_field, k, u), self.param_dtype)
        if decode_state is None:
            lambdas = causal_content_lambdas(keys, values)
            if kernel is not None:
                lambdas = lambdas + lambda_convolution(values, kernel, causal=True)
        else:
            lambdas, decode_state = decode_content_step(decode_state, keys[:, 0], values[:, 0])
            if kernel is not None:
                position, decode_state = decode_position_step(
                    decode_state, kernel, values[:, 0], accumulate)
                lambdas = lambdas + position
            lambdas = lambdas[:, None]  # [batch, 1, k, v]
        out = apply_lambdas(queries, lambdas).astype(compute_dtype)
        chex.assert_shape(out, (batch, length, self.dim_out))
        return out if decode_state is None else (out, decode_state)
