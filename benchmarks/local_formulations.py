"""Formulations of the local position term at the lambda layers of the paper's ResNet-50s.

For every local lambda layer of Table 3's ResNet-50s (r=23 with u=1, r=7 with u=4) and
LambdaResNet-50 at 224 pixels, batch 8 (``lambda_shapes.paper_lambda_shapes``), or with
``--shapes compare`` the layer of ``torch_compare.py`` (batch 8, 32x32x128, k=16, h=4, u=1,
r=9): the layer's inference (forward, running statistics) and training step (gradients of
the parameters and the input of ``vdot(out, g)``, g a fixed random cotangent, batch
statistics) per formulation, timed taking turns, and the compiled temporaries of both (XLA's
memory analysis), each as a ratio to ``"conv"``, the paper's lambda convolution.

The rows of the default (``"auto"``) in each mode say how it fares: in training, whether it
keeps the bounds (memory at most 1.25x conv's; time at most 0.8x, 0.4x and 0.2x conv's at
the r=23 layers of c2, c3 and c4, no slower than conv elsewhere), and in both modes its time
as a multiple of the fastest formulation within that mode's memory bound (1.25x conv's
training memory, 2x its forward memory).

    PYTHONPATH=$PWD python benchmarks/local_formulations.py [--smoke] [--out DIR]
        [--dtype bfloat16] [--runs 3] [--shapes paper|compare]
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import lambda_shapes  # noqa: E402
from lambda_jax.core import position  # noqa: E402

FORMULATIONS = ("tiled", "banded", "shift", "conv")
MEMORY_BOUND = position.MEMORY_BOUNDS["train"]
# Training-time bounds of the default against conv, by layer (elsewhere 1.0).
TIME_BOUNDS = {"c2 56x56x64 r=23 u=1": 0.8, "c3 28x28x128 r=23 u=1": 0.4,
               "c4 14x14x256 r=23 u=1": 0.2}
SHIFT_MAX_COMPILED_OFFSETS = position.SHIFT_MAX_COMPILED_OFFSETS
# The layer that benchmarks/torch_compare.py compares with the PyTorch ports.
COMPARE_SHAPES = (
    lambda_shapes.LambdaShape(batch=8, side=32, channels=128, dim_out=128, dim_k=16, heads=4,
                              dim_u=1, receptive_field=9),
)
SMOKE_SHAPES = (
    lambda_shapes.LambdaShape(batch=2, side=8, channels=16, dim_out=16, dim_k=4, heads=2,
                              dim_u=1, receptive_field=5),
    lambda_shapes.LambdaShape(batch=2, side=6, channels=16, dim_out=16, dim_k=4, heads=2,
                              dim_u=2, receptive_field=3),
)


def add_arguments(parser):
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the layers (parameters stay float32)")
    parser.add_argument("--shapes", default="paper", choices=["paper", "compare"],
                        help="the paper's lambda layers, or the layer of torch_compare.py")


def skipped(shape: lambda_shapes.LambdaShape, implementation: str) -> str | None:
    """Why ``implementation`` is not measured at ``shape``, or None."""
    if (implementation == "shift"
            and shape.receptive_field**2 * shape.dim_u > SHIFT_MAX_COMPILED_OFFSETS):
        return (f"skipped: compiles for over a minute (r^2 u = "
                f"{shape.receptive_field**2 * shape.dim_u} > {SHIFT_MAX_COMPILED_OFFSETS})")
    return None


def _defaults(shape, backend) -> dict[str, str]:
    """The formulation ``"auto"`` resolves to at ``shape``, by mode."""
    return {mode: position.resolve_local_implementation(
        "auto", (shape.side, shape.side), shape.receptive_field, shape.dim_u, backend,
        mode=mode) for mode in position.MODES}


def _fastest_within_bound(shape_rows, mode, time_key, memory_key) -> float:
    """The least time in ``mode`` among the formulations within that mode's memory bound."""
    bound = position.MEMORY_BOUNDS[mode]
    conv_memory = shape_rows["conv"][memory_key]
    return min(row[time_key] for row in shape_rows.values()
               if row["status"] == "ok" and row[memory_key] <= bound * conv_memory)


