"""The named architectures of the LambdaNetworks paper and small models for 32x32 images.

Every name here is registered with :func:`lambda_jax.models.registry.register_model`; the
dictionary :data:`ARCHITECTURES` holds the model fields of each name (those of
:class:`~lambda_jax.models.resnet.ResNet` here; :mod:`lambda_jax.models.byoanet` and
:mod:`lambda_jax.models.san` add theirs), with a docstring-like ``description``. Parameter
counts are for 1000 classes (``tests/test_models.py`` checks them against the paper's tables).

**Table 3 and the hybrid-placement table** (ResNet-50, 224x224): a plain ResNet-50 (7x7 stem,
no squeeze-excitation, no ResNet-D) whose 3x3 slots are convolutions, lambda layers or
self-attention (or squeeze-excitation, ``resnet50_se_table3``), all but the SAN row (below).
The paper does not print the lambda rows' settings; the ones used here reproduce its counts:
k=16, h=4, u=1 with a 23x23 lambda convolution (15.0M) and u=4 with a 7x7 lambda convolution
(16.0M). d-li14/lambda.pytorch's ResNet-50 with the same layers (k=16, h=4, u=1, 23x23, a
bias on the lambda convolution) counts 14.995M and was trained to 78.2% top-1, next to the
paper's 78.4%. Local relative self-attention (Ramachandran et al. 2019) uses
8 heads over 7x7 windows (18.0M).

*Conv + relative self-attention* (25.8M, 77.7%) is AA-ResNet-50 of Bello et al. 2019
("Attention Augmented Convolutional Networks", arXiv 1904.09925), the same numbers as that
paper's ResNet-50 table: each 3x3 convolution with F_out outputs becomes a convolution with
F_out - d_v outputs concatenated with d_v channels of global relative self-attention. The
settings are the paper's as far as the material we could read states them: 8 heads, kappa =
2 upsilon = 0.2 (d_k = 0.2 F_out, d_v = 0.1 F_out) and "a minimum of 20 dimensions per head
for the keys", quoted from the paper for its Wide-ResNet; we take them for ResNet-50 too, and
the count agrees. The minimum makes d_k = 160 in every ResNet-50 stage. Our choices, which the
material does not fix:
d_v = 0.1 F_out rounded to a multiple of the heads (8, 16, 24, 48 for widths 64 to 512);
augmentation in c3, c4 and c5 (the paper augments "starting from the last layer until we hit
memory constraints"); strided blocks stride the convolution and attend over the input
average-pooled 3x3 with stride 2; no biases in the projections. That gives 25.78M; with c2
also augmented 25.84M; without the 20-dimension minimum 25.11M, below the paper's count:
the minimum is what makes AA-ResNet-50 larger than ResNet-50.

*Local relative self-attention (Zhao 2020)* (20.5M, 78.2%) is SAN19 with patchwise
self-attention (Zhao, Jia and Koltun, CVPR 2020; ``hszhao/SAN``), a network of its own: five
stages [3, 3, 4, 6, 3] of pre-activation SAN blocks, not a ResNet-50. It is
``san19_patchwise`` in :mod:`lambda_jax.models.san`, with SAN's own settings (20.52M).
``resnet50_san_patchwise`` here is a hybrid that is not a row of the paper's table: SAN's
layer in ResNet-50's 3x3 slots with SAN's settings (footprint 7x7, 3x3 in the 56x56 stage as
in SAN's first stage; relation depth = input channels / 16; weights shared by 8 output
channels; biases on its projections), 17.15M parameters.

**Table 4** (memory and throughput of ResNet-50 variants; no parameter counts printed): its
'lambda layer' and 'local self-attention 7x7' rows are Table 3's ``resnet50_lambda_table3``
and ``resnet50_local_attention_table3``, 'lambda layer, k=8' is the ablation row
``resnet50_lambda_k8_h4_u1`` below; the others are ``resnet50_lambda_conv7_table4``,
``resnet50_global_attention_table4`` and ``resnet50_axial_attention_table4`` (Ho et al. 2019,
arXiv 1912.12180; Wang et al. 2020, arXiv 2003.07853: a height pass then a width pass of
multi-head attention with relative logits, each global along its axis; 8 heads as in the
other attention rows) and ``resnet50_lambda_shared_embeddings_table4`` (Table 3's lambda
layers all using one position kernel held by the model: 15.0M less 15 kernels of 23*23*16).

**The ablation table over k, h and u** (ResNet-50 with a lambda layer in every slot, 15
rows): ``resnet50_lambda_k{k}_h{h}_u{u}``. The rows' scopes are not printed; the u=1 rows use
Table 3's 23x23 lambda convolution and the u>1 rows the 7x7 one of its 'lambda layer, u=4'
row. The paper's counts (as leaderj1001/LambdaNetworks' README lists them from the paper's
table; the table itself was not in the material we could read) are then matched within 2%
by every row but k=8, h=16, u=1:
14.90M here against 15.6M printed. More heads lower the count at these widths (the values'
depth v = d/h shrinks faster than the queries' k*h grow: the paper's own k=8 rows go from
14.8M at h=4 to 14.7M at h=8), so h=16 adds only 0.16M to h=8; no scope, u or projection
setting we tried gives the 0.9M the printed value implies.

**LambdaResNets** (the paper's Figure 4 and appendix): ResNet-RS bodies (Bello et al. 2021,
"Revisiting ResNets", arXiv 2103.07579: ResNet-D stem with the max pool replaced by a strided
conv, ResNet-D shortcuts, squeeze-excitation 0.25; stage depths 50 [3,4,6,3], 101 [3,4,23,3],
152 [3,8,36,3], 200 [3,24,36,3], 270 [4,29,53,4], 350 [4,36,72,4], 420 [4,44,87,4], as in the
tensorflow/tpu ResNet-RS code) with lambda layers (k=16, h=4, u=1, 23x23 lambda convolution)
in every block of c5 and in 1 (50), 3 (101), 6 (152, 200, 270, 350) or 8 (420) blocks of c4,
the counts quoted from the paper's appendix. Which c4 blocks is not stated in the material we
could read; here they are spread evenly over c4, the last one in its last block. Stochastic
depth and dropout rates are training settings of ResNet-RS that depend on the image size:
pass ``drop_path_rate`` and ``dropout_rate`` to :func:`lambda_jax.create_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from lambda_jax.models.registry import build_model, register_model
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

RESNET_RS = dict(stem="resnet_rs", resnet_d_shortcut=True, se_ratio=0.25)
CIFAR = dict(stem="cifar", stem_width=64)

ARCHITECTURES: dict[str, dict[str, Any]] = {}


def _register(name: str, description: str, resolution: int, **fields: Any) -> None:
    """Registers ``name`` as ``ResNet(**fields)``; ``resolution`` is its intended image side."""
    ARCHITECTURES[name] = dict(fields, description=description, resolution=resolution)

    def factory(*, num_classes: int, dtype: Any, **overrides: Any) -> nn.Module:
        model = build_model(name, ResNet, fields, overrides, num_classes=num_classes, dtype=dtype)
        # Tuples of slot objects keep the module hashable (a static argument of jax.jit)
        # whatever sequences or mappings the overrides held, and bad slots fail here.
        return model.clone(
            stage_depths=tuple(model.stage_depths),
            stage_widths=tuple(model.stage_widths),
            stage_strides=tuple(model.stage_strides),
            stage_slots=resolve_stage_slots(model.stage_slots, model.stage_depths),
        )

    factory.__doc__ = description
    register_model(name)(factory)


def _c4_slots(depth: int, lambdas: int) -> tuple[Any, ...]:
    """c4 slots with ``lambdas`` lambda layers spread evenly, the last one in the last block."""
    chosen = {depth - 1 - (i * depth) // lambdas for i in range(lambdas)}
    return tuple(TABLE3_LAMBDA if block in chosen else ConvSlot() for block in range(depth))


_register(
    "resnet50",
    "ResNet-50 (He et al. 2016), the convolution baseline: Table 3 row 'convolution' and the "
    "placement row C-C-C-C, 25.6M parameters.",
    224,
)
_register(
    "resnet50_se_table3",
    "ResNet-50 with squeeze-excitation (Hu et al. 2018, reduction 16, with biases) after the "
    "last batch norm of every block, Table 3 row 'conv + channel attention'; 28.1M parameters.",
    224,
    se_ratio=1 / 16,
)
_register(
    "resnet50_lambda_table3",
    "ResNet-50 with a lambda layer in every 3x3 slot (Table 3 row 'lambda layer', placement "
    "row L-L-L-L): k=16, h=4, u=1, 23x23 lambda convolution; 15.0M parameters.",
    224,
    stage_slots=(TABLE3_LAMBDA,) * 4,
)
_register(
    "resnet50_lambda_u4_table3",
    "ResNet-50 with a lambda layer in every 3x3 slot, Table 3 row 'lambda layer, u=4': k=16, "
    "h=4, u=4, 7x7 lambda convolution; 16.0M parameters.",
    224,
    stage_slots=(TABLE3_LAMBDA_U4,) * 4,
)
_register(
    "resnet50_augmented_attention_table3",
    "ResNet-50 with attention-augmented convolutions (Bello et al. 2019, AA-ResNet-50) in the "
    "3x3 slots of c3, c4 and c5, Table 3 row 'conv + relative self-attention': 8 heads, "
    "kappa = 2 upsilon = 0.2, at least 20 key dimensions per head, global attention with "
    "relative row and column logits; 25.78M parameters (paper 25.8M).",
    224,
    stage_slots=("conv", AUGMENTED_CONV, AUGMENTED_CONV, AUGMENTED_CONV),
)
_register(
    "resnet50_san_patchwise",
    "ResNet-50 with SAN's patchwise self-attention (Zhao et al. 2020) in every 3x3 slot, with "
    "SAN's settings: 7x7 footprints (3x3 in c2), relation depth = width / 16, weights shared "
    "by 8 channels; 17.15M parameters. A hybrid, not a row of the paper's Table 3: that row "
    "quotes SAN19 (san19_patchwise).",
    224,
    stage_slots=(SAN_PATCHWISE_C2, SAN_PATCHWISE, SAN_PATCHWISE, SAN_PATCHWISE),
)
_register(
    "resnet50_local_attention_table3",
    "ResNet-50 with local relative self-attention (Ramachandran et al. 2019) in every 3x3 "
    "slot, the self-attention baseline of Table 3: 8 heads, 7x7 windows, relative row and "
    "column embeddings; 18.0M parameters.",
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
        stage_slots=("conv", "conv", _c4_slots(_stages[2], LAMBDA_BLOCKS_IN_C4[_depth]), TABLE3_LAMBDA),
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
