"""Measurement helpers shared by the benchmark scripts: time, compiled memory, FLOPs, output.

Time is the median wall time of several runs after compilation; memory is XLA's compiled
memory analysis (arguments + outputs + temporaries - aliased); FLOPs are XLA's cost
analysis of the same compiled program.

A training measurement differentiates ``vdot(out, g)`` with a fixed random cotangent g
(``training_step`` for JAX, ``torch_training_step`` for PyTorch): the gradient of a plain
``sum(out)`` has a constant cotangent that XLA folds into the backward pass and that
PyTorch expands into a slower backward, so neither times a real training step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def parse_args(
    description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The shared flags, and a script's own ones added by ``add_arguments(parser)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one timed run: checks that the script works")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="directory for the JSON and PNG results")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after compilation")
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": jax.default_backend(),
        "devices": [d.device_kind for d in jax.local_devices()][:1],
        "cpu_count": os.cpu_count(),
        "processor": _cpu_model(),
        "jax": jax.__version__,
    }


def compile_case(fn: Callable, *args) -> dict[str, Any]:
    """Compiles ``fn``: a no-argument ``run`` (blocks until done), its memory and FLOPs."""
    compiled = jax.jit(fn).lower(*args).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "run": lambda: jax.block_until_ready(compiled(*args)),
        "memory_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                            + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
    }


def time_interleaved(runs_by_name: dict[str, Callable[[], Any]], runs: int,
                     warm_up: bool = True) -> dict[str, float]:
    """Median seconds of each no-argument callable, timed in rounds that take turns.

    Taking turns within each round exposes every variant to the same changes of the
    machine's load, so their ratios stay fair on a shared machine. ``warm_up=False`` when
    the caller has already run each callable once.
    """
    if warm_up:
        for run in runs_by_name.values():
            run()  # first-call work is not timed
    times = {name: [] for name in runs_by_name}
    for _ in range(runs):
        for name, run in runs_by_name.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(fn: Callable, *args, runs: int = 5) -> dict[str, float]:
    """Compiles ``fn``; returns its memory (bytes), FLOPs and median run time (seconds)."""
    case = compile_case(fn, *args)
    seconds = time_interleaved({"case": case["run"]}, runs)["case"]
    return {
        "seconds": seconds,
        "memory_bytes": case["memory_bytes"],
        "flops": case["flops"],
        "flops_per_second": case["flops"] / seconds if seconds else 0.0,
    }


def flops_of(fn: Callable, *args) -> float:
    """XLA's cost-analysis FLOPs of ``fn`` without running it."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def matmul_case(size: int = 2048) -> dict[str, Any]:
    """``compile_case`` of ``jnp.dot`` of two float32 [size, size] arrays: the machine's
    matmul rate is its ``flops`` over its run time."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    case = compile_case(jnp.dot, a, a)
    case["flops"] = 2.0 * size**3
    return case


def fixed_cotangent(shape, dtype=jnp.float32, seed: int = 7) -> jax.Array:
    """The cotangent of a training measurement: N(0, 1) numbers of ``shape``."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def training_step(apply: Callable, *args, argnums=(0, 1)) -> tuple[Callable, jax.Array]:
    """Forward + backward of ``apply(*args)`` with a fixed random cotangent.

    Returns ``(step, g)``: ``step(*args, g)`` is the gradient of ``vdot(apply(*args), g)``
    with respect to the arguments ``argnums`` (for a layer: its parameters and its input),
    ``g`` a ``fixed_cotangent`` of the output's shape, passed as an argument so that it is
    data, not a constant of the compiled program.
    """
    out = jax.eval_shape(apply, *args)

    def loss(*args_and_cotangent):
        *inputs, cotangent = args_and_cotangent
        return jnp.vdot(apply(*inputs).astype(jnp.float32), cotangent.astype(jnp.float32))

    return jax.grad(loss, argnums=argnums), fixed_cotangent(out.shape, out.dtype)


def torch_training_step(torch, layer, x, seed: int = 7) -> Callable[[], None]:
    """A no-argument PyTorch training step of ``layer`` on ``x`` (which requires grad):
    ``(layer(x) * g).sum().backward()`` with a fixed random cotangent g, in training mode."""
    layer.train()
    with torch.no_grad():
        shape = layer(x).shape
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def train():
        layer.train()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (layer(x) * g).sum().backward()

    return train


_LOAD_AT_START = os.getloadavg()


def load() -> dict[str, Any]:
    """The machine's load averages (1, 5 and 15 minutes) when the script started and now:
    timings on a shared machine are noisy when the load passes its core count."""
    return {"load_average_1_5_15_min_at_start": list(_LOAD_AT_START),
            "load_average_1_5_15_min_at_end": list(os.getloadavg())}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Prints ``rows`` as a Markdown table with the given columns."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")


def write_json(out_dir: str, name: str, payload: dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"machine": {**machine(), **load()}, **payload}, f, indent=1)
    return path


def new_figure(ncols: int = 1):
    """A matplotlib figure on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(6 * ncols, 4.2), squeeze=False)


def save_figure(fig, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
