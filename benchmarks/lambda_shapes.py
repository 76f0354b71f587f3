"""The lambda layers of the paper's ResNet-50s: each layer's input shape and settings.

Read from the models themselves (their initialisation traced without running it), so the
shapes follow the model definitions: ResNet-50 at 224 pixels runs its lambda layers at the
block inputs, 56x56 in c2 to 7x7 in c5, each stage's first layer at the previous stage's side
(its 3x3 average pooling strides after the layer).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from lambda_jax import LambdaLayer, create_model  # noqa: E402

# Table 3's lambda rows (u=1 with 23x23, u=4 with 7x7) and LambdaResNet-50.
PAPER_MODELS = ("resnet50_lambda_table3", "resnet50_lambda_u4_table3", "lambda_resnet50")
# The stage of a ResNet-50 lambda layer, by its width.
STAGES = {64: "c2", 128: "c3", 256: "c4", 512: "c5"}


@dataclasses.dataclass(frozen=True)
class LambdaShape:
    """One lambda layer: input ``[batch, side, side, channels]`` and its settings."""

    batch: int
    side: int
    channels: int
    dim_out: int
    dim_k: int
    heads: int
    dim_u: int
    receptive_field: int

    @property
    def label(self) -> str:
        return (f"{STAGES.get(self.dim_out, '')} {self.side}x{self.side}x{self.channels} "
                f"r={self.receptive_field} u={self.dim_u}").strip()

    def layer(self, implementation: str = "auto", dtype: Any = None) -> LambdaLayer:
        return LambdaLayer(dim_out=self.dim_out, dim_k=self.dim_k, heads=self.heads,
                           dim_u=self.dim_u, position="local",
                           receptive_field=self.receptive_field,
                           implementation=implementation, dtype=dtype)

    def input(self, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.batch, self.side, self.side, self.channels), dtype)


def model_lambda_shapes(name: str, batch: int = 8, image_size: int = 224) -> list[LambdaShape]:
    """The distinct local lambda layers of model ``name`` on ``[batch, image_size,
    image_size, 3]`` images, in the order the model applies them."""
    found: dict[LambdaShape, None] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, LambdaLayer) and context.method_name == "__call__":
            _, side, _, channels = args[0].shape
            if module.position == "local":
                found[LambdaShape(batch, side, channels, module.dim_out, module.dim_k,
                                  module.heads, module.dim_u, module.receptive_field)] = None
        return next_fun(*args, **kwargs)

    model = create_model(name)
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return list(found)


def paper_lambda_shapes(batch: int = 8, image_size: int = 224) -> list[LambdaShape]:
    """The distinct local lambda layers of all ``PAPER_MODELS``."""
    shapes: dict[LambdaShape, None] = {}
    for name in PAPER_MODELS:
        shapes.update(dict.fromkeys(model_lambda_shapes(name, batch, image_size)))
    return list(shapes)


def layer_steps(shape: LambdaShape, implementation: str = "auto",
                dtype: Any = jnp.float32) -> dict[str, tuple[Callable, tuple]]:
    """The layer's inference and training computations on abstract arguments.

    Returns ``{"forward": (fn, args), "train": (fn, args)}`` with ``args`` as
    ``jax.ShapeDtypeStruct`` trees (``jax.jit(fn).lower(*args)`` compiles without data;
    ``concrete(args)`` makes arrays to run it): the forward in inference mode (running
    statistics), and the training step: the gradients of the parameters and the input of
    ``vdot(out, g)`` with batch statistics and a fixed random cotangent g.
    """
    layer = shape.layer(implementation, dtype)
    x = shape.input(dtype)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def forward(params, batch_stats, x):
        return layer.apply({"params": params, "batch_stats": batch_stats}, x)

    def apply(params, batch_stats, x):
        out, _ = layer.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                             mutable=["batch_stats"])
        return out

    step, cotangent = common.training_step(apply, params, batch_stats, x, argnums=(0, 2))
    g = jax.ShapeDtypeStruct(cotangent.shape, cotangent.dtype)
    return {"forward": (forward, (params, batch_stats, x)),
            "train": (step, (params, batch_stats, x, g))}


def concrete(args: tuple, seed: int = 0) -> tuple:
    """Arrays for abstract arguments: N(0, 1) numbers (positive for variances)."""
    rng = np.random.default_rng(seed)

    def fill(path, struct):
        values = rng.standard_normal(struct.shape).astype(np.float32)
        if "var" in jax.tree_util.keystr(path):
            values = np.abs(values) + 0.5
        return jnp.asarray(values, struct.dtype)

    return jax.tree_util.tree_map_with_path(fill, args)


def compiled_memory(fn: Callable, args: tuple) -> dict[str, int]:
    """XLA's memory analysis of ``jax.jit(fn)`` compiled for ``args``: temporaries and the
    total (arguments + outputs + temporaries - aliased), in bytes."""
    memory = jax.jit(fn).lower(*args).compile().memory_analysis()
    return {"temp_bytes": int(memory.temp_size_in_bytes),
            "total_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                               + memory.temp_size_in_bytes - memory.alias_size_in_bytes)}
