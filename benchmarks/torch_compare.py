"""LambdaLayer against the PyTorch implementations, on the same machine in one run.

lambda_jax.LambdaLayer versus ``timm.layers.lambda_layer.LambdaLayer`` and
``lambda_networks.LambdaLayer`` at equal shapes and settings (u = 1, no bias, batch norm on
queries and values): forward alone (inference: running statistics, no gradient) and
forward + backward (training: batch statistics, gradients of the parameters and the input
of ``vdot(out, g)`` with a fixed random cotangent g; ``(y * g).sum().backward()`` in PyTorch).
PyTorch gets as many threads as the machine has cores, as XLA uses.

    pip install -e ".[bench]"
    PYTHONPATH=$PWD python benchmarks/torch_compare.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from lambda_jax import LambdaLayer  # noqa: E402


def torch_layers(torch, channels, size, dim_k, heads, r):
    """The PyTorch layers that exist for this setting, by name (``r=None``: global)."""
    from lambda_networks import LambdaLayer as LucidrainsLambda
    from timm.layers.lambda_layer import LambdaLayer as TimmLambda

    layers = {}
    if r is None:
        layers["timm"] = TimmLambda(channels, channels, feat_size=(size, size), num_heads=heads,
                                    dim_head=dim_k, r=None)
        layers["lambda-networks"] = LucidrainsLambda(channels, dim_out=channels, dim_k=dim_k,
                                                     n=size, heads=heads)
    else:
        layers["timm"] = TimmLambda(channels, channels, num_heads=heads, dim_head=dim_k, r=r)
        layers["lambda-networks"] = LucidrainsLambda(channels, dim_out=channels, dim_k=dim_k,
                                                     r=r, heads=heads)
    return layers


def torch_runners(torch, layer, x):
    """No-argument forward (inference) and training-step callables of a PyTorch layer."""
    def forward():
        layer.eval()
        with torch.no_grad():
            layer(x)

    return forward, common.torch_training_step(torch, layer, x)


def jax_runners(x, settings):
    """No-argument forward (inference) and training-step callables of a LambdaLayer."""
    layer = LambdaLayer(**settings)
    variables = layer.init(jax.random.key(0), x)

    def apply(params, x):
        out, _ = layer.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return out

    forward = common.compile_case(lambda v, x: layer.apply(v, x), variables, x)
    step, g = common.training_step(apply, variables["params"], x)
    train = common.compile_case(step, variables["params"], x, g)
    return forward["run"], train["run"]


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    import torch

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    if args.smoke:
        batch, size, channels, dim_k, heads, r, runs = 2, 8, 16, 4, 2, 3, 1
    else:
        batch, size, channels, dim_k, heads, r, runs = 8, 32, 128, 16, 4, 9, args.runs
    x_torch = torch.randn(batch, channels, size, size, requires_grad=True)
    x_jax = jnp.asarray(x_torch.detach().numpy().transpose(0, 2, 3, 1))
    rows = []
    for scope, receptive_field in (("local", r), ("global", None)):
        base = dict(dim_out=channels, dim_k=dim_k, heads=heads, dim_u=1, position=scope,
                    receptive_field=receptive_field or 1)
        jax_variants = {"lambda_jax": dict(base)}
        if scope == "local":
            jax_variants["lambda_jax (implementation='conv')"] = dict(base, implementation="conv")
        runners = {name: jax_runners(x_jax, s) for name, s in jax_variants.items()}
        for name, layer in torch_layers(torch, channels, size, dim_k, heads,
                                        receptive_field).items():
            runners[name] = torch_runners(torch, layer, x_torch)
        # Every variant takes turns within each timed round (see common.time_interleaved).
        forward = common.time_interleaved({n: r[0] for n, r in runners.items()}, runs)
        train = common.time_interleaved({n: r[1] for n, r in runners.items()}, runs)
        results = {name: (forward[name], train[name]) for name in runners}
        ours_forward, ours_train = results["lambda_jax"]
        for name, (forward, train) in results.items():
            rows.append({
                "scope": scope if scope == "global" else f"local r={r}", "implementation": name,
                "forward_ms": 1e3 * forward, "train_ms": 1e3 * train,
                "forward_speedup_of_lambda_jax": forward / ours_forward,
                "train_speedup_of_lambda_jax": train / ours_train,
            })
            print(rows[-1], flush=True)
    common.print_table(rows, ["scope", "implementation", "forward_ms", "train_ms",
                              "forward_speedup_of_lambda_jax", "train_speedup_of_lambda_jax"])
    settings = dict(batch=batch, size=size, channels=channels, dim_k=dim_k, heads=heads, r=r,
                    runs=runs, torch=torch.__version__, torch_threads=threads)
    print(common.write_json(args.out, "torch_compare", {"settings": settings, "rows": rows}))
    fig, axes = common.new_figure(2)
    for ax, key, title in ((axes[0, 0], "forward_ms", "forward (inference)"),
                           (axes[0, 1], "train_ms", "forward + backward (training)")):
        labels = [f"{row['scope']}\n{row['implementation']}" for row in rows]
        ax.barh(range(len(rows)), [row[key] for row in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel("ms per batch (lower is better)")
        ax.set_title(f"{title}: batch {batch}, {size}x{size}, {channels} channels")
    print(common.save_figure(fig, args.out, "torch_compare"))


if __name__ == "__main__":
    main()
