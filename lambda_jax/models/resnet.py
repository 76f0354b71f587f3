"""Bottleneck ResNets whose 3x3 slots hold convolutions, lambda layers or self-attention.

One module, :class:`ResNet`, covers every architecture of the LambdaNetworks paper (Bello,
ICLR 2021): the plain ResNet-50 of its Table 3 and hybrid-placement table, the ResNet-RS based
LambdaResNets, and the small models for 32x32 images. The per-stage ``stage_slots`` setting
chooses what sits in the 3x3 slot of each bottleneck block:

* :class:`ConvSlot` - a 3x3 convolution (strided in the first block of a stage);
* :class:`LambdaSlot` - a :class:`~lambda_jax.layers.LambdaLayer` (global or local scope r,
  key depth k, heads h, intra-depth u);
* :class:`AttentionSlot` - :class:`~lambda_jax.layers.attention.RelativeSelfAttention`;
* :class:`AxialAttentionSlot` - :class:`~lambda_jax.layers.attention.AxialSelfAttention`;
* :class:`AugmentedConvSlot` - an attention-augmented convolution
  (:class:`~lambda_jax.layers.attention.AttentionAugmentedConv`, Bello et al. 2019);
* :class:`SANSlot` - SAN's patchwise self-attention
  (:class:`~lambda_jax.layers.san.PatchwiseSelfAttention`, Zhao et al. 2020).

A stride-2 block whose slot is a lambda layer, attention (global, local or axial) or SAN
applies the layer at full resolution and then a 3x3 average pool with stride 2 ("3x3
average-pooling with stride 2 after the lambda layers ... in place of the strided
convolution", the paper's appendix). An
attention-augmented convolution strides its convolution and attends over its input
average-pooled 3x3 with stride 2.

The ResNet-RS options (Bello et al. 2021, "Revisiting ResNets", arXiv 2103.07579; layer order
as in the tensorflow/tpu ``models/official/resnet/resnet_model.py`` it released): ResNet-D stem
(3x3 convolutions with 32, 32, 64 channels) whose max pool is replaced by a strided 3x3
convolution, ResNet-D shortcut (2x2 average pool, then 1x1 convolution), squeeze-excitation
after the last batch norm of each block (``se_ratio`` of the block's output channels, with
bias), stochastic depth with rate ``drop_path_rate * (s + 2) / (num_stages + 1)`` in stage s
(0-based), dropout before the classifier, zero-initialised scale of each block's last batch
norm, classifier initialised with N(0, 0.01).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.layers.attention import (
    AttentionAugmentedConv,
    AxialSelfAttention,
    RelativeSelfAttention,
)
from lambda_jax.layers.lambda_layer import (
    LambdaLayer,
    SharedPositionEmbeddings,
    position_embedding_shape,
)
from lambda_jax.layers import pooling
from lambda_jax.layers.norm import batch_norm
from lambda_jax.layers.san import PatchwiseSelfAttention


@dataclasses.dataclass(frozen=True)
class ConvSlot:
    """A square convolution in the bottleneck slot (``kernel_size`` 3 in every ResNet)."""

    kernel_size: int = 3


@dataclasses.dataclass(frozen=True)
class LambdaSlot:
    """A lambda layer in the bottleneck slot; fields as in :class:`LambdaLayer`.

    The defaults are the paper's main setting: k=16, h=4, u=1 with a 23x23 lambda
    convolution (the all-lambda ResNet-50 of Table 3, 15.0M parameters).

    ``shared_embeddings=True``: the layer uses position embeddings that the
    :class:`ResNet` holds once for all such slots with embeddings of the same shape (for a
    local scope: every layer with the same r, k and u; for a global one: every layer at the
    same input size), the "shared embeddings" of the paper's Table 4.
    """

    dim_k: int = 16
    heads: int = 4
    dim_u: int = 1
    position: str = "local"
    receptive_field: int = 23
    shared_embeddings: bool = False

    def embedding_shape(self, spatial: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        """The layer's position-embedding shape for a slot input of spatial size ``spatial``."""
        return position_embedding_shape(
            self.position, tuple(spatial), self.dim_k, self.dim_u, self.receptive_field)


@dataclasses.dataclass(frozen=True)
class AttentionSlot:
    """Relative multi-head self-attention in the bottleneck slot (``window=None``: global)."""

    heads: int = 8
    window: Optional[int] = 7


@dataclasses.dataclass(frozen=True)
class AxialAttentionSlot:
    """Axial self-attention in the bottleneck slot: height pass then width pass, each global
    along its axis (:class:`~lambda_jax.layers.attention.AxialSelfAttention`)."""

    heads: int = 8


