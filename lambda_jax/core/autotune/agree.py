"""Running device work at trace time, and making every process use process 0's decision.

Trace time: ``choose`` is called while an outer function is traced (under ``jax.jit``,
``jax.grad``, ``jax.vmap``, ``jax.shard_map``, ``jax.pmap``). There, device computations
would be staged into the outer trace, and ``jax.ensure_compile_time_eval`` is not enough
inside ``shard_map`` under ``jax.set_mesh``: the mesh context (manual axes) still applies
to the candidates' compilation. JAX keeps the trace state and the mesh and device contexts
per thread, so the work runs in a fresh thread, which starts outside every trace and
context, while the calling thread waits for it. The caller's thread-local settings
(``jax.default_device``, ``jax.default_matmul_precision`` as context managers) therefore do
not apply to the measurements; global ``jax.config`` settings do.

Agreement: with several processes, each compiles its own program, and programs that differ
hang in their collectives. Process 0 decides; every process, whatever its own cache holds,
takes part in one ``broadcast_one_to_all`` of process 0's decision (the chosen index and a
digest of the question), so no process waits on an exchange another one skipped. (The
in-process cache skips the exchange, but it holds agreed decisions only, made by the same
calls in the same order on every process, so all processes skip it together.)
"""

import concurrent.futures
import json
import zlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def outside_traces(work: Callable[[], T]) -> T:
    """``work()`` run in a fresh thread, so that its device computations execute now
    instead of being staged into a trace of the caller; its exception is re-raised here."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="autotune") as pool:
        return pool.submit(work).result()


def question_digest(key: Mapping[str, Any]) -> int:
    """A 31-bit digest of what all processes must agree on: the key without the device
    kind and jax version (which may differ between hosts without changing the program)."""
    question = {k: v for k, v in key.items() if k not in ("device_kind", "jax_version")}
    return zlib.crc32(json.dumps(question, sort_keys=True).encode()) & 0x7FFFFFFF


def process_0_index(index: int, key: Mapping[str, Any]) -> int:
    """Process 0's ``index`` on every process (a collective: every process must call it).

    index: the chosen candidate's position in ``key["candidates"]`` on process 0; ignored on
      the others.
    Raises RuntimeError on a process whose ``key`` is not process 0's question.
    """
    digest = question_digest(key)
    sent = np.array([index, digest], np.int32)
    received_index, received_digest = (int(v) for v in
                                       multihost_utils.broadcast_one_to_all(sent))
    if received_digest != digest:
        raise RuntimeError(
            f"Process {jax.process_index()} asked to autotune {key['problem']} "
            f"({key['mode']}, candidates {key['candidates']}), but process 0 asked another "
            "question: every process must call choose() with the same candidates, key, mode, "
            "reference and memory bound, in the same order.")
    return received_index
