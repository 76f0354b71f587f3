"""SAN, the self-attention networks of Zhao, Jia and Koltun, "Exploring Self-attention for Image
Recognition" (CVPR 2020; code ``hszhao/SAN``, ``model/san.py`` and ``config/imagenet/``).

The LambdaNetworks paper's Table 3 row "local relative self-attention (Zhao et al. 2020)",
20.5M parameters and 78.2% top-1, quotes SAN19 with patchwise self-attention: the numbers of
SAN's README for "SAN19-patch.". SAN is a network of its own, not a ResNet-50 with another
layer in its slots (that hybrid is ``resnet50_san_patchwise`` in
:mod:`lambda_jax.models.families`, not a row of the paper's table).

The architecture, as SAN's code builds it (224x224 images):

* stem: a 1x1 convolution from 3 to 64 channels (no bias) at full resolution, batch norm,
  ReLU;
* five stages of widths c = 64, 256, 512, 1024, 2048, running at 112, 56, 28, 14 and 7
  pixels a side. Each stage is a 2x2 max pool with stride 2, a 1x1 transition convolution
  (no bias) to c channels, its blocks, batch norm and ReLU;
* a block is pre-activation with an identity shortcut: batch norm, ReLU, patchwise
  self-attention (:class:`~lambda_jax.layers.san.PatchwiseSelfAttention`) from c to c/4
  channels with relation depth c/16 and weights shared by 8 channels, over a 3x3 footprint in
  the first stage and 7x7 in the others; batch norm, ReLU, a 1x1 convolution (with bias) back
  to c channels; plus the block's input;
* global average pool and a linear classifier.

Stage depths (SAN's configs) and parameters (``tests/test_models.py`` checks ours):

* SAN10 [2, 1, 2, 4, 1]: 11.8M parameters in SAN's README;
* SAN15 [3, 2, 3, 5, 2]: 16.2M parameters in SAN's README;
* SAN19 [3, 3, 4, 6, 3]: 20.5M parameters in SAN's README.

Initialisation is ours (SAN's code keeps PyTorch's defaults):
convolutions He-normal over fan-out with zero biases, the classifier N(0, 0.01).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.layers.norm import batch_norm
from lambda_jax.layers.san import PatchwiseSelfAttention
from lambda_jax.models.blocks import classifier_logits
from lambda_jax.models.families import ARCHITECTURES
from lambda_jax.models.registry import build_model, register_model

SAN_WIDTHS = (64, 256, 512, 1024, 2048)
SAN_KERNEL_SIZES = (3, 7, 7, 7, 7)
# Blocks per stage of SAN's ImageNet configs; parameters (millions) from SAN's README.
SAN_DEPTHS = {10: (2, 1, 2, 4, 1), 15: (3, 2, 3, 5, 2), 19: (3, 3, 4, 6, 3)}
SAN_PARAMETERS = {10: 11.8, 15: 16.2, 19: 20.5}


def _pointwise(module: nn.Module, features: int, use_bias: bool, name: str) -> nn.Dense:
    """A 1x1 convolution on ``[..., channels]``, He-initialised over fan-out."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


