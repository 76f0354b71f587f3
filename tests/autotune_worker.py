"""One process of the autotuning tests: chooses between two formulations of a small matmul at
trace time, inside ``jax.jit(jax.shard_map(...))`` over every device of the run, then once
more eagerly, and prints one JSON line: the choices, whether the caches answered, how many
candidates it compiled, and whether the outer computation's result was right.

    python tests/autotune_worker.py                       # one process
    python tests/autotune_worker.py --port P --process_id I --num_processes N

The candidates live here so that the tests (tests/test_autotune.py) use the same ones.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

N = 64
ARGS = [jax.ShapeDtypeStruct((N, N), jnp.float32)] * 2
PROBLEM = {"op": "tanh_matmul", "shapes": [[N, N], [N, N]], "dtype": jnp.float32}
OPTIONS = {"mode": "train", "key": PROBLEM, "reference": "looped", "memory_bound": 1.25}


def matmul(a, b):
    """tanh(a @ b), a: [n, k], b: [k, m] -> [n, m]: one matmul, the fast formulation."""
    return jnp.tanh(a @ b)


def looped(a, b):
    """The same as the mean of 100 equal matmuls: a deliberately slow formulation."""
    total = jax.lax.fori_loop(0, 100, lambda i, acc: acc + a @ b,
                              jnp.zeros((a.shape[0], b.shape[1]), a.dtype))
    return jnp.tanh(total / 100)


def hungry(a, b):
    """The same through 32 stacked copies of ``a`` that XLA must hold (the barrier keeps
    it from fusing them away): fast, with far more temporaries than the others."""
    copies = jax.lax.optimization_barrier(jnp.broadcast_to(a, (32, *a.shape)))
    return jnp.tanh(copies[-1] @ b)


CANDIDATES = {"matmul": matmul, "looped": looped}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    flags = parser.parse_args()
    if flags.num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{flags.port}",
                                   num_processes=flags.num_processes,
                                   process_id=flags.process_id)
    from lambda_jax.core import autotune

    traced = []

    def outer(a, b):
        choice = autotune.choose(CANDIDATES, [a, b], **OPTIONS)
        traced.append(choice)
        return CANDIDATES[choice.name](a, b)

    mesh = jax.make_mesh((jax.device_count(),), ("devices",))
    rng = np.random.default_rng(flags.process_id)
    a = rng.standard_normal((jax.local_device_count() * N, N)).astype(np.float32)
    b = np.ones((N, N), np.float32) / N
    with jax.set_mesh(mesh):
        a_global = jax.make_array_from_process_local_data(
            jax.NamedSharding(mesh, P("devices")), a)
        b_global = jax.device_put(b, jax.NamedSharding(mesh, P()))
        out = jax.jit(jax.shard_map(outer, in_specs=(P("devices"), P()),
                                    out_specs=P("devices")))(a_global, b_global)
        shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start)
        local = np.concatenate([np.asarray(s.data) for s in shards])
    again = autotune.choose(CANDIDATES, ARGS, **OPTIONS)
    print(json.dumps({
        "process": jax.process_index(), "name": traced[0].name,
        "from_cache": traced[0].from_cache, "again": again.name,
        "again_from_cache": again.from_cache, "compiled": autotune.compiled_candidates(),
        "result_ok": bool(np.allclose(local, np.tanh(a @ b), atol=1e-5))}), flush=True)


if __name__ == "__main__":
    main()
