"""Models: bottleneck ResNets with convolution, lambda or self-attention slots, by name;
causal language models with lambda layers in place of attention."""

from lambda_jax.models import families
from lambda_jax.models.language import AttentionLanguageModel, LambdaLanguageModel
from lambda_jax.models.registry import create_model, list_models, register_model
from lambda_jax.models.resnet import (
    AttentionSlot,
    Bottleneck,
    ConvSlot,
    LambdaSlot,
    ResNet,
)

ARCHITECTURES = families.ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "AttentionLanguageModel",
    "AttentionSlot",
    "Bottleneck",
    "ConvSlot",
    "LambdaLanguageModel",
    "LambdaSlot",
    "ResNet",
    "create_model",
    "list_models",
    "register_model",
]
