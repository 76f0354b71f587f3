"""Whole models: training and inference examples/s, memory and FLOPs at 128 and 224 pixels.

ResNet-50 (the convolution baseline), the paper's ResNet-50 with lambda layers (Table 3),
LambdaResNet-50 (ResNet-RS body), and ResNet-50 with local (7x7), global and axial relative
self-attention (Table 4), at a fixed batch. Inference is the jitted forward in eval mode;
training is one jitted step: forward with batch statistics, softmax cross entropy, gradients
of the parameters and an SGD-momentum update (no buffer donation, so memory counts the parameters
and momentum as arguments and again as outputs). Memory is XLA's compiled memory analysis
and FLOPs its cost analysis; a case whose compiled memory passes the budget is reported
but not run. The cases of all models at one image size are timed taking turns, so their
ratios to ResNet-50 come from the same moments of the machine.

    PYTHONPATH=$PWD python benchmarks/models.py [--smoke] [--out DIR] [--batch 8]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from lambda_jax import create_model  # noqa: E402
from lambda_jax.models.resnet import AttentionSlot, AxialAttentionSlot  # noqa: E402
from lambda_jax.train.optim import cross_entropy_loss  # noqa: E402

NUM_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``create_model(name, **overrides)``, shown as ``label``, chosen by ``key`` on the
    command line."""

    key: str
    label: str
    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    def create(self):
        return create_model(self.name, num_classes=NUM_CLASSES, **dict(self.overrides))


# The first model is the baseline of the ratios.
MODELS = (
    ModelSpec("resnet50", "ResNet-50", "resnet50"),
    ModelSpec("lambda_table3", "ResNet-50, lambda layers (Table 3)", "resnet50_lambda_table3"),
    ModelSpec("lambda_resnet50", "LambdaResNet-50", "lambda_resnet50"),
    ModelSpec("local_attention", "ResNet-50, local self-attention 7x7",
              "resnet50_local_attention_table3"),
    ModelSpec("global_attention", "ResNet-50, global self-attention",
              "resnet50_global_attention_table4"),
    ModelSpec("axial_attention", "ResNet-50, axial self-attention",
              "resnet50_axial_attention_table4"),
)
# The same kinds of model at a size that compiles in seconds: one block per stage.
_TINY_GLOBAL = AttentionSlot(heads=4, window=None)
_TINY_AXIAL = AxialAttentionSlot(heads=4)
SMOKE_MODELS = (
    ModelSpec("resnet50", "tiny convolution", "lambda_resnet_tiny",
              (("stage_slots", ("conv",) * 4),)),
    ModelSpec("lambda_table3", "tiny lambda", "lambda_resnet_tiny"),
    ModelSpec("global_attention", "tiny global self-attention", "lambda_resnet_tiny",
              (("stage_slots", ("conv", _TINY_GLOBAL, _TINY_GLOBAL, _TINY_GLOBAL)),)),
    ModelSpec("axial_attention", "tiny axial self-attention", "lambda_resnet_tiny",
              (("stage_slots", ("conv", _TINY_AXIAL, _TINY_AXIAL, _TINY_AXIAL)),)),
)
MODES = ("inference", "train")


def add_arguments(parser):
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per step (default 8; 2 with --smoke)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sides in pixels (default 128 224; 32 with --smoke)")
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="cases whose compiled memory passes this are compiled but not "
                             "run (default 16 GiB; 100 MiB with --smoke)")
    parser.add_argument("--time-budget-s", type=float, default=20.0,
                        help="a case whose first run takes longer is timed by that run "
                             "alone instead of --runs more")
    parser.add_argument("--models", nargs="+", default=None,
                        choices=[spec.key for spec in MODELS],
                        help="models to measure (default all); ResNet-50, the baseline of "
                             "the ratios, is always measured")
    parser.add_argument("--skip-train", nargs="+", default=(),
                        choices=[spec.key for spec in MODELS],
                        help="models whose training step is not compiled (the lambda "
                             "ResNet-50 of Table 3 compiles it for minutes on CPU)")


def model_functions(model, tx):
    """The jitted-to-be inference and train step of ``model``.

    ``inference(variables, images)``: images ``[batch, size, size, 3]`` -> logits
    ``[batch, classes]``. ``train(params, batch_stats, opt_state, images, labels)`` with
    labels ``[batch]`` -> new params, batch statistics, optimizer state and the loss.
    """
    def inference(variables, images):
        return model.apply(variables, images, train=False)

    def train(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                          images, train=True, mutable=["batch_stats"])
            loss = cross_entropy_loss(logits, labels, NUM_CLASSES, 0.0).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return inference, train


def compile_model(spec, size, batch, memory_budget, skip_train=False):
    """Compiles the inference and (unless ``skip_train``) train step of one model at one size.

    Returns ``(row, runs)``: the row's memory, FLOPs, parameters and compile seconds per
    mode, and the no-argument runner of each mode within the memory budget.
    """
    model = spec.create()
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
    variables = model.init(jax.random.key(1), images[:1], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.1, momentum=0.9)
    inference, train = model_functions(model, tx)
    arguments = {"inference": (inference, variables, images),
                 "train": (train, params, batch_stats, tx.init(params), images, labels)}
    row = {"model": spec.label, "name": spec.name, "size": size,
           "params_m": sum(p.size for p in jax.tree.leaves(params)) / 1e6}
    if skip_train:
        del arguments["train"]
        row["train_status"] = "not compiled (--skip-train)"
    runs = {}
    for mode, (fn, *args) in arguments.items():
        start = time.perf_counter()
        case = common.compile_case(fn, *args)
        row[f"{mode}_compile_s"] = time.perf_counter() - start
        row[f"{mode}_memory_mb"] = case["memory_bytes"] / 2**20
        row[f"{mode}_gflop_per_ex"] = case["flops"] / batch / 1e9
        if case["memory_bytes"] > memory_budget:
            row[f"{mode}_status"] = "over memory budget"
        else:
            row[f"{mode}_status"] = "ok"
            runs[spec.label, mode] = case["run"]
    return row, runs


