"""The blocks of the ResNets: the stems, squeeze-excitation, the bottleneck block around its
slot, and the classifier head.

The ResNet-RS options (Bello et al. 2021, "Revisiting ResNets", arXiv 2103.07579; layer order
as in the tensorflow/tpu ``models/official/resnet/resnet_model.py`` it released): ResNet-D stem
(3x3 convolutions with 32, 32, 64 channels) whose max pool is replaced by a strided 3x3
convolution, ResNet-D shortcut (2x2 average pool, then 1x1 convolution), squeeze-excitation
after the last batch norm of each block (with bias), zero-initialised scale of each block's
last batch norm, classifier initialised with N(0, 0.01).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.core import pooling
from lambda_jax.layers.conv import fixed_padding, he_conv
from lambda_jax.layers.norm import batch_norm
from lambda_jax.models.slot import Slot
from lambda_jax.models.slot_kinds import ConvSlot

STEMS = ("imagenet", "resnet_d", "resnet_rs", "cifar")


def resnet_stem(module: nn.Module, x: jax.Array, kind: str, width: int, train: bool) -> jax.Array:
    """The stem ``kind`` (one of :data:`STEMS`), its layers children of ``module`` named
    ``stem_conv{i}`` and ``stem_bn{i}``, in ``module``'s dtypes and batch-norm settings.

    ``"imagenet"``: 7x7/2 conv, 3x3/2 max pool; ``"resnet_d"``: 3x3 convs with ``width/2,
    width/2, width`` channels, the first strided, then the max pool; ``"resnet_rs"``: the
    ResNet-D stem with the max pool replaced by a 3x3/2 conv; ``"cifar"``: one 3x3 conv,
    stride 1, for 32x32 images.

    Args:
      x: ``[batch, height, width, channels]``.

    Returns:
      ``[batch, height / 4, width / 4, width]`` (rounded up); ``"cifar"``: ``[batch, height,
      width, width]``.
    """

    def conv_bn_relu(y: jax.Array, features: int, kernel_size: int, stride: int, index: int):
        y = he_conv(module, features, kernel_size, stride, f"stem_conv{index}")(y)
        return nn.relu(batch_norm(module, train, f"stem_bn{index}")(y))

    if kind == "cifar":
        return conv_bn_relu(x, width, 3, 1, 1)
    if kind == "imagenet":
        x = conv_bn_relu(x, width, 7, 2, 1)
    else:
        x = conv_bn_relu(x, width // 2, 3, 2, 1)
        x = conv_bn_relu(x, width // 2, 3, 1, 2)
        x = conv_bn_relu(x, width, 3, 1, 3)
    if kind == "resnet_rs":
        return conv_bn_relu(x, width, 3, 2, 4)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=fixed_padding(3))


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
      stride_pool: the average pooling (one of ``lambda_jax.core.pooling.STRIDE_POOLS``)
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
        y = he_conv(self, self.width, 1, 1, "conv1")(x)
        y = nn.relu(batch_norm(self, train, "bn1")(y))
        y = nn.relu(
            batch_norm(self, train, "bn2")(self._spatial(y, train, position_embeddings))
        )
        y = he_conv(self, out_features, 1, 1, "conv3")(y)
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
            shortcut = he_conv(self, out_features, 1, stride, "shortcut_conv")(shortcut)
            shortcut = batch_norm(self, train, "shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


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
