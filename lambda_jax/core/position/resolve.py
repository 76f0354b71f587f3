"""The formulations of the local position term, by name, and the resolution of ``"auto"``."""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax

from lambda_jax.core.content import apply_lambdas
from lambda_jax.core.position.banded import banded_lambda_convolution
from lambda_jax.core.position.conv import lambda_convolution
from lambda_jax.core.position.shift import shifted_position_output
from lambda_jax.core.position.tiled import tiled_position_output

LAMBDA_IMPLEMENTATIONS = ("conv", "banded")
OUTPUT_IMPLEMENTATIONS = ("shift", "tiled")
IMPLEMENTATIONS = ("auto",) + LAMBDA_IMPLEMENTATIONS + OUTPUT_IMPLEMENTATIONS
# Formulations written for images [batch, height, width, ...] only.
IMAGE_IMPLEMENTATIONS = ("banded", "tiled")
# The computations "auto" tells apart: a gradient step, or the forward pass alone.
MODES = ("train", "inference")
# On CPU, sequences and volumes use "shift" up to this many kernel offsets times u, "conv"
# above it: the shifted sums unroll one term per offset, u and head, so their compile time
# grows with them.
SHIFT_MAX_OFFSETS = 169


def _check_images(implementation: str, spatial: Sequence[int]) -> None:
    if implementation in IMAGE_IMPLEMENTATIONS and len(spatial) != 2:
        raise ValueError(
            f"implementation={implementation!r} needs images [batch, height, width, "
            f"channels]; got {len(spatial)} spatial axes {tuple(spatial)}. Use 'auto', "
            "'shift' or 'conv'."
        )


def resolve_local_implementation(
    implementation: str,
    spatial: Sequence[int],
    receptive_field: int,
    dim_u: int,
    backend: str | None = None,
    mode: str = "train",
) -> str:
    """The formulation that computes a local layer: ``implementation`` with ``"auto"``
    resolved for inputs of spatial size ``spatial`` (1 to 3 axes) and an r^s x u kernel.

    ``"auto"`` depends on the backend the computation is compiled for:

    * images, every backend: ``"tiled"``. Its compiled training memory (XLA's memory
      analysis of a layer's gradient step) is 0.3-0.85x ``"conv"``'s at every lambda shape of
      the Table 3 ResNet-50s and the LambdaResNets (r=23 with u=1, r=7 with u=4; at most
      1.25x is asserted by tests/test_memory.py), where ``"banded"`` takes 1.6-5.2x. On CPU
      it is also the fastest formulation at the r=23 shapes but the 7x7 one; at the r=7, u=4
      shapes ``"banded"`` or ``"shift"`` trains up to 1.35x faster at 1.7-3.5x ``"conv"``'s
      memory (benchmarks/README.md, ``benchmarks/local_formulations.py``). On GPU and TPU
      no measurement exists yet; ``"tiled"`` is chosen there because all of its work is
      dense matrix products (which run on the tensor cores and the MXU) and it needs the
      least memory. ``"shift"`` is elementwise work on the vector units, ``"conv"`` a
      convolution with u input channels that the convolution units run at a small fraction
      of their rate.
    * sequences and volumes, CPU: ``"shift"`` while ``r ** rank * u <= SHIFT_MAX_OFFSETS``,
      else ``"conv"``.
    * sequences and volumes, GPU and TPU: ``"conv"``, the formulation on the matrix units.

    Args:
      implementation: one of ``IMPLEMENTATIONS``.
      spatial: ``(S_1, ..., S_s)``.
      receptive_field: the scope r.
      dim_u: the intra-depth u.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` (any other name counts as an accelerator);
        ``None``: ``jax.default_backend()`` at trace time.
      mode: one of ``MODES``.

    Returns:
      A name in ``LAMBDA_IMPLEMENTATIONS`` or ``OUTPUT_IMPLEMENTATIONS``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    _check_images(implementation, spatial)
    if implementation != "auto":
        return implementation
    if len(spatial) == 2:
        return "tiled"
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu" and receptive_field ** len(spatial) * dim_u <= SHIFT_MAX_OFFSETS:
        return "shift"
    return "conv"


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
        _check_images(implementation, values.shape[1:-2])
        return banded_lambda_convolution(values, kernel)
    raise ValueError(
        f"implementation must be one of {LAMBDA_IMPLEMENTATIONS} to build position lambdas, "
        f"got {implementation!r}."
    )


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
        ``mode`` (see :func:`resolve_local_implementation`).
      mode: ``"train"`` or ``"inference"``, the computation ``"auto"`` picks for.

    Returns:
      ``[batch, *spatial, h*v]`` (head-major) in ``accumulation_dtype(values.dtype)``.
    """
    batch, *spatial, heads, depth_k = queries.shape
    chex.assert_shape(values, (batch, *spatial, None, None))
    chex.assert_shape(kernel, (kernel.shape[0],) * len(spatial) + (depth_k, values.shape[-1]))
    resolved = resolve_local_implementation(
        implementation, spatial, kernel.shape[0], values.shape[-1], mode=mode)
    if resolved == "shift":
        return shifted_position_output(queries, values, kernel)
    if resolved == "tiled":
        return tiled_position_output(queries, values, kernel)
    lambdas = local_position_lambdas(values, kernel, resolved)
    flat = queries.reshape(batch, math.prod(spatial), heads, depth_k)
    return apply_lambdas(flat.astype(lambdas.dtype), lambdas).reshape(batch, *spatial, -1)