def add_ratios(rows, baseline):
    """Throughput and memory of each row relative to ``baseline``'s row of the same size."""
    base = {row["size"]: row for row in rows if row["model"] == baseline}
    for row in rows:
        reference = base[row["size"]]
        for mode in MODES:
            for key, ratio in ((f"{mode}_ex_s", f"{mode}_vs_baseline"),
                               (f"{mode}_memory_mb", f"{mode}_memory_vs_baseline")):
                if key in row and key in reference:
                    row[ratio] = row[key] / reference[key]


def time_cases(runners, runs, time_budget):
    """Median seconds of each runner; ``(seconds, timed_once)``.

    Every runner runs once first. One whose first run passes ``time_budget`` seconds keeps
    that run as its time (compiled ahead, so little first-call work is in it); the rest
    are timed in ``runs`` rounds that take turns.
    """
    first = {}
    for key, run in runners.items():
        start = time.perf_counter()
        run()
        first[key] = time.perf_counter() - start
    slow = {key for key, seconds in first.items() if seconds > time_budget}
    seconds = common.time_interleaved(
        {key: run for key, run in runners.items() if key not in slow}, runs, warm_up=False)
    seconds.update({key: first[key] for key in slow})
    return seconds, slow


def status(row, runs):
    """``ok``, or which modes passed the memory budget or were timed by one run."""
    notes = [f"{mode} {row[f'{mode}_status']}" for mode in MODES
             if row[f"{mode}_status"] != "ok"]
    if runs > 1:
        notes += [f"{mode} timed once" for mode in MODES
                  if row.get(f"{mode}_timed_runs") == 1]
    return "; ".join(notes) or "ok"


def plot(rows, sizes, batch, out_dir):
    fig, axes = common.new_figure(2)
    labels = list(dict.fromkeys(row["model"] for row in rows))
    width = 0.8 / len(sizes)
    for ax, mode in zip(axes[0], MODES):
        for i, size in enumerate(sizes):
            by_model = {row["model"]: row for row in rows if row["size"] == size}
            xs = np.arange(len(labels)) + (i - (len(sizes) - 1) / 2) * width
            values = [by_model[label].get(f"{mode}_ex_s", 0.0) for label in labels]
            ax.bar(xs, values, width, label=f"{size}x{size}")
            for x, value in zip(xs, values):
                if not value:
                    # At the foot of the axes: a log scale has no 0.
                    ax.annotate("not run", (x, 0.02), xycoords=("data", "axes fraction"),
                                rotation=90, fontsize=6, ha="center", va="bottom")
        ax.set_xticks(np.arange(len(labels)), labels, rotation=20, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"{mode} examples/s")
        ax.set_title(f"{mode}, batch {batch}")
        ax.legend(fontsize=7)
    return common.save_figure(fig, out_dir, "models")


def main():
    args = common.parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        specs, batch, sizes, runs = SMOKE_MODELS, 2, [32], 1
        memory_budget = 100 * 2**20
    else:
        specs, batch, sizes, runs = MODELS, 8, [128, 224], args.runs
        memory_budget = 16 * 2**30
    if args.models and not args.smoke:
        specs = [spec for spec in specs if spec is specs[0] or spec.key in args.models]
    batch = args.batch or batch
    sizes = args.sizes or sizes
    if args.memory_budget_mb is not None:
        memory_budget = args.memory_budget_mb * 2**20
    rows = []
    for size in sizes:
        size_rows, runners = [], {}
        for spec in specs:
            row, runs_of_model = compile_model(spec, size, batch, memory_budget,
                                               spec.key in args.skip_train)
            size_rows.append(row)
            runners.update(runs_of_model)
            print({k: v for k, v in row.items() if "compile" in k or "memory" in k},
                  spec.label, size, flush=True)
        start = time.perf_counter()
        seconds, timed_once = time_cases(runners, runs, args.time_budget_s)
        print(f"{size}x{size}: timed in {time.perf_counter() - start:.0f} s", flush=True)
        for row in size_rows:
            for mode in MODES:
                key = row["model"], mode
                if key in seconds:
                    row[f"{mode}_step_s"] = seconds[key]
                    row[f"{mode}_ex_s"] = batch / seconds[key]
                    row[f"{mode}_timed_runs"] = 1 if key in timed_once else runs
            row["status"] = status(row, runs)
        rows.extend(size_rows)
    add_ratios(rows, specs[0].label)
    common.print_table(rows, ["model", "size", "params_m", "inference_ex_s", "train_ex_s",
                              "inference_vs_baseline", "train_vs_baseline",
                              "inference_memory_mb", "train_memory_mb",
                              "train_memory_vs_baseline", "inference_gflop_per_ex",
                              "train_gflop_per_ex", "train_compile_s", "status"])
    settings = dict(batch=batch, sizes=sizes, runs=runs, baseline=specs[0].label,
                    memory_budget_mb=memory_budget / 2**20, time_budget_s=args.time_budget_s,
                    optimizer="sgd momentum 0.9",
                    models={spec.label: {"name": spec.name,
                                         "overrides": repr(dict(spec.overrides))}
                            for spec in specs})
    print(common.write_json(args.out, "models", {"settings": settings, "rows": rows}))
    print(plot(rows, sizes, batch, args.out))


if __name__ == "__main__":
    main()