@dataclasses.dataclass(frozen=True)
class AugmentedConvSlot:
    """An attention-augmented convolution (Bello et al. 2019) in the bottleneck slot.

    With the slot's width F_out as the convolution's output channels: value depth
    ``d_v = value_ratio * F_out`` (upsilon) and key depth ``d_k = key_ratio * F_out``
    (kappa), each rounded to the nearest positive multiple of ``heads``, and ``d_k`` at least
    ``min_key_depth_per_head * heads``. The defaults are the paper's: kappa = 2 upsilon = 0.2,
    8 heads, "a minimum of 20 dimensions per head for the keys".
    """

    key_ratio: float = 0.2
    value_ratio: float = 0.1
    heads: int = 8
    min_key_depth_per_head: int = 20
    kernel_size: int = 3

    def depths(self, features: int) -> tuple[int, int]:
        """``(key_depth, value_depth)`` of the layer for ``features`` output channels."""
        for name in ("key_ratio", "value_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(
                    f"AugmentedConvSlot.{name} must be in (0, 1], got {getattr(self, name)}."
                )
        if self.heads < 1:
            raise ValueError(f"AugmentedConvSlot.heads must be positive, got {self.heads}.")

        def per_head(ratio: float) -> int:
            return max(1, int(ratio * features / self.heads + 0.5))

        key_per_head = max(per_head(self.key_ratio), self.min_key_depth_per_head)
        value_per_head = min(per_head(self.value_ratio), features // self.heads)
        return key_per_head * self.heads, value_per_head * self.heads


@dataclasses.dataclass(frozen=True)
class SANSlot:
    """SAN's patchwise self-attention (Zhao et al. 2020) in the bottleneck slot.

    Fields as in :class:`~lambda_jax.layers.san.PatchwiseSelfAttention`; the relation depth is
    the slot's width divided by ``relation_reduction`` (SAN: ``rel_planes = planes // 16`` of
    the layer's input). The defaults are SAN's: 7x7 footprint, weights shared by 8 channels.
    """

    kernel_size: int = 7
    share_planes: int = 8
    relation_reduction: int = 16

    def relation_depth(self, features: int) -> int:
        """Channels of the relation projections for a slot of ``features`` channels."""
        if self.relation_reduction < 1:
            raise ValueError(
                f"SANSlot.relation_reduction must be positive, got {self.relation_reduction}."
            )
        return max(1, features // self.relation_reduction)


Slot = Union[ConvSlot, LambdaSlot, AttentionSlot, AxialAttentionSlot, AugmentedConvSlot, SANSlot]
SlotSpec = Union[str, Mapping[str, Any], Slot]
STEMS = ("imagenet", "resnet_d", "resnet_rs", "cifar")


_SLOT_CLASSES = {
    "conv": ConvSlot,
    "lambda": LambdaSlot,
    "attention": AttentionSlot,
    "axial_attention": AxialAttentionSlot,
    "augmented_conv": AugmentedConvSlot,
    "san": SANSlot,
}
_SLOT_TYPES = tuple(_SLOT_CLASSES.values())


def _slot(spec: SlotSpec) -> Slot:
    if isinstance(spec, _SLOT_TYPES):
        return spec
    if isinstance(spec, str) and spec in _SLOT_CLASSES:
        return _SLOT_CLASSES[spec]()
    if isinstance(spec, Mapping) and spec.get("kind") in _SLOT_CLASSES:
        slot_class = _SLOT_CLASSES[spec["kind"]]
        settings = {key: value for key, value in spec.items() if key != "kind"}
        known = {field.name for field in dataclasses.fields(slot_class)}
        if set(settings) - known:
            raise ValueError(
                f"Unknown settings {sorted(set(settings) - known)} for a {spec['kind']!r} "
                f"slot; the settings are {sorted(known)}."
            )
        return slot_class(**settings)
    raise ValueError(
        f"A slot must be one of {sorted(_SLOT_CLASSES)}, a mapping with 'kind' set to one of "
        f"them and the slot's settings, or one of the slot classes "
        f"({', '.join(c.__name__ for c in _SLOT_TYPES)}); got {spec!r}."
    )


def resolve_stage_slots(
    stage_slots: Sequence[Union[SlotSpec, Sequence[SlotSpec]]], stage_depths: Sequence[int]
) -> tuple[tuple[Slot, ...], ...]:
    """Expands ``stage_slots`` to one slot per block.

    Args:
      stage_slots: one entry per stage: a slot for every block of the stage, or a sequence
        with one slot per block. A slot is a :class:`ConvSlot`, :class:`LambdaSlot`,
        :class:`AttentionSlot`, :class:`AxialAttentionSlot`, :class:`AugmentedConvSlot` or
        :class:`SANSlot`, its name (``"conv"``, ``"lambda"``, ``"attention"``,
        ``"axial_attention"``, ``"augmented_conv"``, ``"san"``: default settings) or a
        mapping such as ``{"kind": "lambda", "receptive_field": 7}``.
      stage_depths: number of blocks per stage.

    Returns:
      ``stage_slots[s][b]``: the slot of block b of stage s.
    """
    if len(stage_slots) != len(stage_depths):
        raise ValueError(
            f"stage_slots has {len(stage_slots)} entries but there are {len(stage_depths)} "
            "stages (stage_depths); give one slot, or one slot per block, for each stage."
        )
    resolved = []
    for stage, (spec, depth) in enumerate(zip(stage_slots, stage_depths)):
        if isinstance(spec, (str, Mapping) + _SLOT_TYPES):
            resolved.append((_slot(spec),) * depth)
            continue
        if len(spec) != depth:
            raise ValueError(
                f"stage_slots[{stage}] lists {len(spec)} slots for a stage of {depth} blocks."
            )
        resolved.append(tuple(_slot(s) for s in spec))
    return tuple(resolved)


def _padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # Padding fixed by the kernel size (not by the input size), as in the reference ResNets.
    low = (kernel_size - 1) // 2
    return ((low, kernel_size - 1 - low),) * 2


def _conv(module: nn.Module, features: int, kernel_size: int, stride: int, name: str) -> nn.Conv:
    """Bias-free convolution with He (fan-out) initialisation, in ``module``'s dtypes."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=stride,
        padding=_padding(kernel_size),
        use_bias=False,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


def classifier_logits(module: nn.Module, features: jax.Array) -> jax.Array:
    """``[batch, channels]`` -> float32 logits ``[batch, module.num_classes]``.

    A linear classifier named ``head`` in ``module``'s dtypes, its kernel initialised with
    N(0, 0.01).
    """
    chex.assert_rank(features, 2)
    logits = nn.Dense(
        module.num_classes,
        kernel_init=nn.initializers.normal(0.01),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name="head",
    )(features)
    logits = logits.astype(jnp.float32)
    chex.assert_shape(logits, (features.shape[0], module.num_classes))
    return logits


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(W2 relu(W1 mean(x)))`` on ``[batch, H, W, C]``."""

    reduced: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = nn.relu(dense(self.reduced, name="reduce")(gate))
        gate = nn.sigmoid(dense(channels, name="expand")(gate))
        return x * gate


class Bottleneck(nn.Module):
    """1x1 -> slot -> 1x1 bottleneck block with a residual connection.

    Input ``[batch, H, W, C]``; output ``[batch, H/stride, W/stride, width * expansion]``.

    Attributes:
      width: channels of the slot (the bottleneck width).
      slot: what sits in the 3x3 slot.
      stride: 1 or 2.
      expansion: output channels are ``width * expansion``.
      se_ratio: squeeze-excitation width as a fraction of the output channels (0: none).
      resnet_d_shortcut: strided projection shortcuts average-pool before the 1x1 conv.
      drop_path_rate: stochastic-depth probability of dropping the residual branch.
      zero_init_last_bn: the last batch norm's scale starts at zero.
      axis_name, bn_momentum, bn_epsilon, dtype, param_dtype: as in :class:`ResNet`.
    """

    width: int
    slot: Slot = ConvSlot()
    stride: int = 1
    expansion: int = 4
    se_ratio: float = 0.0
    resnet_d_shortcut: bool = False
    drop_path_rate: float = 0.0
    zero_init_last_bn: bool = True
    axis_name: Optional[Any] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _spatial(
        self, y: jax.Array, train: bool, position_embeddings: Optional[jax.Array]
    ) -> jax.Array:
        slot = self.slot
        if isinstance(slot, ConvSlot):
            return _conv(self, self.width, slot.kernel_size, self.stride, "conv2")(y)
        if isinstance(slot, AugmentedConvSlot):
            key_depth, value_depth = slot.depths(self.width)
            return AttentionAugmentedConv(
                features=self.width,
                key_depth=key_depth,
                value_depth=value_depth,
                heads=slot.heads,
                kernel_size=slot.kernel_size,
                strides=self.stride,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="augmented_conv2",
            )(y)
        if isinstance(slot, LambdaSlot):
            y = LambdaLayer(
                dim_out=self.width,
                dim_k=slot.dim_k,
                heads=slot.heads,
                dim_u=slot.dim_u,
                position=slot.position,
                receptive_field=slot.receptive_field,
                axis_name=self.axis_name,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="lambda2",
            )(y, train=train, embeddings=position_embeddings)
        elif isinstance(slot, AxialAttentionSlot):
            y = AxialSelfAttention(
                dim_out=self.width,
                heads=slot.heads,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="axial_attention2",
            )(y)
        elif isinstance(slot, SANSlot):
            y = PatchwiseSelfAttention(
                dim_out=self.width,
                relation_depth=slot.relation_depth(self.width),
                share_planes=slot.share_planes,
                kernel_size=slot.kernel_size,
                axis_name=self.axis_name,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="san2",
            )(y, train=train)
        else:
            y = RelativeSelfAttention(
                dim_out=self.width,
                heads=slot.heads,
                window=slot.window,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="attention2",
            )(y)
        if self.stride > 1:
            y = pooling.average_pool(y, 3, self.stride, "symmetric")
        return y

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, position_embeddings: Optional[jax.Array] = None
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[batch, H, W, C]``.
          train: batch statistics and stochastic depth when True.
          position_embeddings: for a lambda slot, embeddings shared with other layers, of
            shape ``slot.embedding_shape((H, W))``; ``None``: its own.

        Returns:
          ``[batch, H/stride, W/stride, width * expansion]``.
        """
        out_features = self.width * self.expansion
        y = nn.relu(batch_norm(self, train, "bn1")(_conv(self, self.width, 1, 1, "conv1")(x)))
        y = nn.relu(
            batch_norm(self, train, "bn2")(self._spatial(y, train, position_embeddings))
        )
        y = _conv(self, out_features, 1, 1, "conv3")(y)
        y = batch_norm(self, train, "bn3", zero_scale=self.zero_init_last_bn)(y)
        if self.se_ratio > 0:
            y = SqueezeExcite(
                max(1, int(out_features * self.se_ratio)),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="se",
            )(y)
        if self.drop_path_rate > 0:
            # Dropping whole examples of the residual branch is stochastic depth.
            y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
                y, deterministic=not train
            )

        shortcut = x
        if x.shape[-1] != out_features or self.stride > 1:
            stride = self.stride
            if self.resnet_d_shortcut and stride > 1:
                shortcut = pooling.average_pool(shortcut, stride, stride, "same")
                stride = 1
            shortcut = _conv(self, out_features, 1, stride, "shortcut_conv")(shortcut)
            shortcut = batch_norm(self, train, "shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


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
      expansion: bottleneck expansion.
      stem: ``"imagenet"`` (7x7/2 conv, 3x3/2 max pool), ``"resnet_d"`` (3x3 convs with
        ``stem_width/2, stem_width/2, stem_width`` channels, the first strided, then the max
        pool), ``"resnet_rs"`` (the ResNet-D stem with the max pool replaced by a 3x3/2 conv)
        or ``"cifar"`` (one 3x3 conv, stride 1, for 32x32 images).
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

    def _check_settings(self) -> tuple[tuple[Slot, ...], ...]:
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
        return resolve_stage_slots(self.stage_slots, self.stage_depths)

    def _stem(self, x: jax.Array, train: bool) -> jax.Array:
        def conv_bn_relu(y: jax.Array, features: int, kernel_size: int, stride: int, index: int):
            y = _conv(self, features, kernel_size, stride, f"stem_conv{index}")(y)
            return nn.relu(batch_norm(self, train, f"stem_bn{index}")(y))

        if self.stem == "cifar":
            return conv_bn_relu(x, self.stem_width, 3, 1, 1)
        if self.stem == "imagenet":
            x = conv_bn_relu(x, self.stem_width, 7, 2, 1)
        else:
            x = conv_bn_relu(x, self.stem_width // 2, 3, 2, 1)
            x = conv_bn_relu(x, self.stem_width // 2, 3, 1, 2)
            x = conv_bn_relu(x, self.stem_width, 3, 1, 3)
        if self.stem == "resnet_rs":
            return conv_bn_relu(x, self.stem_width, 3, 2, 4)
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=_padding(3))

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
        slots = self._check_settings()
        chex.assert_rank(images, 4)
        x = self._stem(images.astype(self.dtype), train)
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
                embeddings = None
                if isinstance(slot, LambdaSlot) and slot.shared_embeddings:
                    shape = slot.embedding_shape(x.shape[1:3])
                    if (slot.position, shape) not in shared:
                        shared[slot.position, shape] = SharedPositionEmbeddings(
                            shape, slot.position, self.param_dtype,
                            name=f"shared_embeddings{len(shared) + 1}",
                        )()
                    embeddings = shared[slot.position, shape]
                x = block(x, train=train, position_embeddings=embeddings)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, name="head_dropout")(x, deterministic=not train)
        return classifier_logits(self, x)
