"""Autotuning: the fastest of several formulations of one function, decided on the device.

``choose(candidates, args, mode=..., key=..., reference=..., memory_bound=...)`` compiles
and times every candidate (forward, or value and gradient), drops those whose memory is
above ``memory_bound`` times the reference's, and returns the fastest of the rest as a
``Choice``. As XLA does with its own tuning, the decision is made once per problem and
device kind, cached (in this process and as JSON files in ``$LAMBDA_JAX_CACHE_DIR``), and
the same on every process of a multi-process run (process 0's).

Modules: ``decide`` (choose and the in-process cache), ``measure`` (compiling, memory,
timing), ``cache`` (the files), ``agree`` (trace-time execution, process 0's decision),
``choice`` (the result, the selection rule, the table).
"""

from lambda_jax.core.autotune.cache import cache_dir, cached_choices, full_key
from lambda_jax.core.autotune.choice import Choice, Measurement
from lambda_jax.core.autotune.decide import choose, forget, recording
from lambda_jax.core.autotune.measure import compiled_candidates

__all__ = ["Choice", "Measurement", "cache_dir", "cached_choices", "choose",
           "compiled_candidates", "forget", "full_key", "recording"]
