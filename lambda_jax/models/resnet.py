"""Bottleneck ResNets whose 3x3 slots hold convolutions, lambda layers or self-attention.

One module, :class:`ResNet`, covers every architecture of the LambdaNetworks paper (Bello,
ICLR 2021): the plain ResNet-50 of its Table 3 and hybrid-placement table, the ResNet-RS based
LambdaResNets, and the small models for 32x32 images. The per-stage ``stage_slots`` setting
chooses what sits in the 3x3 slot of each bottleneck block, one of the slot kinds of
:mod:`lambda_jax.models.slot_kinds` (convolution, lambda layer, relative or axial
self-attention, attention-augmented convolution, SAN's patchwise self-attention); a new kind is
one subclass of :class:`~lambda_jax.models.slot.Slot`. The stems, the bottleneck block and the
head are in :mod:`lambda_jax.models.blocks`.

A stride-2 block whose slot is a lambda layer, attention (global, local or axial) or SAN
applies the layer at full resolution and then the 3x3 average pool with stride 2 of
``ResNet.stride_pool`` ("3x3 average-pooling with stride 2 after the lambda layers ... in
place of the strided convolution", the paper's appendix; the padding is chosen in
:mod:`lambda_jax.core.pooling`). An attention-augmented convolution strides its
convolution and attends over its input average-pooled 3x3 with stride 2.

With the ResNet-RS options (Bello et al. 2021, "Revisiting ResNets", arXiv 2103.07579), the
squeeze-excitation has ``se_ratio`` of each block's output channels, stochastic depth has rate
``drop_path_rate * (s + 2) / (num_stages + 1)`` in stage s (0-based), and dropout precedes the
classifier.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.core import pooling
from lambda_jax.layers.lambda_layer import SharedPositionEmbeddings
from lambda_jax.models.blocks import (
    STEMS,
    Bottleneck,
    SqueezeExcite,
    classifier_logits,
    resnet_stem,
)
from lambda_jax.models.slot import Slot, SlotLayer, SlotSpec, resolve_stage_slots
from lambda_jax.models.slot_kinds import (
    AttentionSlot,
    AugmentedConvSlot,
    AxialAttentionSlot,
    ConvSlot,
    LambdaSlot,
    SANSlot,
    lambda_implementation_setting,
)

__all__ = [
    "STEMS",
    "AttentionSlot",
    "AugmentedConvSlot",
    "AxialAttentionSlot",
    "Bottleneck",
    "ConvSlot",
    "LambdaSlot",
    "ResNet",
    "SANSlot",
    "Slot",
    "SlotLayer",
    "SlotSpec",
    "SqueezeExcite",
    "classifier_logits",
    "lambda_implementation_setting",
    "resolve_stage_slots",
]


class ResNet(nn.Module):
    """Bottleneck ResNet classifier with per-stage slot kinds (convolution, lambda, attention,
    attention-augmented convolution, SAN).

    ``images``: ``[batch, height, width, channels]`` -> logits ``[batch, num_classes]`` in
    float32. Computation runs in ``dtype``; parameters are ``param_dtype``.

    Attributes:
      num_classes: classifier outputs.
      stage_depths: blocks per stage.
      stage_widths: bottleneck width per stage (block outputs are ``width * expansion``).
      stage_strides: stride of the first block of each stage.
      stage_slots: per stage, a slot for all its blocks or a sequence with one slot per block
        (see :func:`resolve_stage_slots`).
      stride_pool: how a strided block whose slot layer does not stride itself (lambda
        layers, attention, SAN) downsamples after the layer, one of
        ``lambda_jax.core.pooling.STRIDE_POOLS``: ``"3x3"``, the paper's 3x3 average pool
        with stride 2 with TensorFlow's "SAME" padding (the evidence is in
        :mod:`lambda_jax.core.pooling`), or ``"3x3_symmetric"``, one cell of padding on
        each side (the only pooling of lambda_jax's ResNets before this field: set it to
        use their checkpoints; the two differ on even sizes), or ``"2x2"``.
      lambda_implementation: the local formulation of every lambda slot that sets none (one
        of ``LambdaLayer``'s implementations); ``None``: each layer's default, ``"auto"``.
      expansion: bottleneck expansion.
      stem: one of :data:`STEMS`, ``"imagenet"``, ``"resnet_d"``, ``"resnet_rs"`` or
        ``"cifar"`` (described in :func:`~lambda_jax.models.blocks.resnet_stem`).
      stem_width: channels of the stem output.
      se_ratio: squeeze-excitation ratio (0: none).
      resnet_d_shortcut: average-pool before strided projection shortcuts.
      drop_path_rate: stochastic-depth rate of the last stage (scaled down for earlier ones).
      dropout_rate: dropout before the classifier.
      zero_init_last_bn: each block's last batch-norm scale starts at zero.
      axis_name: mapped axis for cross-device batch norm (every BatchNorm and LambdaLayer).
      bn_momentum: momentum of the batch-norm running statistics.
      bn_epsilon: batch-norm epsilon.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_classes: int = 1000
    stage_depths: Sequence[int] = (3, 4, 6, 3)
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    stage_slots: Sequence[Any] = ("conv", "conv", "conv", "conv")
    stride_pool: str = "3x3"
    lambda_implementation: Optional[str] = None
    expansion: int = 4
    stem: str = "imagenet"
    stem_width: int = 64
    se_ratio: float = 0.0
    resnet_d_shortcut: bool = False
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_last_bn: bool = True
    axis_name: Optional[Any] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def resolved_slots(self) -> tuple[tuple[Slot, ...], ...]:
        """The slot of every block, ``[stage][block]``, with the model's settings filled in
        (:meth:`Slot.resolve`).

        Raises:
          ValueError: for impossible settings, naming the field and what it accepts.
        """
        stages = len(self.stage_depths)
        if len(self.stage_widths) != stages or len(self.stage_strides) != stages:
            raise ValueError(
                f"ResNet.stage_depths ({self.stage_depths}), stage_widths ({self.stage_widths}) "
                f"and stage_strides ({self.stage_strides}) must have one entry per stage."
            )
        if self.stem not in STEMS:
            raise ValueError(f"ResNet.stem must be one of {STEMS}, got {self.stem!r}.")
        for name in ("drop_path_rate", "dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ResNet.{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.stride_pool not in pooling.STRIDE_POOLS:
            raise ValueError(
                f"ResNet.stride_pool must be one of {tuple(pooling.STRIDE_POOLS)}, got "
                f"{self.stride_pool!r}."
            )
        lambda_implementation_setting("ResNet.lambda_implementation", self.lambda_implementation)
        slots = resolve_stage_slots(self.stage_slots, self.stage_depths)
        return tuple(tuple(slot.resolve(self) for slot in stage) for stage in slots)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Classifies images.

        Args:
          images: ``[batch, height, width, channels]``.
          train: batch statistics, dropout and stochastic depth (``'dropout'`` rng) when True;
            all of them are the identity when False.

        Returns:
          logits ``[batch, num_classes]``, float32.
        """
        slots = self.resolved_slots()
        chex.assert_rank(images, 4)
        x = resnet_stem(self, images.astype(self.dtype), self.stem, self.stem_width, train)
        num_stages = len(self.stage_depths)
        shared = {}  # (position, shape) -> embeddings of the slots with shared_embeddings
        for stage, (width, stride, stage_slots) in enumerate(
            zip(self.stage_widths, self.stage_strides, slots)
        ):
            drop_path_rate = self.drop_path_rate * (stage + 2) / (num_stages + 1)
            for index, slot in enumerate(stage_slots):
                block = Bottleneck(
                    width=width,
                    slot=slot,
                    stride=stride if index == 0 else 1,
                    stride_pool=self.stride_pool,
                    expansion=self.expansion,
                    se_ratio=self.se_ratio,
                    resnet_d_shortcut=self.resnet_d_shortcut,
                    drop_path_rate=drop_path_rate,
                    zero_init_last_bn=self.zero_init_last_bn,
                    axis_name=self.axis_name,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"stage{stage + 1}_block{index + 1}",
                )
                key = slot.shared_embeddings_key(x.shape[1:3])
                if key is not None and key not in shared:
                    position, shape = key
                    shared[key] = SharedPositionEmbeddings(
                        shape, position, self.param_dtype,
                        name=f"shared_embeddings{len(shared) + 1}",
                    )()
                embeddings = None if key is None else shared[key]
                x = block(x, train=train, position_embeddings=embeddings)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, name="head_dropout")(x, deterministic=not train)
        return classifier_logits(self, x)
