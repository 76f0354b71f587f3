"""Layer scaling: forward+backward time and memory as the image side grows.

LambdaLayer (global; local r=7 and r=23) against relative multi-head self-attention with
the same heads and depths, linear attention and a 3x3 convolution, at fixed batch and
channels. Memory is XLA's compiled memory analysis of the training step; a layer stops at
the first size whose step needs more than the memory budget or runs longer than the time
budget. FLOPs are XLA's cost analysis of the same step.

    PYTHONPATH=$PWD python benchmarks/layer_scaling.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402
import common  # noqa: E402


def layer_factories(channels, dim_k, heads):
    """name -> (key, x) -> (apply, params)."""
    def lambda_layer(position, r=1):
        def make(key, x):
            return baselines.init_lambda_layer(key, x, dim_out=channels, dim_k=dim_k,
                                               heads=heads, position=position,
                                               receptive_field=r)
        return make

    def plain(init, apply):
        def make(key, x):
            params = init(key, x.shape[-1], channels, dim_k, heads, x.shape[1:3])
            return (lambda p, x: apply(p, x, heads)), params
        return make

    return {
        "lambda global": lambda_layer("global"),
        "lambda local r=7": lambda_layer("local", 7),
        "lambda local r=23": lambda_layer("local", 23),
        "relative self-attention": plain(baselines.init_relative_self_attention,
                                         baselines.relative_self_attention),
        "linear attention": plain(baselines.init_linear_attention, baselines.linear_attention),
        "3x3 convolution": plain(baselines.init_convolution, baselines.convolution),
    }


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    if args.smoke:
        batch, channels, sizes, runs = 1, 16, [4, 8], 1
        memory_budget, time_budget = 2**30, 60.0
    else:
        batch, channels, sizes, runs = 4, 128, [8, 16, 32, 48, 64, 96, 128], min(args.runs, 3)
        memory_budget, time_budget = 6 * 2**30, 20.0
    dim_k, heads = 16, 4
    rows = []
    for name, make in layer_factories(channels, dim_k, heads).items():
        for size in sizes:
            x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
            apply, params = make(jax.random.key(1), x)
            step, g = common.training_step(apply, params, x)
            memory = jax.jit(step).lower(params, x, g).compile().memory_analysis()
            needed = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
            row = {"layer": name, "size": size, "pixels": size * size,
                   "memory_mb": needed / 2**20}
            if needed > memory_budget:
                row["status"] = "over memory budget"
                rows.append(row)
                print(row, flush=True)
                break
            result = common.measure(step, params, x, g, runs=runs)
            row.update(status="ok", train_ms=1e3 * result["seconds"],
                       gflop=result["flops"] / 1e9,
                       achieved_gflops=result["flops_per_second"] / 1e9)
            rows.append(row)
            print(row, flush=True)
            if result["seconds"] > time_budget:
                break
    common.print_table(rows, ["layer", "size", "memory_mb", "train_ms", "gflop",
                              "achieved_gflops", "status"])
    settings = dict(batch=batch, channels=channels, dim_k=dim_k, heads=heads, runs=runs,
                    memory_budget_mb=memory_budget / 2**20, time_budget_s=time_budget)
    print(common.write_json(args.out, "layer_scaling", {"settings": settings, "rows": rows}))
    fig, axes = common.new_figure(2)
    for name in dict.fromkeys(row["layer"] for row in rows):
        ok = [row for row in rows if row["layer"] == name and row["status"] == "ok"]
        for ax, key in ((axes[0, 0], "memory_mb"), (axes[0, 1], "train_ms")):
            ax.plot([row["pixels"] for row in ok], [row[key] for row in ok], "o-", label=name)
    for ax, label in ((axes[0, 0], "training-step memory (MiB)"),
                      (axes[0, 1], "forward+backward time (ms)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels (image side squared)")
        ax.set_ylabel(label)
        ax.set_title(f"batch {batch}, {channels} channels, k={dim_k}, h={heads}")
    axes[0, 0].legend(fontsize=7)
    print(common.save_figure(fig, args.out, "layer_scaling"))


if __name__ == "__main__":
    main()
