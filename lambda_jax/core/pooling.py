"""Average pooling: the stride-2 downsampling of lambda layers and of ResNet blocks.

:func:`stride_pool` is the one downsampling that strided lambda layers
(``LambdaLayer(stride=2, stride_pool=...)``) and strided bottleneck blocks
(``ResNet(stride_pool=...)``) apply after a layer that does not stride itself; both take
its names, :data:`STRIDE_POOLS`:

* ``"3x3"`` (the default): 3x3 windows with stride 2 and TensorFlow's ``"SAME"`` padding,
  the padded cells left out of each mean (TensorFlow's average pooling leaves them out).
  On an even size S output i averages inputs 2i, 2i+1 and 2i+2 (the last window clipped at
  the border); the output has ``ceil(S / 2)`` cells.
* ``"3x3_symmetric"``: 3x3 windows with stride 2 padded by one cell on each side, padded
  cells left out of the mean: output i averages inputs 2i-1, 2i and 2i+1. On odd sizes the
  two 3x3 poolings are the same; on even sizes they differ by one cell of shift.
* ``"2x2"``: 2x2 windows with stride 2, no padding (odd sizes floored), as timm's
  ``LambdaLayer``.

Why ``"3x3"`` is the paper's. The paper says "3x3 average-pooling with stride 2 after the
lambda layers ... in place of the strided convolution" and gives no padding; its code for
the LambdaResNets is not public. They build on ResNet-RS, whose code is tensorflow/tpu's
``models/official/resnet/resnet_model.py`` (read at commit 7dc921f), and that file pads
every pooling with TensorFlow's ``"SAME"``: the ResNet-D shortcut's 2x2 average pool in
``bottleneck_block`` (``tf.keras.layers.AveragePooling2D(..., padding='same')``) and the
stem's 3x3/2 max pool in ``resnet_generator`` (``tf.layers.max_pooling2d(...,
padding='SAME')``). Only its strided convolutions are padded symmetrically, by
``fixed_padding`` (called by ``conv2d_fixed_padding``), which is ``tf.pad`` with zeros: an
average pool written that way would count the zeros in its means, which neither padding
here does. The 3x3 average pool most likely written in that code base is therefore the
``"SAME"`` one, ``"3x3"``; this is an inference from the surrounding code, not a quote.
"""

from __future__ import annotations

import chex
import jax
from flax.linen.pooling import avg_pool

# "symmetric": window // 2 cells before and (window - 1) // 2 after on each axis; "same":
# TensorFlow's "SAME" (the odd cell of padding after the input); "valid": none.
POOL_PADDINGS = ("symmetric", "same", "valid")
# Each stride pooling's (window, padding).
STRIDE_POOLS = {"3x3": (3, "same"), "3x3_symmetric": (3, "symmetric"), "2x2": (2, "valid")}


def average_pool(x: jax.Array, window: int, stride: int, padding: str) -> jax.Array:
    """Average-pools every spatial axis, padded cells left out of each mean.

    Args:
      x: ``[batch, *spatial, channels]`` (1 to 3 spatial axes).
      window: the pooling window on each axis.
      stride: the stride on each axis.
      padding: one of ``POOL_PADDINGS``.

    Returns:
      ``[batch, *pooled, channels]``: per axis ``ceil(S / stride)`` for ``"same"`` and
      ``"symmetric"``, ``floor((S - window) / stride) + 1`` for ``"valid"``.
    """
    if padding not in POOL_PADDINGS:
        raise ValueError(f"padding must be one of {POOL_PADDINGS}, got {padding!r}.")
    chex.assert_rank(x, {3, 4, 5})
    s = x.ndim - 2
    pad = {"symmetric": ((window // 2, (window - 1) // 2),) * s, "same": "SAME",
           "valid": "VALID"}[padding]
    return avg_pool(x, (window,) * s, strides=(stride,) * s, padding=pad,
                       count_include_pad=False)


def stride_pool(x: jax.Array, pool: str = "3x3", stride: int = 2) -> jax.Array:
    """The downsampling named ``pool`` (one of :data:`STRIDE_POOLS`) with ``stride``.

    Args:
      x: ``[batch, *spatial, channels]`` (1 to 3 spatial axes).
      pool: ``"3x3"`` (the paper's, TensorFlow ``"SAME"`` padding), ``"3x3_symmetric"`` or
        ``"2x2"`` (timm's); see the module docstring.
      stride: the stride on each axis.

    Returns:
      ``[batch, *pooled, channels]``, ``ceil(S / 2)`` per axis for ``"3x3"`` and
      ``"3x3_symmetric"`` and ``floor(S / 2)`` for ``"2x2"`` at stride 2.
    """
    if pool not in STRIDE_POOLS:
        raise ValueError(f"pool must be one of {tuple(STRIDE_POOLS)}, got {pool!r}.")
    window, padding = STRIDE_POOLS[pool]
    return average_pool(x, window, stride, padding)
