"""Patchwise self-attention of Zhao, Jia and Koltun, "Exploring Self-attention for Image
Recognition" (CVPR 2020; SAN, code ``hszhao/SAN``): the "local relative self-attention (Zhao
2020)" row of the LambdaNetworks paper's Table 3.

SAN has two kinds of layer; the row's 20.5M parameters and 78.2% top-1 are its patchwise
SAN19. Patchwise self-attention over an r x r footprint R(i) around each position i:

    y_i = Σ_{j ∈ R(i)} α(x_i, x_R(i))_j ⊙ β(x_j)

* ``β``: a 1x1 projection to the output channels (with bias);
* ``α``: the relation of the whole patch: ``φ(x_i)`` and ``ψ(x_j)`` for the r² positions j
  of the patch (1x1 projections to ``relation_depth`` channels, with bias) are concatenated
  (``relation_depth * (r² + 1)`` channels) and mapped by batch norm, ReLU, a 1x1 projection
  to ``dim_out / share_planes`` channels, batch norm, ReLU and a 1x1 projection (with bias)
  to ``r² * dim_out / share_planes`` weights, one for each footprint position and weight
  channel. There is no softmax (SAN normalises only its pairwise weights).
* ``⊙``: output channel c takes weight channel ``c mod (dim_out / share_planes)``, so each
  weight channel is shared by ``share_planes`` output channels.

Borders are reflection padded, as SAN pads both the patch and the aggregation. The layout of
the concatenated relation vector (``φ(x_i)`` first, then ``ψ`` channel by channel, each over
the r² positions in row-major order) and of the weights (weight channel major, footprint
position minor) is SAN's.
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.core import position as position_lib
from lambda_jax.layers.norm import batch_norm
from lambda_jax.layers.windows import windows


class PatchwiseSelfAttention(nn.Module):
    """SAN's patchwise self-attention (Zhao et al. 2020) on ``[batch, height, width, channels]``.

    Input ``x``: ``[batch, height, width, channels]``; output ``[batch, height, width,
    dim_out]``. With ``r = kernel_size``, ``p = relation_depth``, ``w = dim_out //
    share_planes``: relation inputs ``[batch, height, width, p * (r*r + 1)]``, weights
    ``[batch, height, width, w, r*r]``, values ``[batch, height, width, dim_out]`` gathered
    over the footprint as ``[batch, height, width, r*r, dim_out]``. Sums over the footprint
    accumulate in float32 whatever ``dtype`` is. Reflection padding needs ``height`` and
    ``width`` larger than ``kernel_size // 2``.

    Attributes:
      dim_out: output channels; divisible by ``share_planes``.
      relation_depth: channels of ``φ`` and ``ψ``; ``None`` means ``channels // 16``, SAN's
        ``rel_planes``.
      share_planes: output channels that share one weight channel (SAN: 8).
      kernel_size: odd side r of the footprint (SAN: 7, and 3 in its first stage).
      axis_name: mapped axis over which batch-norm statistics are averaged.
      bn_momentum: momentum of the batch-norm running statistics.
      bn_epsilon: epsilon of the batch norm.
      dtype: compute dtype (``None``: from the input and the parameters).
      param_dtype: parameter dtype.
    """

    dim_out: int
    relation_depth: Optional[int] = None
    share_planes: int = 8
    kernel_size: int = 7
    axis_name: Optional[Any] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def _relation_depth(self, x: jax.Array) -> int:
        name = "PatchwiseSelfAttention"
        for field in ("dim_out", "share_planes"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}.{field} must be positive, got {getattr(self, field)}.")
        if self.dim_out % self.share_planes:
            raise ValueError(
                f"{name}.dim_out ({self.dim_out}) must be divisible by share_planes "
                f"({self.share_planes})."
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(
                f"{name}.kernel_size must be a positive odd number, got {self.kernel_size}."
            )
        if min(x.shape[1:3]) <= self.kernel_size // 2:
            raise ValueError(
                f"{name}.kernel_size ({self.kernel_size}) is too large for an input of "
                f"{x.shape[1]}x{x.shape[2]}: reflection padding needs height and width larger "
                f"than kernel_size // 2; use a smaller kernel_size or a larger input."
            )
        relation_depth = self.relation_depth or x.shape[-1] // 16
        if relation_depth < 1:
            raise ValueError(
                f"{name}.relation_depth must be positive; the default channels // 16 is 0 for "
                f"{x.shape[-1]} input channels, so set it."
            )
        return relation_depth

    def _dense(self, features: int, use_bias: bool, name: str) -> nn.Dense:
        return nn.Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[batch, height, width, channels]``.
          train: batch statistics in the relation's batch norms when True.

        Returns:
          ``[batch, height, width, dim_out]``.
        """
        chex.assert_rank(x, 4)
        relation_depth = self._relation_depth(x)
        batch, height, width, _ = x.shape
        footprint = self.kernel_size**2
        weight_channels = self.dim_out // self.share_planes

        centre = self._dense(relation_depth, True, "relation_query")(x)
        context = self._dense(relation_depth, True, "relation_key")(x)
        values = self._dense(self.dim_out, True, "value")(x)
        patch = windows(context, self.kernel_size, mode="reflect")  # [b, H, W, r*r, p]
        patch = jnp.swapaxes(patch, -1, -2).reshape(batch, height, width, -1)
        relation = jnp.concatenate([centre, patch], axis=-1)
        relation = nn.relu(batch_norm(self, train, "relation_norm1")(relation))
        relation = self._dense(weight_channels, False, "relation_reduce")(relation)
        relation = nn.relu(batch_norm(self, train, "relation_norm2")(relation))
        weights = self._dense(footprint * weight_channels, True, "relation_weights")(relation)
        weights = weights.reshape(batch, height, width, weight_channels, footprint)

        value_patch = windows(values, self.kernel_size, mode="reflect")  # [b, H, W, r*r, C]
        value_patch = value_patch.reshape(
            batch, height, width, footprint, self.share_planes, weight_channels
        )
        out = jnp.einsum(
            "byxij,byxjgi->byxgi",
            weights,
            value_patch,
            preferred_element_type=position_lib.accumulation_dtype(values.dtype),
        )
        out = out.astype(values.dtype).reshape(batch, height, width, self.dim_out)
        chex.assert_shape(out, (batch, height, width, self.dim_out))
        return out
