"""lambda_jax: LambdaNetworks in JAX and Flax."""

from lambda_jax.layers import LambdaLayer, resize_relative_embeddings

__version__ = "0.1.0"

__all__ = ["LambdaLayer", "resize_relative_embeddings"]