def formulation_rows(shapes, formulations=FORMULATIONS, runs=3, dtype=jnp.float32,
                     backend=None, peak_flops=None):
    """One row per (shape, formulation): forward and training ms, their compiled
    temporaries and the ratios to "conv". The rows of the formulations "auto" resolves to
    (for ``backend``, default the current one) have ``default_train`` or
    ``default_inference`` set, the training bounds checked and the time over the fastest
    formulation within the mode's memory bound (``train_vs_fastest``, ``forward_vs_fastest``).
    With ``peak_flops`` (the device's rate, FLOP/s), every row has ``forward_peak_fraction``
    and ``train_peak_fraction``: the FLOPs of the paper's formulation ("conv", XLA's cost
    analysis) over the row's time, as a fraction of that rate."""
    rows = []
    for shape in shapes:
        defaults = _defaults(shape, backend)
        cases, shape_rows = {}, {}
        for implementation in formulations:
            row = {"layer": shape.label, "implementation": implementation,
                   "default_train": implementation == defaults["train"],
                   "default_inference": implementation == defaults["inference"]}
            shape_rows[implementation] = row
            reason = skipped(shape, implementation)
            if reason:
                row["status"] = reason
                continue
            for mode, (fn, args) in lambda_shapes.layer_steps(shape, implementation,
                                                              dtype).items():
                cases[implementation, mode] = common.compile_case(
                    fn, *lambda_shapes.concrete(args))
            row["status"] = "ok"
            row["train_temp_mb"] = cases[implementation, "train"]["temp_bytes"] / 2**20
            row["forward_temp_mb"] = cases[implementation, "forward"]["temp_bytes"] / 2**20
        seconds = common.time_interleaved({key: case["run"] for key, case in cases.items()},
                                          runs)
        conv = shape_rows.get("conv", {})
        for implementation, row in shape_rows.items():
            if row["status"] != "ok":
                continue
            row["forward_ms"] = 1e3 * seconds[implementation, "forward"]
            row["train_ms"] = 1e3 * seconds[implementation, "train"]
            if peak_flops and conv.get("status") == "ok":
                for mode in ("forward", "train"):
                    row[f"{mode}_peak_fraction"] = (cases["conv", mode]["flops"]
                                                    / seconds[implementation, mode] / peak_flops)
            if conv.get("status") == "ok":
                row["train_vs_conv"] = (seconds[implementation, "train"]
                                        / seconds["conv", "train"])
                row["forward_vs_conv"] = (seconds[implementation, "forward"]
                                          / seconds["conv", "forward"])
                row["memory_vs_conv"] = row["train_temp_mb"] / conv["train_temp_mb"]
                row["forward_memory_vs_conv"] = (row["forward_temp_mb"]
                                                 / max(conv["forward_temp_mb"], 2**-20))
                if row["default_train"]:
                    row["time_bound"] = TIME_BOUNDS.get(shape.label, 1.0)
                    row["within_bounds"] = bool(row["memory_vs_conv"] <= MEMORY_BOUND
                                                and row["train_vs_conv"] <= row["time_bound"])
        if conv.get("status") == "ok":
            for mode, time_key, memory_key in (("train", "train_ms", "train_temp_mb"),
                                               ("inference", "forward_ms", "forward_temp_mb")):
                default = shape_rows[defaults[mode]]
                default[f"{time_key.removesuffix('_ms')}_vs_fastest"] = (
                    default[time_key] / _fastest_within_bound(shape_rows, mode, time_key,
                                                              memory_key))
        for row in shape_rows.values():
            rows.append(row)
            print(row, flush=True)
    return rows


COLUMNS = ["layer", "implementation", "default_train", "default_inference", "forward_ms",
           "train_ms", "forward_temp_mb", "train_temp_mb", "forward_vs_conv", "train_vs_conv",
           "forward_memory_vs_conv", "memory_vs_conv", "time_bound", "within_bounds",
           "forward_vs_fastest", "train_vs_fastest", "forward_peak_fraction",
           "train_peak_fraction", "status"]


def main():
    args = common.parse_args(__doc__.splitlines()[0], add_arguments)
    dtype = jnp.dtype(args.dtype)
    if args.smoke:
        shapes, runs = SMOKE_SHAPES, 1
    elif args.shapes == "compare":
        shapes, runs = COMPARE_SHAPES, args.runs
    else:
        shapes, runs = lambda_shapes.paper_lambda_shapes(), args.runs
    rows = formulation_rows(shapes, runs=runs, dtype=dtype)
    common.print_table(rows, COLUMNS)
    settings = dict(runs=runs, dtype=args.dtype, memory_bound=MEMORY_BOUND,
                    memory_bounds=position.MEMORY_BOUNDS,
                    time_bounds=TIME_BOUNDS, shapes=[shape.__dict__ for shape in shapes])
    name = "local_formulations" + ("_compare" if args.shapes == "compare" else "")
    print(common.write_json(args.out, name, {"settings": settings, "rows": rows}))


if __name__ == "__main__":
    main()
