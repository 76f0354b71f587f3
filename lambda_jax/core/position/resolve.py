"""The formulations of the local position term, by name, and the resolution of ``"auto"``."""

from __future__ import annotations

import math
from typing import Sequence

import jax

LAMBDA_IMPLEMENTATIONS = ("conv", "banded")
OUTPUT_IMPLEMENTATIONS = ("shift", "tiled", "pallas")
# "auto": a static rule by backend, size and mode; "autotune": measured on the device.
IMPLEMENTATIONS = ("auto", "autotune") + LAMBDA_IMPLEMENTATIONS + OUTPUT_IMPLEMENTATIONS
# Formulations written for images [batch, height, width, ...] only.
IMAGE_IMPLEMENTATIONS = ("banded", "tiled", "pallas")
# The computations "auto" tells apart: a gradient step, or the forward pass alone.
MODES = ("train", "inference")
# On CPU, "auto" uses "shift" for sequences and volumes, and for images in inference, up to
# this many kernel offsets times u: the shifted sums unroll one term per offset, u and head,
# so their compile time and their forward's time grow with them.
SHIFT_MAX_OFFSETS = 169
# Past this many kernel offsets times u, compiling "shift" takes over a minute (on CPU, at
# the Table 3 layers), so "autotune" does not try it.
SHIFT_MAX_COMPILED_OFFSETS = 289
# In CPU inference, images of at most this many positions use "banded": a tile there is one
# of a few rows and "tiled"'s per-tile work dominates.
BANDED_MAX_POSITIONS = 64
# The most compiled memory (XLA's temporaries) a formulation may take, as a multiple of
# "conv"'s, by mode: a training step keeps the paper's memory; inference, which keeps no
# activations for a backward pass, may take twice it.
MEMORY_BOUNDS = {"train": 1.25, "inference": 2.0}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def check_images(implementation: str, spatial: Sequence[int]) -> None:
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

    ``"auto"`` depends on the mode and the backend the computation is compiled for. In
    training it is the fastest formulation measured within ``MEMORY_BOUNDS["train"]``
    (1.25x) of ``"conv"``'s compiled training memory; in inference the fastest within
    ``MEMORY_BOUNDS["inference"]`` (2x) of its compiled forward memory:

    * images, training, every backend: ``"tiled"``. Its compiled training memory (XLA's
      memory analysis of a layer's gradient step) is 0.3-0.85x ``"conv"``'s at every lambda
      shape of the Table 3 ResNet-50s and the LambdaResNets (r=23 with u=1, r=7 with u=4;
      at most 1.25x is asserted by tests/test_memory.py), where ``"banded"`` takes 1.6-5.2x.
      On 2 EPYC cores it is the fastest formulation within that bound at all 14 shapes;
      ``"banded"`` or ``"shift"``, at 1.7-2.9x ``"conv"``'s memory, train at most 1.1x faster
      (benchmarks/README.md, ``benchmarks/local_formulations.py``).
    * images, inference, CPU: ``"shift"`` while ``r * r * u <= SHIFT_MAX_OFFSETS``; else
      ``"banded"`` for images of at most ``BANDED_MAX_POSITIONS`` positions (7x7: 1.2x to
      1.6x faster than ``"tiled"`` on 2 EPYC cores, at 1.5x ``"conv"``'s forward memory);
      else ``"tiled"``. With no backward pass, the shifted sums (h*(k+v) multiply-adds per
      offset instead of k*v) are the fastest forward at small scopes (r=9, u=1: 1.6x faster
      than ``"tiled"`` on a 2-core Xeon, 1.1x on 2 EPYC cores) at about half of
      ``"conv"``'s memory; past that their unrolled terms make ``"tiled"`` faster.
    * images, GPU and TPU, both modes: ``"tiled"``. No measurement exists yet; all of its
      work is dense matrix products (which run on the tensor cores and the MXU) and it
      needs the least memory. ``"shift"`` is elementwise work on the vector units,
      ``"conv"`` a convolution with u input channels that the convolution units run at a
      small fraction of their rate. ``"autotune"`` measures instead.
    * ``"pallas"``, the fused Pallas kernel, is never picked: no device measurement in
      ``benchmarks/results/`` shows it faster yet. ``"autotune"`` measures it on GPU and TPU.
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
    check_mode(mode)
    check_images(implementation, spatial)
    if implementation == "autotune":
        raise ValueError(
            "implementation='autotune' measures the formulations on the arrays' shapes: "
            "resolve it with choose_local_implementation(implementation, queries, values, "
            "kernel, mode)."
        )
    if implementation != "auto":
        return implementation
    backend = jax.default_backend() if backend is None else backend
    few_offsets = receptive_field ** len(spatial) * dim_u <= SHIFT_MAX_OFFSETS
    if len(spatial) == 2:
        if mode == "train" or backend != "cpu":
            return "tiled"
        if few_offsets:
            return "shift"
        return "banded" if math.prod(spatial) <= BANDED_MAX_POSITIONS else "tiled"
    return "shift" if backend == "cpu" and few_offsets else "conv"


def autotune_candidates(spatial: Sequence[int], receptive_field: int, dim_u: int,
                        backend: str) -> tuple[str, ...]:
    """The formulations ``"autotune"`` measures for inputs of spatial size ``spatial`` and an
    r^s x u kernel on ``backend``: those correct for the input's rank and not known to take
    minutes to compile. ``"conv"``, the reference, is always one."""
    names = ["conv"]
    if len(spatial) == 2:
        names += ["banded", "tiled"]
        # The fused kernel compiles for GPUs and TPUs; on CPU it runs interpreted.
        if backend != "cpu":
            names.append("pallas")
    if receptive_field ** len(spatial) * dim_u <= SHIFT_MAX_COMPILED_OFFSETS:
        names.append("shift")
    return tuple(names)
