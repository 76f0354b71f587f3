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

Each slot kind is a subclass of :class:`Slot` that builds its own layer
(:meth:`Slot.build`); a new kind is one such class.

A stride-2 block whose slot is a lambda layer, attention (global, local or axial) or SAN
applies the layer at full resolution and then the 3x3 average pool with stride 2 of
``ResNet.stride_pool`` ("3x3 average-pooling with stride 2 after the lambda layers ... in
place of the strided convolution", the paper's appendix; the padding is chosen in
:mod:`lambda_jax.layers.pooling`). An attention-augmented convolution strides its
convolution and attends over its input average-pooled 3x3 with stride 2.

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
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

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
    IMPLEMENTATIONS,
    LambdaLayer,
    SharedPositionEmbeddings,
    position_embedding_shape,
)
from lambda_jax.layers import pooling
from lambda_jax.layers.norm import batch_norm
from lambda_jax.layers.san import PatchwiseSelfAttention


# A built slot layer: (y [batch, H, W, C], train, shared position embeddings or None) ->
# [batch, H', W', width] at the block's stride if the slot strides itself, else at H, W.
SlotLayer = Callable[[jax.Array, bool, Optional[jax.Array]], jax.Array]

# Slot kinds by name, filled in by Slot subclasses as they are declared.
_SLOT_CLASSES: dict[str, type["Slot"]] = {}


