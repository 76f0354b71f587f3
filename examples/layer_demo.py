"""Builds a LambdaLayer for each kind of position lambda, applies it and prints shapes.

    python examples/layer_demo.py
"""

import jax
import jax.numpy as jnp

from lambda_jax import LambdaLayer


def main() -> None:
    images = jax.random.normal(jax.random.key(0), (8, 32, 24, 64))  # [batch, height, width, channels]
    for position in ("global", "local", "none"):
        layer = LambdaLayer(dim_out=128, dim_k=16, heads=4, dim_u=1, position=position,
                            receptive_field=9)
        variables = layer.init(jax.random.key(1), images)
        out, _ = jax.jit(lambda v, x: layer.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, images)
        shapes = jax.tree.map(jnp.shape, variables["params"])
        print(f"position={position!r}: {images.shape} -> {out.shape}; parameters {shapes}")


if __name__ == "__main__":
    main()
