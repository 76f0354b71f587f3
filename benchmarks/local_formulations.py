"""Formulations of the local position term at the lambda layers of the paper's ResNet-50s.

For every local lambda layer of Table 3's ResNet-50s (r=23 with u=1, r=7 with u=4) and
LambdaResNet-50 at 224 pixels, batch 8 (``lambda_shapes.paper_lambda_shapes``): the layer's
inference (forward, running statistics) and training step (gradients of the parameters
and the input of ``vdot(out, g)``, g a fixed random cotangent, batch statistics) per
formulation, timed taking turns, and the training step's compiled temporaries (XLA's
memory analysis), each as a ratio to ``"conv"``, the paper's lambda convolution. The
default (``"auto"``) row says whether it keeps the bounds: memory at most 1.25x conv's;
training time at most 0.8x, 0.4x and 0.2x conv's at the r=23 layers of c2, c3 and c4
(56x56x64, 28x28x128, 14x14x256), no slower than conv elsewhere.

    PYTHONPATH=$PWD python benchmarks/local_formulations.py [--smoke] [--out DIR]
        [--dtype bfloat16] [--runs 3]
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
MEMORY_BOUND = 1.25
# Training-time bounds of the default against conv, by layer (elsewhere 1.0).
TIME_BOUNDS = {"c2 56x56x64 r=23 u=1": 0.8, "c3 28x28x128 r=23 u=1": 0.4,
               "c4 14x14x256 r=23 u=1": 0.2}
# "shift" unrolls one term per kernel offset, u and head: past this many offsets times u
# its compile takes over a minute, so it is skipped (and marked so) there.
SHIFT_MAX_COMPILED_OFFSETS = 289
SMOKE_SHAPES = (
    lambda_shapes.LambdaShape(batch=2, side=8, channels=16, dim_out=16, dim_k=4, heads=2,
                              dim_u=1, receptive_field=5),
    lambda_shapes.LambdaShape(batch=2, side=6, channels=16, dim_out=16, dim_k=4, heads=2,
                              dim_u=2, receptive_field=3),
)


def add_arguments(parser):
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the layers (parameters stay float32)")


def skipped(shape: lambda_shapes.LambdaShape, implementation: str) -> str | None:
    """Why ``implementation`` is not measured at ``shape``, or None."""
    if (implementation == "shift"
            and shape.receptive_field**2 * shape.dim_u > SHIFT_MAX_COMPILED_OFFSETS):
        return (f"skipped: compiles for over a minute (r^2 u = "
                f"{shape.receptive_field**2 * shape.dim_u} > {SHIFT_MAX_COMPILED_OFFSETS})")
    return None


def formulation_rows(shapes, formulations=FORMULATIONS, runs=3, dtype=jnp.float32,
                     backend=None):
    """One row per (shape, formulation): forward and training ms, training temporaries and
    their ratios to "conv"; the row of the formulation "auto" resolves to (for ``backend``,
    default the current one) has ``default`` set and the bounds checked."""
    rows = []
    for shape in shapes:
        default = position.resolve_local_implementation(
            "auto", (shape.side, shape.side), shape.receptive_field, shape.dim_u, backend)
        cases, shape_rows = {}, {}
        for implementation in formulations:
            row = {"layer": shape.label, "implementation": implementation,
                   "default": implementation == default}
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
        seconds = common.time_interleaved({key: case["run"] for key, case in cases.items()},
                                          runs)
        conv = shape_rows.get("conv", {})
        for implementation, row in shape_rows.items():
            if row["status"] != "ok":
                rows.append(row)
                continue
            row["forward_ms"] = 1e3 * seconds[implementation, "forward"]
            row["train_ms"] = 1e3 * seconds[implementation, "train"]
            if conv.get("status") == "ok":
                row["train_vs_conv"] = (seconds[implementation, "train"]
                                        / seconds["conv", "train"])
                row["forward_vs_conv"] = (seconds[implementation, "forward"]
                                          / seconds["conv", "forward"])
                row["memory_vs_conv"] = row["train_temp_mb"] / conv["train_temp_mb"]
                if row["default"]:
                    row["time_bound"] = TIME_BOUNDS.get(shape.label, 1.0)
                    row["within_bounds"] = bool(row["memory_vs_conv"] <= MEMORY_BOUND
                                                and row["train_vs_conv"] <= row["time_bound"])
            rows.append(row)
            print(row, flush=True)
    return rows


COLUMNS = ["layer", "implementation", "default", "forward_ms", "train_ms", "train_temp_mb",
           "forward_vs_conv", "train_vs_conv", "memory_vs_conv", "time_bound",
           "within_bounds", "status"]


def main():
    args = common.parse_args(__doc__.splitlines()[0], add_arguments)
    dtype = jnp.dtype(args.dtype)
    if args.smoke:
        shapes, runs = SMOKE_SHAPES, 1
    else:
        shapes, runs = lambda_shapes.paper_lambda_shapes(), args.runs
    rows = formulation_rows(shapes, runs=runs, dtype=dtype)
    common.print_table(rows, COLUMNS)
    settings = dict(runs=runs, dtype=args.dtype, memory_bound=MEMORY_BOUND,
                    time_bounds=TIME_BOUNDS, shapes=[shape.__dict__ for shape in shapes])
    print(common.write_json(args.out, "local_formulations", {"settings": settings,
                                                             "rows": rows}))


if __name__ == "__main__":
    main()
