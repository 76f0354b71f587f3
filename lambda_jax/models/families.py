"""The named ResNets of the LambdaNetworks paper's tables, the LambdaResNets, and small models.

Every name here is a :class:`~lambda_jax.models.resnet.ResNet` registered with
:func:`~lambda_jax.models.registry.register_model`; a model that is a row of two of the
paper's tables has one name and aliases (:func:`~lambda_jax.models.registry.register_alias`).
:data:`ARCHITECTURES` holds each name's model fields (:mod:`lambda_jax.models.byoanet` and
:mod:`lambda_jax.models.san` add theirs), a ``description`` and the intended image side
``resolution``. Every ResNet here records its stride pooling in its fields,
``stride_pool="3x3"`` (the paper's, see :mod:`lambda_jax.core.pooling`).

* Table 3, Table 4, the hybrid-placement table and the ablation over k, h and u: a plain
  ResNet-50 (7x7 stem, no squeeze-excitation, no ResNet-D) at 224x224 whose 3x3 slots hold
  convolutions, lambda layers, self-attention or attention-augmented convolutions.
* The LambdaResNets (the paper's Figure 4 and appendix): ResNet-RS bodies (ResNet-D stem
  with a strided convolution in place of the max pool, ResNet-D shortcuts,
  squeeze-excitation 0.25) with lambda layers in c5 and in some blocks of c4, and their
  convolution counterparts ``resnet_rs*``. Stochastic depth and dropout are training
  settings of ResNet-RS that depend on the image size: pass ``drop_path_rate`` and
  ``dropout_rate`` to :func:`lambda_jax.create_model`.
* Models for 32x32 images (and a tiny one for tests).

A parameter count in a description names its source; ``tests/test_models.py`` checks the
counts against the paper's tables. How the settings the paper does not print were chosen,
and what reproduces its counts: ``docs/parameter-counts.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from lambda_jax.models.registry import build_model, register_alias, register_model
from lambda_jax.models.resnet import (
    AttentionSlot,
    AugmentedConvSlot,
    AxialAttentionSlot,
    ConvSlot,
    LambdaSlot,
    ResNet,
    SANSlot,
    resolve_stage_slots,
)

RESNET50_DEPTHS = (3, 4, 6, 3)
# Blocks per stage of ResNet-RS: tensorflow/tpu models/official/resnet/resnet_model.py, resnet().
RESNET_RS_DEPTHS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    270: (4, 29, 53, 4),
    350: (4, 36, 72, 4),
    420: (4, 44, 87, 4),
}
# Image sides of the paper's Figure 4 (152 at 224 and 256, 270 at 256, 350 at 256 to 320,
# 420 at 320); 50 and 101, not in the figure, at ResNet-50's 224.
RESOLUTIONS = {50: 224, 101: 224, 152: 256, 200: 256, 270: 256, 350: 288, 420: 320}
# Lambda layers in c4 of each LambdaResNet (all of c5 has them): the paper's appendix.
LAMBDA_BLOCKS_IN_C4 = {50: 1, 101: 3, 152: 6, 200: 6, 270: 6, 350: 6, 420: 8}

TABLE3_LAMBDA = LambdaSlot(dim_k=16, heads=4, dim_u=1, position="local", receptive_field=23)
TABLE3_LAMBDA_U4 = LambdaSlot(dim_k=16, heads=4, dim_u=4, position="local", receptive_field=7)
LOCAL_ATTENTION = AttentionSlot(heads=8, window=7)
GLOBAL_ATTENTION = AttentionSlot(heads=8, window=None)
AUGMENTED_CONV = AugmentedConvSlot(
    key_ratio=0.2, value_ratio=0.1, heads=8, min_key_depth_per_head=20
)
# SAN's settings (the slot's defaults), with SAN's first-stage 3x3 footprint in c2.
SAN_PATCHWISE_C2 = SANSlot(kernel_size=3)
SAN_PATCHWISE = SANSlot()
CIFAR_LAMBDA = LambdaSlot(dim_k=16, heads=4, dim_u=1, position="local", receptive_field=7)
TINY_LAMBDA = LambdaSlot(dim_k=16, heads=4, dim_u=1, position="local", receptive_field=5)

# The paper's 3x3 / stride 2 average pool, recorded in every model's fields.
STRIDE_POOL = "3x3"
RESNET_RS = dict(stem="resnet_rs", resnet_d_shortcut=True, se_ratio=0.25)
CIFAR = dict(stem="cifar", stem_width=64)

ARCHITECTURES: dict[str, dict[str, Any]] = {}
# Rows of the paper's tables that are the model of another row, registered as its aliases.
ALIASES = {
    "resnet50_placement_cccc": "resnet50",
    "resnet50_placement_llll": "resnet50_lambda_table3",
    "resnet50_lambda_k16_h4_u1": "resnet50_lambda_table3",
    "resnet50_lambda_k16_h4_u4": "resnet50_lambda_u4_table3",
}


def _normalised(model: ResNet) -> ResNet:
    """``model`` with tuples of slot objects: hashable (a static argument of jax.jit)
    whatever sequences or mappings its fields held, and bad settings fail here."""
    model = model.clone(
        stage_depths=tuple(model.stage_depths),
        stage_widths=tuple(model.stage_widths),
        stage_strides=tuple(model.stage_strides),
        stage_slots=resolve_stage_slots(model.stage_slots, model.stage_depths),
    )
    model.resolved_slots()
    return model


def _register(name: str, description: str, resolution: int, **fields: Any) -> None:
    """Registers ``name`` as ``ResNet(**fields)``, or as an alias if it is in ``ALIASES``;
    ``resolution`` is its intended image side."""
    fields = dict(fields, stride_pool=fields.get("stride_pool", STRIDE_POOL))
    if name in ALIASES:
        model = ALIASES[name]
        settings = {k: v for k, v in ARCHITECTURES[model].items()
                    if k not in ("description", "resolution")}
        if _normalised(ResNet(**fields)) != _normalised(ResNet(**settings)):
            raise ValueError(f"{name!r} is listed as an alias of {model!r}, a different model.")
        register_alias(name, model)
        return
    ARCHITECTURES[name] = dict(fields, description=description, resolution=resolution)

    def factory(*, num_classes: int, dtype: Any, **overrides: Any) -> nn.Module:
        return _normalised(build_model(
            name, ResNet, fields, overrides, num_classes=num_classes, dtype=dtype))

    factory.__doc__ = description
    register_model(name)(factory)


def _c4_slots(depth: int, lambdas: int) -> tuple[Any, ...]:
    """c4 slots with ``lambdas`` lambda layers spread evenly, the last one in the last block."""
    chosen = {depth - 1 - (i * depth) // lambdas for i in range(lambdas)}
    return tuple(TABLE3_LAMBDA if block in chosen else ConvSlot() for block in range(depth))


_register(
    "resnet50",
    "ResNet-50 (He et al. 2016), the convolution baseline: Table 3 row 'convolution' and the "
    "placement row C-C-C-C (alias resnet50_placement_cccc); 25.6M parameters in Table 3.",
    224,
)
_register(
    "resnet50_se_table3",
    "ResNet-50 with squeeze-excitation (Hu et al. 2018, reduction 16, with biases) after the "
    "last batch norm of every block, Table 3 row 'conv + channel attention'; "
    "28.1M parameters in Table 3.",
    224,
    se_ratio=1 / 16,
)
_register(
    "resnet50_lambda_table3",
    "ResNet-50 with a lambda layer in every 3x3 slot (Table 3 row 'lambda layer', placement "
    "row L-L-L-L, ablation row k=16, h=4, u=1; aliases resnet50_placement_llll and "
    "resnet50_lambda_k16_h4_u1): k=16, h=4, u=1, 23x23 lambda convolution; "
    "15.0M parameters in Table 3.",
    224,
    stage_slots=(TABLE3_LAMBDA,) * 4,
)
_register(
    "resnet50_lambda_u4_table3",
    "ResNet-50 with a lambda layer in every 3x3 slot, Table 3 row 'lambda layer, u=4' and "
    "ablation row k=16, h=4, u=4 (alias resnet50_lambda_k16_h4_u4): k=16, h=4, u=4, 7x7 "
    "lambda convolution; 16.0M parameters in Table 3.",
    224,
    stage_slots=(TABLE3_LAMBDA_U4,) * 4,
)
_register(
    "resnet50_augmented_attention_table3",
    "ResNet-50 with attention-augmented convolutions (Bello et al. 2019, AA-ResNet-50) in the "
    "3x3 slots of c3, c4 and c5, Table 3 row 'conv + relative self-attention': 8 heads, "
    "kappa = 2 upsilon = 0.2, at least 20 key dimensions per head, global attention with "
    "relative row and column logits; 25.78M parameters here, 25.8M in Table 3.",
    224,
    stage_slots=("conv", AUGMENTED_CONV, AUGMENTED_CONV, AUGMENTED_CONV),
)
_register(
    "resnet50_san_patchwise",
    "ResNet-50 with SAN's patchwise self-attention (Zhao et al. 2020) in every 3x3 slot, with "
    "SAN's settings: 7x7 footprints (3x3 in c2), relation depth = width / 16, weights shared "
    "by 8 channels; 17.15M parameters (our count). A hybrid, not a row of the paper's Table 3: "
    "that row quotes SAN19 (san19_patchwise).",
    224,
    stage_slots=(SAN_PATCHWISE_C2, SAN_PATCHWISE, SAN_PATCHWISE, SAN_PATCHWISE),
)
_register(
    "resnet50_local_attention_table3",
    "ResNet-50 with local relative self-attention (Ramachandran et al. 2019) in every 3x3 "
    "slot, the self-attention baseline of Table 3: 8 heads, 7x7 windows, relative row and "
    "column embeddings; 18.0M parameters in Table 3.",
    224,
    stage_slots=(LOCAL_ATTENTION,) * 4,
)
_register(
    "resnet50_lambda_conv7_table4",
    "ResNet-50 with a lambda layer in every 3x3 slot, Table 4 row 'lambda convolution 7x7': "
    "k=16, h=4, u=1 with a 7x7 lambda convolution.",
    224,
    stage_slots=(dataclasses.replace(TABLE3_LAMBDA, receptive_field=7),) * 4,
)
_register(
    "resnet50_lambda_shared_embeddings_table4",
    "ResNet-50 with a lambda layer in every 3x3 slot, Table 4 row 'lambda layer, shared "
    "embeddings': Table 3's layers (k=16, h=4, u=1, 23x23 lambda convolution) all using one "
    "23x23 position kernel.",
    224,
    stage_slots=(dataclasses.replace(TABLE3_LAMBDA, shared_embeddings=True),) * 4,
)
_register(
    "resnet50_global_attention_table4",
    "ResNet-50 with global relative self-attention in every 3x3 slot, Table 4 row 'global "
    "self-attention' (out of memory in the paper): 8 heads, every position attends to the "
    "whole image, relative row and column embeddings.",
    224,
    stage_slots=(GLOBAL_ATTENTION,) * 4,
)
_register(
    "resnet50_axial_attention_table4",
    "ResNet-50 with axial self-attention (Ho et al. 2019; Wang et al. 2020) in every 3x3 slot, "
    "Table 4 row 'axial self-attention': 8 heads, a height pass then a width pass, each global "
    "along its axis with relative embeddings.",
    224,
    stage_slots=(AxialAttentionSlot(heads=8),) * 4,
)
for _placement in ("cccc", "lccc", "llcc", "lllc", "llll", "clll", "ccll", "cccl"):
    _register(
        f"resnet50_placement_{_placement}",
        "ResNet-50 of the paper's hybrid-placement table, stages c2-c5 = "
        f"{'-'.join(_placement.upper())} (C: 3x3 convolution, L: lambda layer with k=16, h=4, "
        "u=1, 23x23 lambda convolution).",
        224,
        stage_slots=tuple(TABLE3_LAMBDA if kind == "l" else ConvSlot() for kind in _placement),
    )

# The paper's ablation table over the query depth k, the heads h and the intra-depth u
# (ResNet-50 with a lambda layer in every slot): (k, h, u) of each row.
ABLATION_SETTINGS = (
    (8, 2, 1), (8, 16, 1), (2, 4, 1), (4, 4, 1), (8, 4, 1), (16, 4, 1), (32, 4, 1),
    (2, 8, 1), (4, 8, 1), (8, 8, 1), (16, 8, 1), (32, 8, 1), (8, 8, 4), (8, 8, 8), (16, 4, 4),
)
for _k, _h, _u in ABLATION_SETTINGS:
    _scope = 23 if _u == 1 else 7
    _register(
        f"resnet50_lambda_k{_k}_h{_h}_u{_u}",
        f"ResNet-50 with a lambda layer in every 3x3 slot, row k={_k}, h={_h}, u={_u} of the "
        f"paper's ablation table over k, h and u: {_scope}x{_scope} lambda convolution "
        "(23x23 with u=1 as in Table 3's 'lambda layer', 7x7 with u>1 as in its 'lambda layer, "
        "u=4').",
        224,
        stage_slots=(LambdaSlot(dim_k=_k, heads=_h, dim_u=_u, position="local",
                                receptive_field=_scope),) * 4,
    )

for _depth, _stages in RESNET_RS_DEPTHS.items():
    _register(
        f"resnet_rs{_depth}",
        f"ResNet-RS-{_depth} (Bello et al. 2021), the convolution counterpart of "
        f"lambda_resnet{_depth}: stage depths {list(_stages)}, ResNet-D stem and shortcuts, "
        "squeeze-excitation 0.25.",
        RESOLUTIONS[_depth],
        stage_depths=_stages,
        **RESNET_RS,
    )
    _register(
        f"lambda_resnet{_depth}",
        f"LambdaResNet-{_depth}: ResNet-RS-{_depth} (stage depths {list(_stages)}) with lambda "
        "layers (k=16, h=4, u=1, 23x23 lambda convolution) in every c5 block and in "
        f"{LAMBDA_BLOCKS_IN_C4[_depth]} of the {_stages[2]} c4 blocks.",
        RESOLUTIONS[_depth],
        stage_depths=_stages,
        stage_slots=("conv", "conv", _c4_slots(_stages[2], LAMBDA_BLOCKS_IN_C4[_depth]),
                     TABLE3_LAMBDA),
        **RESNET_RS,
    )

_register(
    "resnet26_cifar",
    "ResNet-26 for 32x32 images: one 3x3 conv stem (stride 1, no pool), bottleneck stages "
    "[2, 2, 2, 2] with widths 64-512, convolutions only.",
    32,
    stage_depths=(2, 2, 2, 2),
    **CIFAR,
)
_register(
    "lambda_resnet26_cifar",
    "LambdaResNet-26 for 32x32 images: resnet26_cifar with lambda layers (k=16, h=4, u=1, 7x7 "
    "lambda convolution) in c4 and c5, the C-C-L-L placement.",
    32,
    stage_depths=(2, 2, 2, 2),
    stage_slots=("conv", "conv", CIFAR_LAMBDA, CIFAR_LAMBDA),
    **CIFAR,
)
_register(
    "lambda_resnet38_cifar",
    "LambdaResNet-38 for 32x32 images: stages [2, 3, 5, 2], lambda layers (k=16, h=4, u=1, 7x7 "
    "lambda convolution) in c4 and c5.",
    32,
    stage_depths=(2, 3, 5, 2),
    stage_slots=("conv", "conv", CIFAR_LAMBDA, CIFAR_LAMBDA),
    **CIFAR,
)
_register(
    "attention_resnet26_cifar",
    "Self-attention ResNet-26 for 32x32 images: resnet26_cifar with local relative "
    "self-attention (8 heads, 7x7 windows) in c4 and c5.",
    32,
    stage_depths=(2, 2, 2, 2),
    stage_slots=("conv", "conv", LOCAL_ATTENTION, LOCAL_ATTENTION),
    **CIFAR,
)
_register(
    "lambda_resnet_tiny",
    "A very small LambdaResNet for tests and quick runs on 16x16 or 32x32 images: one "
    "bottleneck block per stage, widths 16-128, 16-channel 3x3 stem, lambda layers (k=16, "
    "h=4, u=1, 5x5 lambda convolution) in c4 and c5.",
    32,
    stage_depths=(1, 1, 1, 1),
    stage_widths=(16, 32, 64, 128),
    stage_slots=("conv", "conv", TINY_LAMBDA, TINY_LAMBDA),
    stem="cifar",
    stem_width=16,
)
