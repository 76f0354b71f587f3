"""Masked (causal) lambdas for sequences, query n seeing only the context positions m <= n:
the functions of :class:`lambda_jax.CausalLambdaLayer`.

The content lambda of query n normalises the keys over its visible prefix,
``λc_n = Σ_{m<=n,u} softmax_{m'<=n}(K)[m,k,u] V[m,v,u]``. It is computed as a prefix scan of
``(running max of the keys, Σ exp(K - max), Σ exp(K - max) V)``, so no exponential ever
overflows, whatever the size of the keys. Decoding carries the same triple (and the last
``r - 1`` values for the local position lambdas), so each step costs the same at any t.
"""

from __future__ import annotations

import chex
import flax.struct
import jax
import jax.numpy as jnp


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
