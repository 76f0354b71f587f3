"""Compiling and timing the candidates of one problem on one device.

Every candidate is compiled for the same arguments and timed on the same random
values. In "train" the program is the value and the gradient with respect to every
argument, pulled back with a fixed random cotangent (``jax.vjp``): the gradient of a plain
sum would let XLA fold the cotangent away and time a different program. Memory is XLA's
memory analysis of the compiled program, ``temp_size_in_bytes`` (the temporaries, the same
figure as ``compiled_memory`` in benchmarks/lambda_shapes.py): arguments and outputs are
the same for every formulation, the temporaries are what the formulations change.
"""

import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from lambda_jax.core.autotune.choice import Measurement, within_bound

ARGUMENT_SEED = 0
COTANGENT_SEED = 1
# Timing stops once each candidate has run for about this long, within these rounds:
# enough to outvote a noisy call, short enough for trace time.
SECONDS_PER_CANDIDATE = 0.2
MIN_ROUNDS = 3
MAX_ROUNDS = 20

_compiled_total = 0


def compiled_candidates() -> int:
    """How many candidate programs this process has compiled for measuring (a test's probe
    that a cache answered: the count does not move)."""
    return _compiled_total


def _random_values(shapes: Sequence[jax.ShapeDtypeStruct], seed: int,
                   device: jax.Device) -> list[jax.Array]:
    """Standard-normal arrays of ``shapes`` from a fixed seed, on ``device``."""
    rng = np.random.default_rng(seed)
    return [jax.device_put(np.asarray(rng.standard_normal(s.shape), s.dtype), device)
            for s in shapes]


def _program(candidate: Callable[..., jax.Array], mode: str) -> Callable:
    """The program measured: the forward, or (train) forward and vjp given a cotangent."""
    if mode == "inference":
        return candidate

    def value_and_pullback(args, cotangent):
        value, pullback = jax.vjp(candidate, *args)
        return value, pullback(cotangent)

    return value_and_pullback


def _placed(shapes, device):
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes)


def _compile(program, shapes, device) -> jax.stages.Compiled:
    global _compiled_total
    compiled = jax.jit(program).lower(*_placed(shapes, device)).compile()
    _compiled_total += 1
    return compiled


def _temporaries(compiled: jax.stages.Compiled, name: str) -> int:
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError(f"XLA gave no memory analysis for candidate {name!r} on this "
                           "backend; autotuning needs it for the memory bound.")
    return int(analysis.temp_size_in_bytes)


def _ready(program, shapes, values, device, name: str, reference: str):
    """The compiled program after one warm-up call, or None (with a warning) when a candidate
    other than the reference fails to compile or run on ``device``: a formulation that this
    backend cannot lower is left out rather than stopping the caller's program."""
    try:
        compiled = _compile(program, shapes, device)
        jax.block_until_ready(compiled(*values))
    except Exception as error:  # any lowering, compile or runtime failure of the candidate
        if name == reference:
            raise
        warnings.warn(f"autotune: candidate {name!r} failed on {device.device_kind} and is "
                      f"left out: {type(error).__name__}: {error}", stacklevel=2)
        return None
    return compiled


def _median_seconds(compiled: Mapping[str, jax.stages.Compiled],
                    values: Sequence) -> dict[str, float]:
    """Median wall time per candidate, after their warm-up calls: rounds in which the
    candidates take turns (each round starts one later), so that a slow spell of the
    machine falls on all of them rather than on one."""
    names = list(compiled)
    times = {name: [] for name in names}
    for round_ in range(MAX_ROUNDS):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*values))
            times[name].append(time.perf_counter() - start)
        if round_ + 1 >= MIN_ROUNDS and all(sum(t) >= SECONDS_PER_CANDIDATE
                                            for t in times.values()):
            break
    return {name: statistics.median(t) for name, t in times.items()}


def measure(candidates: Mapping[str, Callable[..., jax.Array]],
            args: Sequence[jax.ShapeDtypeStruct], *, mode: str, reference: str,
            memory_bound: float, device: jax.Device) -> dict[str, Measurement]:
    """Compiles and times every candidate on ``device``.

    candidates: {name: f}, each f(*args) computing the same function (same output
      structure, shapes and dtypes).
    args: the arguments' shapes and dtypes, floating point.
    mode: "train" (value and vjp) or "inference" (forward).
    Returns {name: Measurement}, the within_bound flags relative to ``reference``; a
    candidate that fails on the device has infinite seconds and is not within the bound.
    """
    for i, a in enumerate(args):
        if not np.issubdtype(a.dtype, np.inexact):
            raise ValueError(f"argument {i} has dtype {a.dtype}: autotuning measures "
                             "functions of floating-point arrays; close over the others.")
    outputs = {name: jax.eval_shape(f, *args) for name, f in candidates.items()}
    output = outputs[reference]
    for name, out in outputs.items():
        if out != output:
            raise ValueError(f"candidate {name!r} returns {out} but {reference!r} returns "
                             f"{output}: candidates must compute the same function.")
    values = _random_values(args, ARGUMENT_SEED, device)
    shapes = list(args)
    if mode == "train":
        leaves, tree = jax.tree.flatten(output)
        cotangent = tree.unflatten(_random_values(leaves, COTANGENT_SEED, device))
        values, shapes = (tuple(values), cotangent), (tuple(args), output)
    ready = {name: _ready(_program(f, mode), shapes, values, device, name, reference)
             for name, f in candidates.items()}
    compiled = {name: c for name, c in ready.items() if c is not None}
    memory = {name: _temporaries(c, name) for name, c in compiled.items()}
    seconds = _median_seconds(compiled, values)
    allowed = within_bound(memory, reference, memory_bound)
    failed = Measurement(seconds=float("inf"), memory_bytes=0, within_bound=False)
    return {name: Measurement(seconds=seconds[name], memory_bytes=memory[name],
                              within_bound=allowed[name]) if name in compiled else failed
            for name in candidates}
