"""Layers: the lambda layer and its position lambdas."""

from lambda_jax.layers.lambda_layer import LambdaLayer
from lambda_jax.layers.resize import resize_relative_embeddings

__all__ = ["LambdaLayer", "resize_relative_embeddings"]
