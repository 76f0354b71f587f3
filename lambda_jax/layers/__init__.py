"""Layers: the lambda layer and its position lambdas."""

from lambda_jax.layers.lambda_layer import LambdaLayer, SharedPositionEmbeddings
from lambda_jax.layers.resize import resize_relative_embeddings

__all__ = ["LambdaLayer", "SharedPositionEmbeddings", "resize_relative_embeddings"]
