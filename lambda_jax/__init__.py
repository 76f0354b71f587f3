"""lambda_jax: LambdaNetworks in JAX and Flax."""

from lambda_jax.layers import LambdaLayer, resize_relative_embeddings
from lambda_jax.models import create_model, list_models
from lambda_jax.weights import load_layer, load_model, save_model

__version__ = "0.1.0"

__all__ = ["LambdaLayer", "create_model", "list_models", "resize_relative_embeddings",
           "load_layer", "load_model", "save_model"]
