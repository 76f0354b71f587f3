"""lambda_jax: LambdaNetworks in JAX and Flax."""

from lambda_jax.layers import LambdaLayer

__version__ = "0.1.0"

__all__ = ["LambdaLayer"]
