"""Masked (causal) lambdas for sequences, query n seeing only the context positions m <= n:
the functions and the :class:`CausalLambdaLayer` module.

The content lambda of query n normalises the keys over its visible prefix,
``λc_n = Σ_{m<=n,u} softmax_{m'<=n}(K)[m,k,u] V[m,v,u]``. It is computed as a prefix scan of
``(running max of the keys, Σ exp(K - max), Σ exp(K - max) V)``, so no exponential ever
overflows, whatever the size of the keys. Decoding carries the same triple (and the last
``r - 1`` values for the local position lambdas), so each step costs the same at any t.
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lambda_jax import functional
from lambda_jax.functional import check_input_shape
from lambda_jax.layers import position as position_lib
from lambda_jax.layers.lambda_layer import Kernel

CAUSAL_POSITIONS = ("none", "local")


class DecodeState(flax.struct.PyTreeNode):
    """The running state of a causal lambda layer after t decoded positions.

    Attributes:
      key_max: ``[batch, u, k]`` the largest key seen so far (``-inf`` before the first step).
      key_sum: ``[batch, u, k]`` ``Σ_m exp(K[m] - key_max)``.
      weighted_values: ``[batch, u, k, v]`` ``Σ_m exp(K[m] - key_max) V[m]``.
      recent_values: ``[batch, r - 1, v, u]`` the normalised values of the last ``r - 1``
        positions, oldest first (zeros before the sequence starts, as the convolution's
        padding); ``r - 1 = 0`` for a layer without local position lambdas.
    """

    key_max: jax.Array
    key_sum: jax.Array
    weighted_values: jax.Array
    recent_values: jax.Array


def init_decode_state(batch: int, dim_k: int, dim_u: int, dim_v: int, window: int,
                      dtype=jnp.float32) -> DecodeState:
    """The state before the first position; ``window`` is ``r - 1`` (0 without position)."""
    return DecodeState(
        key_max=jnp.full((batch, dim_u, dim_k), -jnp.inf, jnp.float32),
        key_sum=jnp.zeros((batch, dim_u, dim_k), jnp.float32),
        weighted_values=jnp.zeros((batch, dim_u, dim_k, dim_v), jnp.float32),
        recent_values=jnp.zeros((batch, window, dim_v, dim_u), dtype),
    )


def _merge(earlier, later):
    """Combines two (max, sum, weighted sum) summaries of consecutive runs of positions."""
    max_a, sum_a, weighted_a = earlier
    max_b, sum_b, weighted_b = later
    new_max = jnp.maximum(max_a, max_b)
    scale_a = jnp.exp(max_a - new_max)
    scale_b = jnp.exp(max_b - new_max)
    return (
        new_max,
        sum_a * scale_a + sum_b * scale_b,
        weighted_a * scale_a[..., None] + weighted_b * scale_b[..., None],
    )


def causal_content_lambdas(keys: jax.Array, values: jax.Array) -> jax.Array:
    """Content lambdas over each visible prefix.

    Args:
      keys: ``[batch, n, u, k]`` key logits (float32 or wider).
      values: ``[batch, n, v, u]``.

    Returns:
      ``[batch, n, k, v]`` in the keys' dtype: ``λc_n`` for every query position n.
    """
    batch, n, depth_u, depth_k = keys.shape
    chex.assert_shape(values, (batch, n, None, depth_u))
    depth_v = values.shape[2]
    per_position = jnp.broadcast_to(
        jnp.swapaxes(values, -1, -2).astype(keys.dtype)[:, :, :, None, :],
        (batch, n, depth_u, depth_k, depth_v),
    )
    _, key_sum, weighted = jax.lax.associative_scan(
        _merge, (keys, jnp.ones_like(keys), per_position), axis=1
    )
    return jnp.sum(weighted / key_sum[..., None], axis=2)


def decode_content_step(state: DecodeState, keys: jax.Array, values: jax.Array):
    """Adds one position to the running content summary.

    Args:
      state: the state after t positions.
      keys: ``[batch, u, k]`` key logits of position t (float32 or wider).
      values: ``[batch, v, u]`` normalised values of position t.

    Returns:
      ``(content_lambda [batch, k, v], state)`` with the key and value sums updated.
    """
    new = (keys, jnp.ones_like(keys),
           jnp.swapaxes(values, -1, -2).astype(keys.dtype)[:, :, None, :])
    key_max, key_sum, weighted = _merge(
        (state.key_max, state.key_sum, state.weighted_values), new)
    content = jnp.sum(weighted / key_sum[..., None], axis=1)
    return content, state.replace(key_max=key_max, key_sum=key_sum, weighted_values=weighted)


def decode_position_step(state: DecodeState, kernel: jax.Array, values: jax.Array,
                         accumulate_dtype):
    """The causal lambda convolution at one new position.

    Args:
      state: the state after t positions (its ``recent_values`` hold the last r - 1).
      kernel: ``[r, k, u]``; index j holds the offset ``j - (r - 1)``.
      values: ``[batch, v, u]`` normalised values of position t.
      accumulate_dtype: dtype of the sum over the window.

    Returns:
      ``(position_lambda [batch, k, v], state)`` with the window moved by one.
    """
    window = jnp.concatenate([state.recent_values, values[:, None].astype(
        state.recent_values.dtype)], axis=1)  # [batch, r, v, u]
    position = jnp.einsum("rku,brvu->bkv", kernel.astype(window.dtype), window,
                          preferred_element_type=accumulate_dtype)
    return position, state.replace(recent_values=window[:, 1:])


class CausalLambdaLayer(nn.Module):
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

    dim_out: int
    dim_k: int = 16
    heads: int = 4
    dim_u: int = 1
    position: str = "local"
    receptive_field: int = 23
    use_layernorm: bool = True
    epsilon: float = 1e-5
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def _check(self, x: jax.Array) -> None:
        for name in ("dim_out", "dim_k", "heads", "dim_u", "receptive_field"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"CausalLambdaLayer.{name} must be positive, got {getattr(self, name)}.")
        if self.dim_out % self.heads:
            raise ValueError(f"CausalLambdaLayer.dim_out ({self.dim_out}) must be divisible by "
                             f"heads ({self.heads}).")
        if self.position not in CAUSAL_POSITIONS:
            raise ValueError(f"CausalLambdaLayer.position must be one of {CAUSAL_POSITIONS}, "
                             f"got {self.position!r}.")
        if len(x.shape) != 3:
            raise ValueError("CausalLambdaLayer needs sequences [batch, length, channels]; got an "
                             f"input of shape {tuple(x.shape)}.")
        check_input_shape("CausalLambdaLayer", x)

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
        self._check(x)
        if decode_state is not None and x.shape[1] != 1:
            raise ValueError("CausalLambdaLayer decode_state needs one position per step, "
                             f"[batch, 1, channels]; got an input of shape {tuple(x.shape)}.")
        batch, length, channels = x.shape
        h, k, u = self.heads, self.dim_k, self.dim_u
        v = self.dim_out // h

        def project(features: int, stddev: float, name: str, dtype: Any) -> jax.Array:
            kernel = Kernel(channels, features, stddev, self.param_dtype, name=name)()
            return functional.project(x, kernel, dtype)

        queries = project(k * h, (k * channels) ** -0.5, "query", self.dtype)
        values = project(v * u, channels**-0.5, "value", self.dtype)
        if self.use_layernorm:
            queries, values = (
                nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=name)(features)
                for name, features in (("query_norm", queries), ("value_norm", values)))
        compute_dtype = queries.dtype
        accumulate = position_lib.accumulation_dtype(compute_dtype)
        keys = project(k * u, channels**-0.5, "key", accumulate).reshape(batch, length, u, k)
        queries = queries.reshape(batch, length, h, k)
        values = jnp.swapaxes(values.reshape(batch, length, u, v), -1, -2)  # [b, n, v, u]
        kernel = None
        if self.position == "local":
            kernel = self.param("local_embeddings", nn.initializers.normal(1.0),
                                (self.receptive_field, k, u), self.param_dtype)
        if decode_state is None:
            lambdas = causal_content_lambdas(keys, values)
            if kernel is not None:
                lambdas = lambdas + position_lib.lambda_convolution(values, kernel, causal=True)
        else:
            lambdas, decode_state = decode_content_step(decode_state, keys[:, 0], values[:, 0])
            if kernel is not None:
                position, decode_state = decode_position_step(
                    decode_state, kernel, values[:, 0], accumulate)
                lambdas = lambdas + position
            lambdas = lambdas[:, None]  # [batch, 1, k, v]
        out = functional.apply_lambdas(queries, lambdas).astype(compute_dtype)
        chex.assert_shape(out, (batch, length, self.dim_out))
        return out if decode_state is None else (out, decode_state)
