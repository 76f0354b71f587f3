"""``choose``: the fastest formulation of a function within a memory bound, decided once per
problem and device kind, cached in this process and on disk, the same on every process."""

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from lambda_jax.core.autotune import agree, cache
from lambda_jax.core.autotune.choice import Choice, check_request, fastest_within_bound
from lambda_jax.core.autotune.measure import measure

# Decisions this process has made or received, by the digest of their full key. Only agreed
# decisions enter it, and every process makes the same calls in the same order, so all
# processes hit it or miss it together and the exchange stays collective.
_decided: dict[str, Choice] = {}
_lock = threading.Lock()
# The lists that ``recording`` blocks collect the decisions of their calls into.
_recorders: list[list[Choice]] = []


def forget() -> None:
    """Empties the in-process cache (the files on disk stay)."""
    _decided.clear()


@contextlib.contextmanager
def recording():
    """Collects every ``Choice`` that ``choose`` returns inside the block, cached or not:
    ``with recording() as made: ...`` leaves them in ``made`` in the order of the calls."""
    made: list[Choice] = []
    _recorders.append(made)
    try:
        yield made
    finally:
        _recorders.remove(made)


def _measured_or_cached(candidates, args, key, *, mode, reference, memory_bound,
                        backend) -> Choice:
    """This process's decision: from the disk cache, else measured on the first local
    device of ``backend`` and written to the cache."""
    directory = cache.cache_dir()
    cached = cache.read(key, directory)
    if cached is not None:
        return cached
    device = jax.local_devices(backend=backend)[0]
    ordered = {name: candidates[name] for name in key["candidates"]}
    measurements = measure(ordered, args, mode=mode, reference=reference,
                           memory_bound=memory_bound, device=device)
    choice = Choice(name=fastest_within_bound(measurements), measurements=measurements,
                    from_cache=False, key=key)
    cache.write(choice, directory)
    return choice


def _decide(candidates, args, key, backend, **options) -> Choice:
    """The decision every process uses: process 0's (measured or cached), exchanged."""
    if jax.process_count(backend) == 1:
        return _measured_or_cached(candidates, args, key, backend=backend, **options)
    names = key["candidates"]
    if jax.process_index(backend) == 0:
        choice = _measured_or_cached(candidates, args, key, backend=backend, **options)
        agree.process_0_index(names.index(choice.name), key)
        return choice
    return Choice(name=names[agree.process_0_index(-1, key)], measurements={},
                  from_cache=False, key=key)


def choose(candidates: Mapping[str, Callable[..., jax.Array]],
           args: Sequence[jax.ShapeDtypeStruct], *, mode: str, key: Mapping[str, Any],
           reference: str, memory_bound: float, backend: str | None = None) -> Choice:
    """The fastest of ``candidates`` for ``args`` on ``backend``'s device kind, among those
    whose memory is within ``memory_bound`` times the reference's.

    candidates: {name: f}; every f(*args) computes the same function (same output
      structure, shapes and dtypes; equal values and gradients).
    args: the arguments' shapes and dtypes (``jax.ShapeDtypeStruct``, or arrays and
      tracers, of which only shape and dtype are used), floating point. The measurements
      use standard-normal values from a fixed seed.
    mode: "train" times and sizes the value and the gradient with respect to every
      argument (a vjp of a fixed random cotangent); "inference" the forward alone.
    key: the problem, JSON-like (e.g. {"op": ..., "shapes": ..., "dtype": ..., "r": 9});
      with the device kind, backend, jax version, mode, candidates' names, reference and
      bound it keys the cache. Values that are not JSON are keyed by ``str``.
    reference: the candidate whose memory (XLA's temporaries) sets the bound; always
      allowed.
    memory_bound: a factor >= 1: candidates above ``memory_bound * reference's memory`` are
      dropped (e.g. 1.25 in training, 2.0 in inference).
    backend: "cpu", "gpu", "tpu", ...; None: ``jax.default_backend()``.

    Callable at trace time (inside jit, grad, vmap, shard_map, pmap): the work runs
    outside the caller's traces. Measured once per key: later calls in this process, and
    processes sharing ``$LAMBDA_JAX_CACHE_DIR``, compile nothing. With several processes,
    all use process 0's decision; every process must call ``choose`` with the same
    arguments in the same order.
    """
    check_request(candidates, reference, mode, memory_bound)
    backend = backend or jax.default_backend()
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    full_key = cache.full_key(candidates=candidates, mode=mode, reference=reference,
                              memory_bound=memory_bound, problem=key, backend=backend)
    memo = cache.digest(full_key)
    with _lock:
        if memo in _decided:
            choice = dataclasses.replace(_decided[memo], from_cache=True)
        else:
            choice = agree.outside_traces(lambda: _decide(
                candidates, args, full_key, backend, mode=mode, reference=reference,
                memory_bound=memory_bound))
            _decided[memo] = choice
    for made in _recorders:
        made.append(choice)
    return choice
