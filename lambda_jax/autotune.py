"""Fills the autotuning cache for every local lambda layer of a model, in training and
inference, and prints what was measured and chosen.

    python -m lambda_jax.autotune --model lambda_resnet50 --image_size 224 --batch 32 \\
        [--dtype bfloat16] [--num_classes 1000] [--out results.json]

The model is built with ``lambda_implementation="autotune"`` and its initialisation
(inference) and a training step (value and gradient of a cross-entropy loss) are traced
without running them; each local layer's ``"autotune"`` then compiles and times the
eligible formulations on the default device, and the decisions land in
``$LAMBDA_JAX_CACHE_DIR`` (default ``~/.cache/lambda_jax``), where later runs with the same
shapes, dtype and device kind find them: ``train.py`` with
``--config.model_overrides.lambda_implementation=autotune``, or ``load_model(...,
lambda_implementation="autotune")``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lambda_jax.core import autotune
from lambda_jax.layers.lambda_layer import LambdaLayer
from lambda_jax.models import create_model


def tune_model(name: str, image_size: int, batch: int, dtype: Any = jnp.float32,
               num_classes: int = 1000) -> list[dict[str, Any]]:
    """Autotunes every local lambda layer of model ``name`` on ``[batch, image_size,
    image_size, 3]`` images, in inference and in training.

    Returns:
      One row per (layer call, mode): ``layer`` (the module path), ``input`` (its input
      shape), ``mode``, ``choice``, ``from_cache`` and ``measurements`` ({formulation:
      {"seconds", "memory_bytes", "within_bound"}}; empty on processes but 0).
    """
    model = create_model(name, num_classes=num_classes, dtype=dtype,
                         lambda_implementation="autotune")
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    rows: list[dict[str, Any]] = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, LambdaLayer) and context.method_name == "__call__"
                and module.position == "local"):
            return next_fun(*args, **kwargs)
        with autotune.recording() as made:
            out = next_fun(*args, **kwargs)
        for choice in made:
            rows.append({"layer": "/".join(module.path), "input": list(args[0].shape),
                         "mode": choice.key["mode"], "choice": choice.name,
                         "from_cache": choice.from_cache,
                         "measurements": dict(choice.measurements)})
        return out

    def loss(variables, images, labels):
        logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    with nn.intercept_methods(record):
        variables = jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, train=False), images)
        jax.eval_shape(jax.value_and_grad(loss), variables, images, labels)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table: each formulation's time and memory, and the choice."""
    names = sorted({name for row in rows for name in row["measurements"]})
    header = (["layer", "input", "mode"] + [f"{name} ms / MiB" for name in names]
              + ["choice"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["layer"], "x".join(map(str, row["input"])), row["mode"]]
        for name in names:
            m = row["measurements"].get(name)
            if m is None:
                cells.append("")
            else:
                over = "" if m["within_bound"] else " (over bound)"
                cells.append(f"{m['seconds'] * 1e3:.2f} / {m['memory_bytes'] / 2**20:.1f}{over}")
        cells.append(f"**{row['choice']}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a name of lambda_jax.list_models()")
    parser.add_argument("--image_size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="examples per device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the model (parameters stay float32)")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.image_size < 1 or args.batch < 1:
        parser.error("--image_size and --batch must be positive")
    rows = tune_model(args.model, args.image_size, args.batch, jnp.dtype(args.dtype),
                      args.num_classes)
    device = jax.devices()[0]
    print(f"{args.model} at {args.image_size} px, batch {args.batch}, {args.dtype} on "
          f"{device.platform} ({device.device_kind}); cache {autotune.cache_dir()}")
    print(format_table(rows) if rows else "The model has no local lambda layer.")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "image_size": args.image_size,
                       "batch": args.batch, "dtype": args.dtype,
                       "device_kind": device.device_kind, "backend": device.platform,
                       "jax": jax.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
