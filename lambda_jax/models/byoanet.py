"""timm's LambdaResNets (``timm/models/byoanet.py``) in Flax, layer for layer.

``lambda_resnet26t``, ``lambda_resnet50ts`` and ``lambda_resnet26rpt_256`` compute the same
logits as the timm models of those names once ``lambda_jax.convert.from_timm`` has loaded
their ``state_dict``. They follow timm, not the paper's LambdaResNets: a tiered 3-conv
stem (24, 32, 64 channels) and a 3x3 max pool; bottleneck blocks (ratio 1/4, strided 3x3
convolution, 1x1 convolution + batch norm on the shortcut when the shape changes); in the
self-attention blocks a lambda layer (k=16, 4 heads, u=1) replaces the 3x3 convolution,
with timm's bias on the position lambdas and 2x2 average pooling for stride 2, followed
by batch norm and the activation; global average pooling and a linear classifier.
Convolutions are padded symmetrically by ``(stride - 1 + kernel - 1) // 2``, as timm's.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.layers.lambda_layer import LambdaLayer
from lambda_jax.models.families import ARCHITECTURES
from lambda_jax.models.registry import build_model, register_model
from lambda_jax.models.slot_kinds import lambda_implementation_setting

ModuleDef = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "silu": nn.silu}
BLOCK_TYPES = ("bottle", "self_attn")


class ConvNormAct(nn.Module):
    """Convolution without bias, batch norm, then the activation if any (timm's ConvNormAct).

    Input ``[batch, height, width, channels]``; output
    ``[batch, ceil(height / stride), ceil(width / stride), features]``.
    """

    features: int
    kernel_size: int
    norm: ModuleDef
    stride: int = 1
    activation: Optional[Callable[[jax.Array], jax.Array]] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = (self.stride - 1 + self.kernel_size - 1) // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        x = self.norm(name="bn")(x)
        return x if self.activation is None else self.activation(x)


class LambdaBottleneck(nn.Module):
    """timm's ``BottleneckBlock`` (``block="bottle"``) or ``SelfAttnBlock`` with a lambda layer.

    Input ``[batch, height, width, channels]``; output ``[batch, height / stride,
    width / stride, features]``.
    """

    features: int
    block: str
    norm: ModuleDef
    lambda_layer: ModuleDef
    activation: Callable[[jax.Array], jax.Array]
    stride: int = 1
    bottle_ratio: float = 0.25
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(ConvNormAct, norm=self.norm, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        mid = int(round(self.features * self.bottle_ratio))
        shortcut = x
        if x.shape[-1] != self.features or self.stride != 1:
            shortcut = conv(self.features, 1, stride=self.stride, name="shortcut")(x)
        y = conv(mid, 1, activation=self.activation, name="conv1_1x1")(x)
        if self.block == "bottle":
            y = conv(mid, 3, stride=self.stride, activation=self.activation, name="conv2_kxk")(y)
        else:
            y = self.lambda_layer(dim_out=mid, stride=self.stride, name="self_attn")(y, train=train)
            y = self.activation(self.norm(name="post_attn")(y))
        y = conv(self.features, 1, name="conv3_1x1")(y)
        return self.activation(y + shortcut)


class TimmLambdaResNet(nn.Module):
    """A LambdaResNet built like timm's ``ByobNet`` with lambda layers.

    ``model.init(rng, images, train=False)``; ``model.apply(variables, images, train=True,
    mutable=["batch_stats"])`` with ``images: [batch, height, width, 3]`` gives logits
    ``[batch, num_classes]`` in float32. Stem and stages divide the size by 32.

    Attributes:
      num_classes: classifier outputs.
      stage_blocks: per stage, the type of each block, ``"bottle"`` or ``"self_attn"``.
      stage_channels: output channels of each stage.
      stage_strides: stride of each stage's first block.
      stem_channels: channels of the stem's three 3x3 convolutions.
      activation: ``"relu"`` or ``"silu"``.
      position: the lambda layers' position lambdas, ``"local"`` or ``"global"``.
      receptive_field: r of the local lambda convolution.
      image_size: the input size the global relative embeddings are built for (the model
        accepts only it when ``position="global"``); ``from_timm`` builds the variables at it.
      heads, dim_k: the lambda layers' heads and key depth.
      lambda_implementation: the lambda layers' local formulation (one of ``LambdaLayer``'s
        implementations); ``None``: the layer's default.
      bottle_ratio: bottleneck width over block width.
      axis_name: mapped axis for cross-device batch-norm statistics.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    stage_blocks: Sequence[Sequence[str]]
    num_classes: int = 1000
    stage_channels: Sequence[int] = (256, 512, 1024, 2048)
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    stem_channels: Sequence[int] = (24, 32, 64)
    activation: str = "relu"
    position: str = "local"
    receptive_field: int = 9
    image_size: int = 256
    heads: int = 4
    dim_k: int = 16
    lambda_implementation: Optional[str] = None
    bottle_ratio: float = 0.25
    axis_name: Optional[Any] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _check(self, images: jax.Array) -> None:
        chex.assert_rank(images, 4)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TimmLambdaResNet.activation must be one of "
                             f"{tuple(ACTIVATIONS)}, got {self.activation!r}.")
        if len({len(self.stage_blocks), len(self.stage_channels), len(self.stage_strides)}) != 1:
            raise ValueError("TimmLambdaResNet.stage_blocks, stage_channels and stage_strides "
                             "need one entry per stage.")
        for blocks in self.stage_blocks:
            if not blocks or any(block not in BLOCK_TYPES for block in blocks):
                raise ValueError(f"TimmLambdaResNet.stage_blocks entries are non-empty "
                                 f"sequences of {BLOCK_TYPES}, got {blocks!r}.")
        if self.position == "global" and images.shape[1:3] != (self.image_size,) * 2:
            raise ValueError(
                f"This model's global relative embeddings are built for {self.image_size}x"
                f"{self.image_size} images, got {images.shape[1]}x{images.shape[2]}. Resize "
                "the images, or use a model with position='local'."
            )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``[batch, num_classes]`` (float32) of ``images: [batch, height, width, 3]``."""
        self._check(images)
        activation = ACTIVATIONS[self.activation]
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,  # PyTorch's momentum 0.1
            epsilon=1e-5,
            use_fast_variance=False,
            axis_name=self.axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        lambda_layer = functools.partial(
            LambdaLayer,
            dim_k=self.dim_k,
            heads=self.heads,
            dim_u=1,
            position=self.position,
            receptive_field=self.receptive_field,
            position_bias=self.position == "local",
            **lambda_implementation_setting("TimmLambdaResNet.lambda_implementation",
                                            self.lambda_implementation),
            stride_pool="2x2",
            axis_name=self.axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = images.astype(self.dtype)
        for index, channels in enumerate(self.stem_channels):
            x = ConvNormAct(channels, 3, norm, stride=2 if index == 0 else 1,
                            activation=activation, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"stem_conv{index + 1}")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (blocks, channels, stride) in enumerate(
                zip(self.stage_blocks, self.stage_channels, self.stage_strides)):
            for index, block in enumerate(blocks):
                x = LambdaBottleneck(
                    channels, block, norm, lambda_layer, activation,
                    stride=stride if index == 0 else 1, bottle_ratio=self.bottle_ratio,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"stages_{stage}_{index}",
                )(x, train)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                          name="head_fc")(features)
        chex.assert_shape(logits, (images.shape[0], self.num_classes))
        return logits


_TIERED_26 = (("bottle",) * 2, ("bottle",) * 2, ("bottle", "self_attn"), ("self_attn",) * 2)

# The TimmLambdaResNet fields of each name, with timm's description; timm's weights are
# for 256x256 images.
# Parameters of timm's models, counted with timm 1.0.31: 10.96M, 21.54M, 10.99M.
CONFIGS: dict[str, dict[str, Any]] = {
    "lambda_resnet26t": dict(
        stage_blocks=_TIERED_26, position="local",
        description="timm's Lambda-ResNet-26-T: 9x9 lambda convolutions in the last two stages.",
    ),
    "lambda_resnet50ts": dict(
        stage_blocks=(("bottle",) * 3, ("bottle",) * 3 + ("self_attn",),
                      ("bottle", "self_attn") * 3, ("bottle", "self_attn", "bottle")),
        activation="silu",
        position="local",
        description="timm's Lambda-ResNet-50-TS: SiLU; 9x9 lambda convolutions in the fourth "
                    "block of stage 2 and every second block of stages 3 and 4.",
    ),
    "lambda_resnet26rpt_256": dict(
        stage_blocks=_TIERED_26, position="global", image_size=256,
        description="timm's Lambda-ResNet-26-R-T: global relative embeddings in the last two "
                    "stages, 256x256 images only.",
    ),
}

def _register(name: str, description: str, **config: Any) -> None:
    ARCHITECTURES[name] = dict(config, description=description, resolution=256)

    def factory(*, num_classes: int = 1000, dtype: Any = jnp.float32,
                **overrides: Any) -> TimmLambdaResNet:
        model = build_model(name, TimmLambdaResNet, config, overrides, num_classes=num_classes,
                            dtype=dtype)
        lambda_implementation_setting("TimmLambdaResNet.lambda_implementation",
                                      model.lambda_implementation)
        return model

    factory.__doc__ = description
    register_model(name)(factory)


for _name, _config in CONFIGS.items():
    _register(_name, **_config)
