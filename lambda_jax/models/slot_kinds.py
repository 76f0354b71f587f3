"""The slot kinds: what a bottleneck block's 3x3 slot can hold.

* :class:`ConvSlot` - a 3x3 convolution (strided in the first block of a stage);
* :class:`LambdaSlot` - a :class:`~lambda_jax.layers.LambdaLayer` (global or local scope r,
  key depth k, heads h, intra-depth u);
* :class:`AttentionSlot` - :class:`~lambda_jax.layers.attention.RelativeSelfAttention`;
* :class:`AxialAttentionSlot` - :class:`~lambda_jax.layers.attention.AxialSelfAttention`;
* :class:`AugmentedConvSlot` - an attention-augmented convolution
  (:class:`~lambda_jax.layers.attention.AttentionAugmentedConv`, Bello et al. 2019);
* :class:`SANSlot` - SAN's patchwise self-attention
  (:class:`~lambda_jax.layers.san.PatchwiseSelfAttention`, Zhao et al. 2020).

Each is a :class:`~lambda_jax.models.slot.Slot` that builds its own layer (``build``), named
here as it is in the parameter paths of the blocks (``conv2``, ``lambda2``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, Optional

from lambda_jax.layers.augmented_conv import AttentionAugmentedConv
from lambda_jax.layers.axial_attention import AxialSelfAttention
from lambda_jax.layers.conv import he_conv
from lambda_jax.layers.lambda_layer import IMPLEMENTATIONS, LambdaLayer, position_embedding_shape
from lambda_jax.layers.relative_attention import RelativeSelfAttention
from lambda_jax.layers.san import PatchwiseSelfAttention
from lambda_jax.models.slot import Slot, SlotLayer

if TYPE_CHECKING:
    from lambda_jax.models.blocks import Bottleneck
    from lambda_jax.models.resnet import ResNet


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


@dataclasses.dataclass(frozen=True)
class ConvSlot(Slot, kind="conv"):
    """A square convolution in the bottleneck slot (``kernel_size`` 3 in every ResNet)."""

    kernel_size: int = 3
    strides_itself: ClassVar[bool] = True

    def build(self, block: Bottleneck) -> SlotLayer:
        conv = he_conv(block, block.width, self.kernel_size, block.stride, "conv2")
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

    def resolve(self, model: ResNet) -> LambdaSlot:
        if self.implementation is None and model.lambda_implementation is not None:
            return dataclasses.replace(self, implementation=model.lambda_implementation)
        return self

    def shared_embeddings_key(self, spatial: tuple[int, ...]) -> Optional[tuple[str, tuple]]:
        if not self.shared_embeddings:
            return None
        return self.position, self.embedding_shape(spatial)

    def build(self, block: Bottleneck) -> SlotLayer:
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

    def build(self, block: Bottleneck) -> SlotLayer:
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

    def build(self, block: Bottleneck) -> SlotLayer:
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

    def build(self, block: Bottleneck) -> SlotLayer:
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

    def build(self, block: Bottleneck) -> SlotLayer:
        layer = PatchwiseSelfAttention(
            dim_out=block.width,
            relation_depth=self.relation_depth(block.width),
            share_planes=self.share_planes,
            kernel_size=self.kernel_size,
            **block.layer_settings(norm=True),
            name="san2",
        )
        return lambda y, train, embeddings: layer(y, train=train)
