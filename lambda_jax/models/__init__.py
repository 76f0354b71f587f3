"""Models: bottleneck ResNets with convolution, lambda or self-attention slots, by name;
SAN's self-attention networks; causal language models with lambda layers in place of
attention; timm's LambdaResNets."""

from lambda_jax.models import byoanet, families, san
from lambda_jax.models.language import AttentionLanguageModel, LambdaLanguageModel
from lambda_jax.models.registry import (
    create_model,
    list_models,
    model_aliases,
    model_settings,
    register_alias,
    register_model,
)
from lambda_jax.models.resnet import (
    AttentionSlot,
    AugmentedConvSlot,
    AxialAttentionSlot,
    Bottleneck,
    ConvSlot,
    LambdaSlot,
    ResNet,
    SANSlot,
    Slot,
)
from lambda_jax.models.byoanet import TimmLambdaResNet
from lambda_jax.models.san import SAN, SANBlock

ARCHITECTURES = families.ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "AttentionLanguageModel",
    "AttentionSlot",
    "AugmentedConvSlot",
    "AxialAttentionSlot",
    "Bottleneck",
    "ConvSlot",
    "TimmLambdaResNet",
    "LambdaLanguageModel",
    "LambdaSlot",
    "ResNet",
    "SAN",
    "SANBlock",
    "SANSlot",
    "Slot",
    "create_model",
    "list_models",
    "model_aliases",
    "model_settings",
    "register_alias",
    "register_model",
]
