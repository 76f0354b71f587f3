"""Dtypes and projections shared by every part of the core."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype sums over positions accumulate in: float32, or wider if ``dtype`` is."""
    return jnp.promote_types(dtype, jnp.float32)


def project(x: jax.Array, kernel: jax.Array, dtype: Optional[Any]) -> jax.Array:
    """``x @ kernel`` for ``x: [..., in]`` and ``kernel: [in, out]``, in ``dtype`` (None:
    promoted), as ``nn.Dense`` computes it: ``[..., out]``."""
    dtype = dtype or jnp.result_type(x, kernel)
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                               (((x.ndim - 1,), (0,)), ((), ())))