class Slot:
    """What sits in the 3x3 slot of a bottleneck block: the layer's settings, and the layer.

    A slot kind is a frozen dataclass deriving from ``Slot`` with its name,
    ``class MySlot(Slot, kind="my")``: that makes ``MySlot(...)``, ``"my"`` and
    ``{"kind": "my", ...}`` entries of ``ResNet.stage_slots``. It defines :meth:`build`.

    Attributes (class level):
      kind: the name of the slot kind in ``stage_slots``.
      strides_itself: whether the layer applies the block's stride; if not, a strided block
        applies it after the layer with ``Bottleneck.stride_pool``.
    """

    kind: ClassVar[str]
    strides_itself: ClassVar[bool] = False

    def __init_subclass__(cls, *, kind: Optional[str] = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if kind is None:  # a variant of its parent's kind, not a kind of its own
            return
        if kind in _SLOT_CLASSES:
            raise ValueError(f"A slot kind named {kind!r} already exists: {_SLOT_CLASSES[kind]}.")
        cls.kind = kind
        _SLOT_CLASSES[kind] = cls

    def build(self, block: "Bottleneck") -> SlotLayer:
        """Creates the slot's layer as a child of ``block`` (called from the block's
        ``__call__``, with the block's width, stride and dtypes) and returns it as a
        :data:`SlotLayer`. The layer's name is part of the parameter paths."""
        raise NotImplementedError(f"{type(self).__name__} defines no build method.")

    def resolve(self, model: "ResNet") -> "Slot":
        """The slot with the settings it leaves to ``model`` filled in (default: itself)."""
        return self

    def shared_embeddings_key(self, spatial: tuple[int, ...]) -> Optional[tuple[str, tuple]]:
        """``(position, shape)`` of position embeddings the model holds for this slot and
        every other slot with the same key, for a slot input of spatial size ``spatial``;
        ``None``: the layer holds its own, if any."""
        return None


@dataclasses.dataclass(frozen=True)
class ConvSlot(Slot, kind="conv"):
    """A square convolution in the bottleneck slot (``kernel_size`` 3 in every ResNet)."""

    kernel_size: int = 3
    strides_itself: ClassVar[bool] = True

    def build(self, block: "Bottleneck") -> SlotLayer:
        conv = _conv(block, block.width, self.kernel_size, block.stride, "conv2")
        return lambda y, train, embeddings: conv(y)


@dataclasses.dataclass(frozen=True)
class LambdaSlot(Slot, kind="lambda"):
    """A lambda layer in the bottleneck slot; fields as in :class:`LambdaLayer`.

    The defaults are the paper's main setting: k=16, h=4, u=1 with a 23x23 lambda
    convolution (the all-lambda ResNet-50 of Table 3, 15.0M parameters).

    ``implementation``: the local formulation (one of ``LambdaLayer``'s implementations);
    ``None`` leaves it to ``ResNet.lambda_implementation``, and when that is ``None`` too,
    to the layer's default.

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
    implementation: Optional[str] = None

    def __post_init__(self):
        lambda_implementation_setting("LambdaSlot.implementation", self.implementation)

    def embedding_shape(self, spatial: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        """The layer's position-embedding shape for a slot input of spatial size ``spatial``."""
        return position_embedding_shape(
            self.position, tuple(spatial), self.dim_k, self.dim_u, self.receptive_field)

    def resolve(self, model: "ResNet") -> "LambdaSlot":
        if self.implementation is None and model.lambda_implementation is not None:
            return dataclasses.replace(self, implementation=model.lambda_implementation)
        return self

    def shared_embeddings_key(self, spatial: tuple[int, ...]) -> Optional[tuple[str, tuple]]:
        if not self.shared_embeddings:
            return None
        return self.position, self.embedding_shape(spatial)

    def build(self, block: "Bottleneck") -> SlotLayer:
        layer = LambdaLayer(
            dim_out=block.width,
            dim_k=self.dim_k,
            heads=self.heads,
            dim_u=self.dim_u,
            position=self.position,
            receptive_field=self.receptive_field,
            **lambda_implementation_setting("LambdaSlot.implementation", self.implementation),
            **block.layer_settings(norm=True),
            name="lambda2",
        )
        return lambda y, train, embeddings: layer(y, train=train, embeddings=embeddings)


@dataclasses.dataclass(frozen=True)
class AttentionSlot(Slot, kind="attention"):
    """Relative multi-head self-attention in the bottleneck slot (``window=None``: global)."""

    heads: int = 8
    window: Optional[int] = 7

    def build(self, block: "Bottleneck") -> SlotLayer:
        layer = RelativeSelfAttention(
            dim_out=block.width,
            heads=self.heads,
            window=self.window,
            **block.layer_settings(),
            name="attention2",
        )
        return lambda y, train, embeddings: layer(y)


@dataclasses.dataclass(frozen=True)
class AxialAttentionSlot(Slot, kind="axial_attention"):
    """Axial self-attention in the bottleneck slot: height pass then width pass, each global
    along its axis (:class:`~lambda_jax.layers.attention.AxialSelfAttention`)."""

    heads: int = 8

    def build(self, block: "Bottleneck") -> SlotLayer:
        layer = AxialSelfAttention(
            dim_out=block.width,
            heads=self.heads,
            **block.layer_settings(),
            name="axial_attention2",
        )
        return lambda y, train, embeddings: layer(y)


@dataclasses.dataclass(frozen=True)
class AugmentedConvSlot(Slot, kind="augmented_conv"):
    """An attention-augmented convolution (Bello et al. 2019) in the bottleneck slot.

    With the slot's width F_out as the convolution's output channels: value depth
    ``d_v = value_ratio * F_out`` (upsilon) and key depth ``d_k = key_ratio * F_out``
    (kappa), each rounded to the nearest positive multiple of ``heads``, and ``d_k`` at least
    ``min_key_depth_per_head * heads``. The defaults are the paper's: kappa = 2 upsilon = 0.2,
    8 heads, "a minimum of 20 dimensions per head for the keys". A strided block strides the
    convolution and attends over its input average-pooled 3x3 with stride 2.
    """

    key_ratio: float = 0.2
    value_ratio: float = 0.1
    heads: int = 8
    min_key_depth_per_head: int = 20
    kernel_size: int = 3
    strides_itself: ClassVar[bool] = True

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

    def build(self, block: "Bottleneck") -> SlotLayer:
        key_depth, value_depth = self.depths(block.width)
        layer = AttentionAugmentedConv(
            features=block.width,
            key_depth=key_depth,
            value_depth=value_depth,
            heads=self.heads,
            kernel_size=self.kernel_size,
            strides=block.stride,
            stride_pool=block.stride_pool,
            **block.layer_settings(),
            name="augmented_conv2",
        )
        return lambda y, train, embeddings: layer(y)


@dataclasses.dataclass(frozen=True)
class SANSlot(Slot, kind="san"):
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

    def build(self, block: "Bottleneck") -> SlotLayer:
        layer = PatchwiseSelfAttention(
            dim_out=block.width,
            relation_depth=self.relation_depth(block.width),
            share_planes=self.share_planes,
            kernel_size=self.kernel_size,
            **block.layer_settings(norm=True),
            name="san2",
        )
        return lambda y, train, embeddings: layer(y, train=train)


SlotSpec = Union[str, Mapping[str, Any], Slot]
STEMS = ("imagenet", "resnet_d", "resnet_rs", "cifar")


def lambda_implementation_setting(field: str, implementation: Optional[str]) -> dict[str, str]:
    """``LambdaLayer`` keyword arguments for a model's ``implementation`` setting ``field``:
    ``{"implementation": implementation}``, or ``{}`` (the layer's default) for ``None``.

    Raises:
      ValueError: naming ``field``, for an unknown formulation.
    """
    if implementation is None:
        return {}
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{field} must be None (the layers' default) or one of {IMPLEMENTATIONS}, got "
            f"{implementation!r}."
        )
    return {"implementation": implementation}


def _slot(spec: SlotSpec) -> Slot:
    if isinstance(spec, Slot):
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
        f"({', '.join(c.__name__ for c in _SLOT_CLASSES.values())}); got {spec!r}."
    )


