"""The lambda layer (Bello, "LambdaNetworks", ICLR 2021) as a flax.linen module."""

from __future__ import annotations

import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.layers import position as position_lib

POSITIONS = ("global", "local", "none")


def _normal(stddev: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=stddev)


class LambdaLayer(nn.Module):
    """Multi-query lambda layer for sequences, images and volumes.

    Input ``x``: ``[batch, length, channels]``, ``[batch, height, width, channels]`` or
    ``[batch, time, height, width, channels]``; output: the same with ``dim_out`` channels.
    With ``d`` input channels, ``h = heads``, ``v = dim_out // heads``:

    * queries ``Q = x W_Q``: ``[batch, n, h, k]``, batch normalised;
    * keys ``K = x W_K``: ``[batch, n, k, u]``, projected and softmaxed over the n context
      positions in float32;
    * values ``V = x W_V``: ``[batch, n, v, u]``, batch normalised;
    * content lambda ``λc = Σ_m,u K̄[m,k,u] V[m,v,u]``: ``[batch, k, v]``;
    * position lambdas ``λp_n``: ``[batch, n, k, v]``, from a relative embedding table
      ``[2H-1, 2W-1, k, u]`` (``position="global"``, the input size is fixed at init) or
      from the lambda convolution with a kernel ``[r, r, k, u]`` (``position="local"``);
    * output ``y[n, h, v] = Σ_k Q[n,h,k] (λc + λp_n)[k, v]``, reshaped to ``h * v``.

    Sums over context positions accumulate in float32 whatever ``dtype`` is, so bfloat16
    compute stays finite for large inputs.

    Initialisation follows the paper: ``W_Q ~ N(0, (k d)^-1/2)``, ``W_K, W_V ~ N(0, d^-1/2)``,
    position embeddings ``N(0, 1)``; projections have no bias.

    Attributes:
      dim_out: output channels; divisible by ``heads``.
      dim_k: query/key depth k.
      heads: number of queries per position h.
      dim_u: intra-depth u.
      position: ``"global"``, ``"local"`` or ``"none"`` (content lambda only).
      receptive_field: scope r of the lambda convolution (odd, ``position="local"``).
      use_batchnorm: batch norm on queries and values.
      axis_name: mapped axis over which batch-norm statistics are averaged
        (cross-device batch norm under ``pmap``/``shard_map``).
      bn_momentum: momentum of the batch-norm running statistics.
      bn_epsilon: epsilon of the batch norm.
      dtype: compute dtype (``None``: from the input and the parameters).
      param_dtype: parameter dtype.
    """

    dim_out: int
    dim_k: int = 16
    heads: int = 4
    dim_u: int = 1
    position: str = "global"
    receptive_field: int = 23
    use_batchnorm: bool = True
    axis_name: Optional[Any] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def _check_settings(self, x: jax.Array) -> None:
        for name in ("dim_out", "dim_k", "heads", "dim_u"):
            if getattr(self, name) < 1:
                raise ValueError(f"LambdaLayer.{name} must be positive, got {getattr(self, name)}.")
        if self.dim_out % self.heads:
            raise ValueError(
                f"LambdaLayer.dim_out ({self.dim_out}) must be divisible by heads ({self.heads})."
            )
        if self.position not in POSITIONS:
            raise ValueError(
                f"LambdaLayer.position must be one of {POSITIONS}, got {self.position!r}."
            )
        if self.position == "local" and (
            self.receptive_field < 1 or self.receptive_field % 2 == 0
        ):
            raise ValueError(
                "LambdaLayer.receptive_field must be a positive odd number for "
                f"position='local', got {self.receptive_field}."
            )
        if x.ndim not in (3, 4, 5):
            raise ValueError(
                "LambdaLayer expects [batch, length, channels], [batch, height, width, "
                "channels] or [batch, time, height, width, channels]; got an input of rank "
                f"{x.ndim} with shape {x.shape}."
            )

    def _relative_table(self, spatial: tuple[int, ...]) -> jax.Array:
        shape = tuple(2 * size - 1 for size in spatial) + (self.dim_k, self.dim_u)
        if self.has_variable("params", "relative_embeddings"):
            built = self.get_variable("params", "relative_embeddings").shape
            if built != shape:
                built_size = tuple((size + 1) // 2 for size in built[: len(spatial)])
                raise ValueError(
                    "LambdaLayer with position='global' was built for inputs of spatial "
                    f"size {built_size} and cannot be applied to size {spatial}: its relative "
                    "embedding table has shape "
                    f"{built}. Resize the table to the new size, or use position='local'."
                )
        return self.param("relative_embeddings", _normal(1.0), shape, self.param_dtype)

    def _batch_norm(self, name: str, train: bool) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            axis_name=self.axis_name,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[batch, *spatial, channels]`` with 1 to 3 spatial axes.
          train: batch norm uses batch statistics (and updates ``batch_stats``) when True.

        Returns:
          ``[batch, *spatial, dim_out]``.
        """
        self._check_settings(x)
        batch, *spatial, channels = x.shape
        spatial = tuple(spatial)
        n = math.prod(spatial)
        h, k, u = self.heads, self.dim_k, self.dim_u
        v = self.dim_out // h

        def projection(features: int, stddev: float, name: str, dtype: Any) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=False,
                kernel_init=_normal(stddev),
                dtype=dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        queries = projection(k * h, (k * channels) ** -0.5, "query", self.dtype)(x)
        values = projection(v * u, channels**-0.5, "value", self.dtype)(x)
        if self.use_batchnorm:
            queries = self._batch_norm("query_norm", train)(queries)
            values = self._batch_norm("value_norm", train)(values)
        compute_dtype = queries.dtype
        accumulate = position_lib.accumulation_dtype(compute_dtype)
        # The keys are softmax logits: a bfloat16 rounding of large keys would change
        # which positions the softmax selects, so they are projected in float32.
        keys = projection(k * u, channels**-0.5, "key", accumulate)(x)

        queries = queries.reshape(batch, n, h, k)
        keys = keys.reshape(batch, n, u, k)
        values = values.reshape(batch, *spatial, u, v)
        values = jnp.swapaxes(values, -1, -2)  # [batch, *spatial, v, u]
        flat_values = values.reshape(batch, n, v, u)

        keys = jax.nn.softmax(keys, axis=1).astype(compute_dtype)
        lambdas = jnp.einsum(
            "bmuk,bmvu->bkv", keys, flat_values, preferred_element_type=accumulate
        )[:, None]  # content lambda, shared by every position: [batch, 1, k, v]

        if self.position == "global":
            table = self._relative_table(spatial)
            lambdas = lambdas + position_lib.global_position_lambdas(values, table)
        elif self.position == "local":
            kernel = self.param(
                "local_embeddings",
                _normal(1.0),
                (self.receptive_field,) * len(spatial) + (k, u),
                self.param_dtype,
            )
            lambdas = lambdas + position_lib.lambda_convolution(values, kernel)

        out = jnp.einsum(
            "bnhk,bnkv->bnhv",
            queries,
            lambdas.astype(compute_dtype),
            preferred_element_type=accumulate,
        ).astype(compute_dtype)
        out = out.reshape(batch, *spatial, h * v)
        chex.assert_shape(out, (batch, *spatial, self.dim_out))
        return out
