"""lambda_jax: LambdaNetworks in JAX and Flax."""

from lambda_jax import functional
from lambda_jax.layers import (
    CausalLambdaLayer,
    DecodeState,
    LambdaLayer,
    SharedPositionEmbeddings,
    resize_relative_embeddings,
)
from lambda_jax.models import create_model, list_models
from lambda_jax.weights import load_layer, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "CausalLambdaLayer",
    "DecodeState",
    "LambdaLayer",
    "SharedPositionEmbeddings",
    "create_model",
    "functional",
    "load_layer",
    "load_model",
    "list_models",
    "resize_relative_embeddings",
    "save_model",
]
