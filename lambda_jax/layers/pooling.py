"""Average pooling with stride 2, the downsampling of strided lambda layers and blocks."""

from __future__ import annotations

import flax.linen as nn
import jax

# "symmetric": one pixel of padding on each side; "same": TensorFlow's "SAME" (all the
# padding after the input when the size is even); "valid": none.
POOL_PADDINGS = ("symmetric", "same", "valid")


def average_pool(x: jax.Array, window: int, stride: int, padding: str) -> jax.Array:
    """Average-pools every spatial axis, padded cells left out of each mean.

    Args:
      x: ``[batch, *spatial, channels]`` (1 to 3 spatial axes).
      window: the pooling window on each axis.
      stride: the stride on each axis.
      padding: one of ``POOL_PADDINGS``.

    Returns:
      ``[batch, *pooled, channels]``, ``ceil(S / stride)`` per axis for ``"same"``.
    """
    if padding not in POOL_PADDINGS:
        raise ValueError(f"padding must be one of {POOL_PADDINGS}, got {padding!r}.")
    s = x.ndim - 2
    pad = {"symmetric": ((window // 2, (window - 1) // 2),) * s, "same": "SAME",
           "valid": "VALID"}[padding]
    return nn.avg_pool(x, (window,) * s, strides=(stride,) * s, padding=pad,
                       count_include_pad=False)
