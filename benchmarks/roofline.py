"""The lambda layer against the machine: time versus the roofline of the paper's formulation.

The roofline time of a case is the FLOPs of the paper's formulation (XLA's cost analysis of
``baselines.reference_lambda``, forward + backward) divided by the FLOP/s of a large dense
matmul measured in the same run. A formulation with fewer FLOPs keeps the reference's
roofline. The second table compares formulations of the local position term alone,
``Σ_k q λp`` with ``λp`` from the lambda convolution; the third times the layer's local
implementations as the scope r and the intra-depth u grow. Training steps differentiate
``vdot(out, g)`` with a fixed random cotangent g (``common.training_step``).

    PYTHONPATH=$PWD python benchmarks/roofline.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402
import common  # noqa: E402
from lambda_jax.core import position  # noqa: E402
from lambda_jax.core.position import shift  # noqa: E402


def layer_rows(batch, size, channels, dim_k, heads, cases, runs, matmul):
    """One row per (case, implementation); ``matmul`` is the compiled reference matmul.

    The variants of a case and the matmul are timed taking turns, so each case's roofline
    uses the matmul rate of the same moments.
    """
    rows = []
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    for name, pos, r in cases:
        local = pos == "local"
        ref_params = baselines.init_reference_lambda(
            jax.random.key(1), channels, channels, dim_k, heads, (size, size),
            receptive_field=r if local else None)
        ref_apply = lambda p, x, pos=pos: baselines.reference_lambda(p, x, heads, pos)  # noqa: E731
        ref_step, g = common.training_step(ref_apply, ref_params, x)
        reference_flops = common.flops_of(ref_step, ref_params, x, g)
        implementations = ["tiled", "shift", "banded", "conv"] if local else ["auto"]
        variants = {("lambda_jax " + impl if local else "lambda_jax"): impl
                    for impl in implementations}
        variants["paper formulation (jnp)"] = None
        compiled = {}
        for label, impl in variants.items():
            if impl is None:
                apply, params = ref_apply, ref_params
            else:
                settings = dict(dim_out=channels, dim_k=dim_k, heads=heads, position=pos,
                                receptive_field=r or 1, implementation=impl)
                apply, params = baselines.init_lambda_layer(jax.random.key(1), x, **settings)
            compiled[label, "forward"] = common.compile_case(apply, params, x)
            step, g = common.training_step(apply, params, x)
            compiled[label, "train"] = common.compile_case(step, params, x, g)
        runners = {key: case["run"] for key, case in compiled.items()}
        runners["matmul"] = matmul["run"]
        seconds = common.time_interleaved(runners, runs)
        roofline = reference_flops / (matmul["flops"] / seconds["matmul"])
        for label in variants:
            train = compiled[label, "train"]
            rows.append({
                "case": name, "implementation": label,
                "forward_ms": 1e3 * seconds[label, "forward"],
                "train_ms": 1e3 * seconds[label, "train"],
                "train_gflop": train["flops"] / 1e9,
                "achieved_gflops": train["flops"] / seconds[label, "train"] / 1e9,
                "reference_gflop": reference_flops / 1e9,
                "matmul_gflops": matmul["flops"] / seconds["matmul"] / 1e9,
                "roofline_ms": 1e3 * roofline,
                "train_over_roofline": seconds[label, "train"] / roofline,
                "train_memory_mb": train["memory_bytes"] / 2**20,
            })
            print(rows[-1], flush=True)
    return rows


def scope_sweep_rows(batch, size, channels, dim_k, heads, scopes, runs, shift_max=289):
    """Layer forward and forward+backward per local implementation as the scope r and the
    intra-depth u grow (``scopes``: ``(r, u)`` pairs). "shift" runs while
    ``r * r * u <= shift_max`` (its compile time grows with the terms it unrolls)."""
    rows = []
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    for r, u in scopes:
        implementations = ["tiled", "banded", "conv"]
        if r * r * u <= shift_max:
            implementations.insert(1, "shift")
        compiled = {}
        for impl in implementations:
            apply, params = baselines.init_lambda_layer(
                jax.random.key(1), x, dim_out=channels, dim_k=dim_k, heads=heads, dim_u=u,
                position="local", receptive_field=r, implementation=impl)
            compiled[impl, "forward"] = common.compile_case(apply, params, x)
            step, g = common.training_step(apply, params, x)
            compiled[impl, "train"] = common.compile_case(step, params, x, g)
        seconds = common.time_interleaved(
            {key: case["run"] for key, case in compiled.items()}, runs)
        for impl in implementations:
            rows.append({"r": r, "u": u, "implementation": impl,
                         "forward_ms": 1e3 * seconds[impl, "forward"],
                         "train_ms": 1e3 * seconds[impl, "train"],
                         "train_memory_mb": compiled[impl, "train"]["memory_bytes"] / 2**20})
            print(rows[-1], flush=True)
    return rows


def position_term_rows(batch, size, dim_k, heads, depth_v, receptive_fields, runs):
    """The local position term alone: [b, n, h, v] from queries, values and kernel."""
    rows = []
    keys = jax.random.split(jax.random.key(2), 3)
    queries = jax.random.normal(keys[0], (batch, size, size, heads, dim_k))
    values = jax.random.normal(keys[1], (batch, size, size, depth_v, 1))

    def convolution(q, v, e):
        lambdas = position.lambda_convolution(v, e)
        return jnp.einsum("bnhk,bnkv->bnhv", q.reshape(batch, -1, heads, dim_k), lambdas)

    def shift_autodiff(q, v, e):
        flat = e.reshape(-1, *e.shape[2:])
        out = shift._shift_output(q, v, flat.reshape(e.shape))
        return out.reshape(batch, -1, heads, depth_v)

    formulations = [
        ("lambda convolution, then q·λp (paper)", convolution),
        ("a = q·E, shifted value slices, XLA's gradient", shift_autodiff),
        ("a = q·E, shifted value slices, hand-written gradient (shift)",
         position.shifted_position_output),
        ("banded products per row tile, fused with q, recomputed (tiled, default)",
         position.tiled_position_output),
    ]
    for r in receptive_fields:
        kernel = jax.random.normal(keys[2], (r, r, dim_k, 1))
        compiled = {}
        for label, f in formulations:
            compiled[label, "forward"] = common.compile_case(f, queries, values, kernel)
            step, g = common.training_step(f, queries, values, kernel, argnums=(0, 1, 2))
            compiled[label, "train"] = common.compile_case(step, queries, values, kernel, g)
        seconds = common.time_interleaved(
            {key: case["run"] for key, case in compiled.items()}, runs)
        for label, _ in formulations:
            rows.append({
                "r": r, "formulation": label,
                "forward_ms": 1e3 * seconds[label, "forward"],
                "forward_gflop": compiled[label, "forward"]["flops"] / 1e9,
                "train_ms": 1e3 * seconds[label, "train"],
                "train_gflop": compiled[label, "train"]["flops"] / 1e9,
                "train_memory_mb": compiled[label, "train"]["memory_bytes"] / 2**20,
            })
            print(rows[-1], flush=True)
    return rows


def main():
    args = common.parse_args(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--no-scope-sweep", action="store_true", help="leave out the third table"))
    if args.smoke:
        batch, size, channels, runs = 2, 8, 16, 1
        cases = [("global", "global", None), ("local r=3", "local", 3), ("content only", "none", None)]
        receptive_fields = [3]
        sweep = [(3, 1), (5, 1), (3, 2)]
    else:
        batch, size, channels, runs = 8, 32, 128, args.runs
        cases = [("global", "global", None), ("local r=9", "local", 9),
                 ("local r=23", "local", 23), ("content only", "none", None)]
        receptive_fields = [9]
        sweep = [(5, 1), (9, 1), (13, 1), (17, 1), (23, 1), (3, 4), (5, 2), (9, 2), (5, 4),
                 (7, 4)]
    dim_k, heads = 16, 4
    matmul = common.matmul_case(256 if args.smoke else 2048)
    layers = layer_rows(batch, size, channels, dim_k, heads, cases, runs, matmul)
    terms = position_term_rows(batch, size, dim_k, heads, channels // heads, receptive_fields,
                               runs)
    scopes = [] if args.no_scope_sweep else scope_sweep_rows(batch, size, channels, dim_k,
                                                             heads, sweep, runs)
    common.print_table(layers, ["case", "implementation", "forward_ms", "train_ms",
                                "train_gflop", "achieved_gflops", "reference_gflop",
                                "matmul_gflops", "roofline_ms", "train_over_roofline", "train_memory_mb"])
    print()
    common.print_table(terms, ["r", "formulation", "forward_ms", "forward_gflop",
                               "train_ms", "train_gflop", "train_memory_mb"])
    print()
    common.print_table(scopes, ["r", "u", "implementation", "forward_ms", "train_ms",
                                "train_memory_mb"])
    settings = dict(batch=batch, size=size, channels=channels, dim_k=dim_k, heads=heads,
                    runs=runs)
    print(common.write_json(args.out, "roofline", {"settings": settings, "layers": layers,
                                                   "position_term": terms,
                                                   "scope_sweep": scopes}))
    fig, axes = common.new_figure()
    ax = axes[0, 0]
    labels = [f"{row['case']}\n{row['implementation']}" for row in layers]
    ax.barh(range(len(layers)), [row["train_over_roofline"] for row in layers])
    ax.axvline(2.0, color="k", linestyle="--", label="2x roofline")
    ax.set_yticks(range(len(layers)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("forward+backward time / roofline time")
    ax.set_title(f"batch {batch}, {size}x{size}, {channels} channels, k={dim_k}, h={heads}")
    ax.legend()
    print(common.save_figure(fig, args.out, "roofline"))


if __name__ == "__main__":
    main()
