"""One accelerator host: local formulations at Table 3's lambda layers and whole models, bfloat16.

Meant for one GPU or TPU host (at most about 6 minutes there, no network); JSON out:

* per formulation of the local position term, the fused Pallas kernel (``"pallas"``)
  among them, at every lambda layer of the paper's ResNet-50s at 224 pixels, batch 8
  (``local_formulations.py``'s rows, in bfloat16): forward and training time and compiled
  temporaries, as ratios to ``"conv"``, and the fraction of the device's bfloat16 peak
  (the paper formulation's FLOPs over the time; the peak by device kind, ``PEAK_TFLOPS``,
  or ``--peak-tflops``). ``"shift"`` at r=23 is skipped and marked so (its compile takes
  minutes).
* training throughput (examples/s) and compiled memory of ResNet-50, the lambda ResNet-50
  of Table 3 (L-L-L-L), the C-C-L-L placement and LambdaResNet-50 at 224 pixels in
  bfloat16 (float32 parameters), as ratios to ResNet-50, next to the ratios of the paper's
  placement table on TPUv3 (C-C-L-L 4980 / 7240 = 0.69x, L-L-L-L 1160 / 7240 = 0.16x).

The default rule of ``implementation="auto"`` on GPU and TPU is set from this JSON once one
exists (``lambda_jax.core.position.resolve_local_implementation``).

    PYTHONPATH=$PWD python benchmarks/accelerator.py [--smoke] [--out DIR] [--batch 64]
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import lambda_shapes  # noqa: E402
import local_formulations  # noqa: E402
import models  # noqa: E402
from lambda_jax.models.families import TINY_LAMBDA  # noqa: E402

BF16 = (("dtype", jnp.bfloat16),)
MODELS = (
    models.ModelSpec("resnet50", "ResNet-50", "resnet50", BF16),
    models.ModelSpec("lambda_table3", "ResNet-50, lambda layers (Table 3, L-L-L-L)",
                     "resnet50_lambda_table3", BF16),
    models.ModelSpec("placement_ccll", "ResNet-50, C-C-L-L", "resnet50_placement_ccll", BF16),
    models.ModelSpec("lambda_resnet50", "LambdaResNet-50", "lambda_resnet50", BF16),
)
# The paper's placement table (TPUv3, examples/s), as ratios to C-C-C-C.
PAPER_TRAIN_RATIOS = {"ResNet-50": 1.0,
                      "ResNet-50, lambda layers (Table 3, L-L-L-L)": 1160 / 7240,
                      "ResNet-50, C-C-L-L": 4980 / 7240}
# One-stage, one-block models that compile in seconds on CPU.
_ONE_BLOCK = (("stage_depths", (1,)), ("stage_widths", (16,)), ("stage_strides", (1,)))
SMOKE_MODELS = (
    models.ModelSpec("resnet50", "one-block convolution", "lambda_resnet_tiny",
                     _ONE_BLOCK + (("stage_slots", ("conv",)),) + BF16),
    models.ModelSpec("lambda_table3", "one-block lambda", "lambda_resnet_tiny",
                     _ONE_BLOCK + (("stage_slots", (TINY_LAMBDA,)),) + BF16),
)


# Dense bfloat16 matrix rate per chip (TFLOP/s, the vendors' figures), by a part of the
# device kind.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}
FORMULATIONS = local_formulations.FORMULATIONS + ("pallas",)


def peak_flops(device_kind: str, given_tflops=None):
    """The device's bfloat16 peak in FLOP/s: ``given_tflops``, else ``PEAK_TFLOPS`` by the
    device kind, else None (no fraction is reported)."""
    if given_tflops:
        return given_tflops * 1e12
    for part, tflops in PEAK_TFLOPS.items():
        if part in device_kind:
            return tflops * 1e12
    return None


def add_arguments(parser):
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's bfloat16 peak (default: by device kind, "
                             "PEAK_TFLOPS)")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per model training step (default 64; 2 with --smoke)")
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="model steps whose compiled memory passes this are not run "
                             "(default: 90%% of the device's memory, 16 GiB on CPU)")


def device_memory_budget() -> float:
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)() or {}
    limit = stats.get("bytes_limit")
    return 0.9 * limit if limit else 16 * 2**30


def model_rows(specs, size, batch, runs, memory_budget):
    """Throughput and memory of each model's bfloat16 training step, as ratios to the
    first model (timed taking turns)."""
    rows, runners = [], {}
    for spec in specs:
        row, runs_of_model = models.compile_model(spec, size, batch, memory_budget)
        rows.append(row)
        runners.update(runs_of_model)
        print(row, flush=True)
    seconds, timed_once = models.time_cases(runners, runs, time_budget=20.0)
    for row in rows:
        for mode in models.MODES:
            key = row["model"], mode
            if key in seconds:
                row[f"{mode}_ex_s"] = batch / seconds[key]
                row[f"{mode}_timed_runs"] = 1 if key in timed_once else runs
        row["status"] = models.status(row, runs)
        if row["model"] in PAPER_TRAIN_RATIOS:
            row["paper_tpuv3_train_vs_baseline"] = PAPER_TRAIN_RATIOS[row["model"]]
    models.add_ratios(rows, specs[0].label)
    return rows


def main():
    args = common.parse_args(__doc__.splitlines()[0], add_arguments)
    platform = jax.default_backend()
    if args.smoke:
        shapes, specs = local_formulations.SMOKE_SHAPES[:1], SMOKE_MODELS
        size, batch, runs = 16, 2, 1
    else:
        shapes = lambda_shapes.paper_lambda_shapes()
        specs, size, batch, runs = MODELS, 224, 64, args.runs
        if platform == "cpu":
            print("benchmarks/accelerator.py measures a GPU or TPU; on CPU the full run takes "
                  "hours. Use --smoke to check it, or benchmarks/local_formulations.py.",
                  file=sys.stderr)
    batch = args.batch or batch
    memory_budget = (args.memory_budget_mb * 2**20 if args.memory_budget_mb is not None
                     else device_memory_budget())
    start = time.perf_counter()
    peak = peak_flops(jax.devices()[0].device_kind, args.peak_tflops)
    layers = local_formulations.formulation_rows(shapes, FORMULATIONS, runs=runs,
                                                 dtype=jnp.bfloat16, peak_flops=peak)
    layer_seconds = time.perf_counter() - start
    model_table = model_rows(specs, size, batch, runs, memory_budget)
    common.print_table(layers, local_formulations.COLUMNS)
    print()
    common.print_table(model_table, ["model", "size", "params_m", "train_ex_s",
                                     "train_vs_baseline", "paper_tpuv3_train_vs_baseline",
                                     "train_memory_mb", "train_memory_vs_baseline",
                                     "inference_ex_s", "train_compile_s", "status"])
    settings = dict(dtype="bfloat16", runs=runs, model_batch=batch, model_size=size,
                    device_kind=jax.devices()[0].device_kind, peak_flops=peak,
                    memory_budget_mb=memory_budget / 2**20, smoke=args.smoke,
                    layer_seconds=layer_seconds,
                    seconds=time.perf_counter() - start,
                    layer_shapes=[shape.__dict__ for shape in shapes],
                    models={spec.label: spec.name for spec in specs})
    name = f"accelerator_{platform}" + ("_smoke" if args.smoke else "")
    print(common.write_json(args.out, name, {"settings": settings, "layers": layers,
                                             "models": model_table}))


if __name__ == "__main__":
    main()