class SANBlock(nn.Module):
    """SAN's pre-activation bottleneck block: ``x + W(relu(bn(SA(relu(bn(x))))))``.

    Input and output ``[batch, height, width, width]`` (the block keeps its shape).

    Attributes:
      width: channels c of the block's input and output.
      kernel_size: odd side of the self-attention footprint.
      share_planes: output channels of the layer that share one weight channel.
      relation_reduction: relation depth is ``width // relation_reduction``.
      bottleneck_reduction: the layer has ``width // bottleneck_reduction`` output channels.
      axis_name, bn_momentum, bn_epsilon, dtype, param_dtype: as in :class:`SAN`.
    """

    width: int
    kernel_size: int = 7
    share_planes: int = 8
    relation_reduction: int = 16
    bottleneck_reduction: int = 4
    axis_name: Optional[Any] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x``: ``[batch, height, width, self.width]`` -> the same shape."""
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, 3, self.width)
        y = nn.relu(batch_norm(self, train, "bn1")(x))
        y = PatchwiseSelfAttention(
            dim_out=self.width // self.bottleneck_reduction,
            relation_depth=self.width // self.relation_reduction,
            share_planes=self.share_planes,
            kernel_size=self.kernel_size,
            axis_name=self.axis_name,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )(y, train=train)
        y = nn.relu(batch_norm(self, train, "bn2")(y))
        return x + _pointwise(self, self.width, True, "conv")(y)


class SAN(nn.Module):
    """SAN classifier (Zhao et al. 2020) with patchwise self-attention; see the module docstring.

    ``images``: ``[batch, height, width, channels]`` -> logits ``[batch, num_classes]`` in
    float32. Each stage halves the resolution, so the images need at least
    ``(k // 2 + 1) * 2**s`` pixels a side for a footprint k in stage s (1-based): 128 for
    SAN's settings. Computation runs in ``dtype``; parameters are ``param_dtype``.

    Attributes:
      num_classes: classifier outputs.
      stage_depths: blocks per stage (SAN19: 3, 3, 4, 6, 3).
      stage_widths: channels c of each stage's blocks; the stem has ``stage_widths[0]``.
      kernel_sizes: footprint side of each stage's self-attention (SAN: 3, 7, 7, 7, 7).
      share_planes: output channels sharing one weight channel (SAN: 8).
      relation_reduction: relation depth is ``c // relation_reduction`` (SAN: 16).
      bottleneck_reduction: the layers have ``c // bottleneck_reduction`` outputs (SAN: 4).
      axis_name: mapped axis for cross-device batch norm (every BatchNorm, also the layers').
      bn_momentum: momentum of the batch-norm running statistics.
      bn_epsilon: batch-norm epsilon.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_classes: int = 1000
    stage_depths: Sequence[int] = SAN_DEPTHS[19]
    stage_widths: Sequence[int] = SAN_WIDTHS
    kernel_sizes: Sequence[int] = SAN_KERNEL_SIZES
    share_planes: int = 8
    relation_reduction: int = 16
    bottleneck_reduction: int = 4
    axis_name: Optional[Any] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _check_settings(self, height: int, width: int) -> None:
        stages = len(self.stage_depths)
        if stages == 0 or len(self.stage_widths) != stages or len(self.kernel_sizes) != stages:
            raise ValueError(
                f"SAN.stage_depths ({self.stage_depths}), stage_widths ({self.stage_widths}) "
                f"and kernel_sizes ({self.kernel_sizes}) must have one entry per stage, and "
                "there must be at least one stage."
            )
        for channels in self.stage_widths:
            for reduction in ("relation_reduction", "bottleneck_reduction"):
                if channels // getattr(self, reduction) < 1:
                    raise ValueError(
                        f"SAN.{reduction} ({getattr(self, reduction)}) leaves no channels of a "
                        f"stage of width {channels}; use widths of at least "
                        f"{getattr(self, reduction)}."
                    )
        minimum = max(
            (kernel_size // 2 + 1) * 2 ** (stage + 1)
            for stage, kernel_size in enumerate(self.kernel_sizes)
        )
        if min(height, width) < minimum:
            raise ValueError(
                f"SAN with kernel_sizes {tuple(self.kernel_sizes)} needs images of at least "
                f"{minimum}x{minimum} (each stage halves the resolution and reflection padding "
                f"needs more pixels than half a footprint), got {height}x{width}."
            )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Classifies images.

        Args:
          images: ``[batch, height, width, channels]``.
          train: batch statistics in every batch norm when True, running averages otherwise.

        Returns:
          logits ``[batch, num_classes]``, float32.
        """
        chex.assert_rank(images, 4)
        self._check_settings(*images.shape[1:3])
        x = _pointwise(self, self.stage_widths[0], False, "stem_conv")(images.astype(self.dtype))
        x = nn.relu(batch_norm(self, train, "stem_bn")(x))
        for stage, (depth, channels, kernel_size) in enumerate(
            zip(self.stage_depths, self.stage_widths, self.kernel_sizes)
        ):
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = _pointwise(self, channels, False, f"stage{stage + 1}_transition")(x)
            for index in range(depth):
                x = SANBlock(
                    width=channels,
                    kernel_size=kernel_size,
                    share_planes=self.share_planes,
                    relation_reduction=self.relation_reduction,
                    bottleneck_reduction=self.bottleneck_reduction,
                    axis_name=self.axis_name,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"stage{stage + 1}_block{index + 1}",
                )(x, train=train)
            x = nn.relu(batch_norm(self, train, f"stage{stage + 1}_bn")(x))
        return classifier_logits(self, jnp.mean(x, axis=(1, 2)))


def _register(depth: int) -> None:
    """Registers SAN``depth`` with patchwise self-attention as ``san{depth}_patchwise``."""
    name = f"san{depth}_patchwise"
    fields = dict(stage_depths=SAN_DEPTHS[depth])
    description = (
        f"SAN{depth} with patchwise self-attention (Zhao et al. 2020): stages "
        f"{list(SAN_DEPTHS[depth])}, widths 64, 256, 512, 1024, 2048, footprints 3x3 then 7x7, "
        "relation depth c/16, weights shared by 8 channels (SAN's own settings); "
        f"{SAN_PARAMETERS[depth]}M parameters in SAN's README."
    )
    if depth == 19:
        description += (
            " The network the LambdaNetworks paper's Table 3 row 'local relative "
            "self-attention (Zhao et al. 2020)' quotes: 20.5M parameters, 78.2% top-1."
        )
    ARCHITECTURES[name] = dict(fields, description=description, resolution=224)

    def factory(*, num_classes: int, dtype: Any, **overrides: Any) -> SAN:
        model = build_model(name, SAN, fields, overrides, num_classes=num_classes, dtype=dtype)
        # Tuples keep the module hashable (a static argument of jax.jit) whatever sequences
        # the overrides held.
        return model.clone(
            stage_depths=tuple(model.stage_depths),
            stage_widths=tuple(model.stage_widths),
            kernel_sizes=tuple(model.kernel_sizes),
        )

    factory.__doc__ = description
    register_model(name)(factory)


for _depth in SAN_DEPTHS:
    _register(_depth)