def resolve_stage_slots(
    stage_slots: Sequence[Union[SlotSpec, Sequence[SlotSpec]]], stage_depths: Sequence[int]
) -> tuple[tuple[Slot, ...], ...]:
    """Expands ``stage_slots`` to one slot per block.

    Args:
      stage_slots: one entry per stage: a slot for every block of the stage, or a sequence
        with one slot per block. A slot is a :class:`Slot` (:class:`ConvSlot`,
        :class:`LambdaSlot`, :class:`AttentionSlot`, :class:`AxialAttentionSlot`,
        :class:`AugmentedConvSlot`, :class:`SANSlot`), the name of its kind (``"conv"``,
        ``"lambda"``, ``"attention"``, ``"axial_attention"``, ``"augmented_conv"``,
        ``"san"``: default settings) or a mapping such as
        ``{"kind": "lambda", "receptive_field": 7}``.
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
        if isinstance(spec, (str, Mapping, Slot)):
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
      slot: what sits in the 3x3 slot; it builds its layer (:meth:`Slot.build`).
      stride: 1 or 2.
      stride_pool: the average pooling (one of ``lambda_jax.layers.pooling.STRIDE_POOLS``)
        after a slot layer that does not stride itself, in a strided block.
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
    stride_pool: str = "3x3"
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

    def layer_settings(self, norm: bool = False) -> dict[str, Any]:
        """The block's settings a slot layer takes: ``dtype`` and ``param_dtype``, and with
        ``norm`` (a layer with batch norm) also ``axis_name``, ``bn_momentum`` and
        ``bn_epsilon``."""
        settings = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if norm:
            settings.update(axis_name=self.axis_name, bn_momentum=self.bn_momentum,
                            bn_epsilon=self.bn_epsilon)
        return settings

    def _spatial(
        self, y: jax.Array, train: bool, position_embeddings: Optional[jax.Array]
    ) -> jax.Array:
        y = self.slot.build(self)(y, train, position_embeddings)
        if self.stride > 1 and not self.slot.strides_itself:
            y = pooling.stride_pool(y, self.stride_pool, self.stride)
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
                # tensorflow/tpu's ResNet-D shortcut: 2x2 average pool, "SAME" padding.
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
      stride_pool: how a strided block whose slot layer does not stride itself (lambda
        layers, attention, SAN) downsamples after the layer, one of
        ``lambda_jax.layers.pooling.STRIDE_POOLS``: ``"3x3"``, the paper's 3x3 average pool
        with stride 2 with TensorFlow's "SAME" padding (the evidence is in
        :mod:`lambda_jax.layers.pooling`), or ``"3x3_symmetric"``, one cell of padding on
        each side (the only pooling of lambda_jax's ResNets before this field: set it to
        use their checkpoints; the two differ on even sizes), or ``"2x2"``.
      lambda_implementation: the local formulation of every lambda slot that sets none (one
        of ``LambdaLayer``'s implementations); ``None``: each layer's default, ``"auto"``.
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
        slots = self.resolved_slots()
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
