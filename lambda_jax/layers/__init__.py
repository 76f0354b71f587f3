"""Layers: the lambda layer, its causal form and its position lambdas."""

from lambda_jax.layers.lambda_layer import LambdaLayer, SharedPositionEmbeddings
from lambda_jax.layers.causal import CausalLambdaLayer, DecodeState
from lambda_jax.layers.resize import resize_relative_embeddings

__all__ = ["CausalLambdaLayer", "DecodeState", "LambdaLayer", "SharedPositionEmbeddings",
           "resize_relative_embeddings"]
