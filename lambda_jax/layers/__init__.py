"""Layers: the lambda layer and its position lambdas."""

from lambda_jax.layers.lambda_layer import LambdaLayer

__all__ = ["LambdaLayer"]
