"""The content lambda, shared by every query, and the queries applied to lambdas."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from lambda_jax.core.numerics import accumulation_dtype


def content_lambda(keys: jax.Array, values: jax.Array) -> jax.Array:
    """The content lambda ``λc = Σ_m,u softmax_m(K)[m,k,u] V[m,v,u]``, shared by all queries.

    Args:
      keys: ``[b, m, k, u]`` key logits, softmaxed over the m context positions in float32.
      values: ``[b, m, v, u]``.

    Returns:
      ``[b, k, v]`` in ``accumulation_dtype(values.dtype)``.
    """
    chex.assert_rank([keys, values], 4)
    chex.assert_equal_shape([keys, values], dims=(0, 1, 3))
    weights = jax.nn.softmax(keys.astype(jnp.promote_types(keys.dtype, jnp.float32)), axis=1)
    return jnp.einsum("bmku,bmvu->bkv", weights.astype(values.dtype), values,
                      preferred_element_type=accumulation_dtype(values.dtype))


def apply_lambdas(queries: jax.Array, lambdas: jax.Array) -> jax.Array:
    """The output ``y[n, h, v] = Σ_k Q[n,h,k] λ_n[k, v]``, heads merged.

    Args:
      queries: ``[b, n, h, k]``.
      lambdas: ``[b, n, k, v]``, or ``[b, 1, k, v]`` for one lambda shared by every query.

    Returns:
      ``[b, n, h*v]`` (head-major) in ``accumulation_dtype(queries.dtype)``.
    """
    chex.assert_rank([queries, lambdas], 4)
    batch, n, heads, depth_k = queries.shape
    chex.assert_shape(lambdas, (batch, None, depth_k, None))
    if lambdas.shape[1] not in (1, n):
        raise ValueError(f"lambdas must have 1 or n = {n} positions: queries {queries.shape}, "
                         f"lambdas {lambdas.shape}.")
    out = jnp.einsum("bnhk,bnkv->bnhv", queries, lambdas.astype(queries.dtype),
                     preferred_element_type=accumulation_dtype(queries.dtype))
    return out.reshape(batch, n, heads * lambdas.shape[-1])
