"""The local position term by a formulation's name: ``"auto"`` resolved by its static rule,
``"autotune"`` by measuring the eligible formulations on the device (cached)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from lambda_jax.core import autotune
from lambda_jax.core.content import apply_lambdas
from lambda_jax.core.position.banded import banded_lambda_convolution
from lambda_jax.core.position.conv import lambda_convolution
from lambda_jax.core.position.pallas import pallas_position_output
from lambda_jax.core.position.resolve import (
    LAMBDA_IMPLEMENTATIONS,
    MEMORY_BOUNDS,
    autotune_candidates,
    check_images,
    check_mode,
    resolve_local_implementation,
)
from lambda_jax.core.position.shift import shifted_position_output
from lambda_jax.core.position.tiled import tiled_position_output


def local_position_lambdas(
    values: jax.Array, kernel: jax.Array, implementation: str = "conv"
) -> jax.Array:
    """The local position lambdas by a formulation of ``LAMBDA_IMPLEMENTATIONS``.

    Args:
      values: ``[batch, *spatial, v, u]``.
      kernel: ``[r, ..., r, k, u]`` (r odd).
      implementation: ``"conv"`` (the reference) or ``"banded"`` (images only).

    Returns:
      ``[batch, n, k, v]`` in ``accumulation_dtype(values.dtype)``.
    """
    chex.assert_rank(kernel, values.ndim - 1)
    if implementation == "conv":
        return lambda_convolution(values, kernel)
    if implementation == "banded":
        check_images(implementation, values.shape[1:-2])
        return banded_lambda_convolution(values, kernel)
    raise ValueError(
        f"implementation must be one of {LAMBDA_IMPLEMENTATIONS} to build position lambdas, "
        f"got {implementation!r}."
    )


# The formulations that go straight to the output, by name (OUTPUT_IMPLEMENTATIONS).
_OUTPUT_FORMULATIONS = {"shift": shifted_position_output, "tiled": tiled_position_output,
                        "pallas": pallas_position_output}


def position_output(queries: jax.Array, values: jax.Array, kernel: jax.Array,
                    implementation: str) -> jax.Array:
    """The local position term by a formulation that :func:`choose_local_implementation`
    returned (so it fits the input's rank): ``[batch, *spatial, h*v]`` from queries
    ``[batch, *spatial, h, k]``, values ``[batch, *spatial, v, u]`` and the kernel
    ``[r, ..., r, k, u]``."""
    if implementation in _OUTPUT_FORMULATIONS:
        return _OUTPUT_FORMULATIONS[implementation](queries, values, kernel)
    batch, *spatial, heads, depth_k = queries.shape
    lambdas = local_position_lambdas(values, kernel, implementation)
    flat = queries.reshape(batch, math.prod(spatial), heads, depth_k)
    return apply_lambdas(flat.astype(lambdas.dtype), lambdas).reshape(batch, *spatial, -1)


def choose_local_implementation(
    implementation: str,
    queries: jax.Array,
    values: jax.Array,
    kernel: jax.Array,
    mode: str = "train",
    backend: Optional[str] = None,
) -> str:
    """The formulation that computes the local position term of these arrays in ``mode``.

    ``"auto"`` is resolved by :func:`resolve_local_implementation`'s static rule.
    ``"autotune"`` compiles and times every formulation of :func:`autotune_candidates` for
    the exact shapes and dtypes (training: value and gradients of the three arrays under a
    fixed random cotangent; inference: the forward), drops those whose compiled temporaries
    exceed ``MEMORY_BOUNDS[mode]`` times ``"conv"``'s, and returns the fastest. Decisions are
    cached in the process and on disk (:mod:`lambda_jax.core.autotune`), and in a
    multi-process run every process takes process 0's. Runs at trace time: only the
    shapes and dtypes of the arrays are read.

    Args:
      implementation: one of ``IMPLEMENTATIONS``.
      queries: ``[batch, *spatial, h, k]``.
      values: ``[batch, *spatial, v, u]``.
      kernel: ``[r, ..., r, k, u]``.
      mode: one of ``MODES``.
      backend: the backend the computation is compiled for (None: the default backend).

    Returns:
      A name in ``LAMBDA_IMPLEMENTATIONS`` or ``OUTPUT_IMPLEMENTATIONS``.
    """
    spatial = tuple(values.shape[1:-2])
    receptive_field, dim_u = kernel.shape[0], values.shape[-1]
    if implementation != "autotune":
        return resolve_local_implementation(implementation, spatial, receptive_field, dim_u,
                                            backend, mode)
    check_mode(mode)
    backend = backend or jax.default_backend()
    arrays = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (queries, values, kernel)]
    candidates = {name: functools.partial(position_output, implementation=name)
                  for name in autotune_candidates(spatial, receptive_field, dim_u, backend)}
    key = {"op": "local_position_output",
           "shapes": [list(x.shape) for x in arrays],
           "dtypes": [jnp.dtype(x.dtype).name for x in arrays],
           "receptive_field": receptive_field, "dim_u": dim_u}
    return autotune.choose(candidates, arrays, mode=mode, key=key, reference="conv",
                           memory_bound=MEMORY_BOUNDS[mode], backend=backend).name


def local_position_output(
    queries: jax.Array,
    values: jax.Array,
    kernel: jax.Array,
    implementation: str = "auto",
    mode: str = "train",
) -> jax.Array:
    """The local position term of the output, ``Σ_k Q[n,h,k] λp_n[k, v]``, by any formulation.

    Formulations of ``OUTPUT_IMPLEMENTATIONS`` never build the position lambdas; for those
    of ``LAMBDA_IMPLEMENTATIONS`` the queries are applied to them.

    Args:
      queries: ``[batch, *spatial, h, k]``.
      values: ``[batch, *spatial, v, u]``.
      kernel: ``[r, ..., r, k, u]`` (r odd).
      implementation: one of ``IMPLEMENTATIONS``; ``"auto"`` picks one by backend, size and
        ``mode`` (see :func:`resolve_local_implementation`), ``"autotune"`` by measuring
        (see :func:`choose_local_implementation`).
      mode: ``"train"`` (a gradient will be taken) or ``"inference"``, the computation
        ``"auto"`` and ``"autotune"`` pick for; every formulation has the same values and
        gradients in either mode.

    Returns:
      ``[batch, *spatial, h*v]`` (head-major) in ``accumulation_dtype(values.dtype)``.
    """
    batch, *spatial, heads, depth_k = queries.shape
    chex.assert_shape(values, (batch, *spatial, None, None))
    chex.assert_shape(kernel, (kernel.shape[0],) * len(spatial) + (depth_k, values.shape[-1]))
    resolved = choose_local_implementation(implementation, queries, values, kernel, mode)
    return position_output(queries, values, kernel, resolved)
