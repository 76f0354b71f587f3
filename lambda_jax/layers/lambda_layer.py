"""The lambda layer (Bello, "LambdaNetworks", ICLR 2021) as a flax.linen module."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.core import layer as core_layer
from lambda_jax.core.pooling import stride_pool
from lambda_jax.core.position import IMPLEMENTATIONS
from lambda_jax.core.settings import (
    EMBEDDING_NAMES,
    POSITIONS,
    STRIDE_POOLS,
    LambdaSettings,
    position_embedding_shape,
)
from lambda_jax.layers.norm import BatchNormVariables

__all__ = ["EMBEDDING_NAMES", "IMPLEMENTATIONS", "POSITIONS", "STRIDE_POOLS", "LambdaLayer",
           "SharedPositionEmbeddings", "position_embedding_shape"]


def _normal(stddev: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=stddev)


class Kernel(nn.Module):
    """The kernel ``[in_features, features]`` of a projection without bias, held as
    ``nn.Dense`` holds it (``{"kernel": ...}`` under the module's name)."""

    in_features: int
    features: int
    stddev: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", _normal(self.stddev), (self.in_features, self.features),
                          self.param_dtype)


class LambdaLayer(LambdaSettings, nn.Module):
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

    The maths is :func:`lambda_jax.functional.lambda_layer`; this module owns the
    variables. Sums over context positions accumulate in float32 whatever ``dtype`` is, so
    bfloat16 compute stays finite for large inputs. Masked lambdas for language models are
    :class:`lambda_jax.CausalLambdaLayer`.

    Where the PyTorch ports deviate from the paper, the paper is the default and the ported
    behaviour a field (``lambda_jax.convert`` loads their weights into layers set this way):

    * ``position_bias=True``: a learned bias ``[k]`` added to the position lambdas, as the
      bias of the lambda convolution in timm's and lambda-networks' ``LambdaLayer``; the paper
      has none.
    * ``stride=2, stride_pool="2x2"``: 2x2 average pooling of the output without padding
      (odd sizes floored), as timm; the paper (its LambdaResNets) strides with 3x3 average
      pooling after the layer, ``stride_pool="3x3"`` (see :mod:`lambda_jax.core.pooling`).

    Initialisation follows the paper: ``W_Q ~ N(0, (k d)^-1/2)``, ``W_K, W_V ~ N(0, d^-1/2)``,
    position embeddings ``N(0, 1)``; projections have no bias.

    Attributes:
      dim_out: output channels; divisible by ``heads``.
      dim_k: query/key depth k.
      heads: number of queries per position h.
      dim_u: intra-depth u.
      position: ``"global"``, ``"local"`` or ``"none"`` (content lambda only).
      receptive_field: scope r of the lambda convolution (odd, ``position="local"``).
      implementation: how ``position="local"`` is computed, one of
        ``position.IMPLEMENTATIONS``, all with the same values and gradients: ``"conv"`` is
        the paper's lambda convolution, one ``jax.lax.conv_general_dilated`` call (the
        reference); ``"shift"`` contracts the queries with the kernel first and sums shifted
        value slices (fewest FLOPs); ``"banded"`` (images) computes the lambda convolution
        as one matrix product with banded kernel matrices; ``"tiled"`` (images) does that
        per tile of output rows, applied to the queries at once and recomputed in the
        backward pass, so the position lambdas are never held; ``"auto"`` picks by
        backend and size (see ``position.resolve_local_implementation``).
      use_batchnorm: batch-normalise the queries and values.
      position_bias: learned bias ``[k]`` on the position lambdas (PyTorch ports; not in the
        paper).
      stride: 1, or 2 to average-pool the output to ``ceil(size / 2)`` (``"3x3"``) or
        ``floor(size / 2)`` (``"2x2"``) per spatial axis.
      stride_pool: the pooling used when ``stride=2``, one of
        :data:`lambda_jax.core.pooling.STRIDE_POOLS`: ``"3x3"`` (the paper's, TensorFlow
        ``"SAME"`` padding), ``"3x3_symmetric"`` (one cell of padding on each side) or
        ``"2x2"`` (timm's).
      axis_name: mapped axis over which batch-norm statistics are averaged
        (cross-device batch norm under ``pmap``/``shard_map``).
      bn_momentum: momentum of the batch-norm running statistics.
      bn_epsilon: epsilon of the batch norm.
      dtype: compute dtype (``None``: from the input and the parameters).
      param_dtype: parameter dtype.
    """

    param_dtype: Any = jnp.float32

    __repr__ = nn.Module.__repr__

    @property
    def settings(self) -> LambdaSettings:
        """The layer's fields but ``param_dtype``, as :func:`lambda_jax.functional.lambda_layer`
        takes them."""
        return LambdaSettings(**{field.name: getattr(self, field.name)
                                 for field in dataclasses.fields(LambdaSettings)})

    def position_embedding_shape(self, spatial: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        """The shape of the ``embeddings`` argument for inputs of spatial size ``spatial``
        (see :func:`position_embedding_shape`)."""
        return self.embedding_shape(spatial)

    def _variables(self, x: jax.Array, context: jax.Array, embeddings: Optional[jax.Array]):
        """The layer's ``params`` (arrays) and ``batch_stats`` (variables), declared with the
        names and initialisers of the paper's layer."""
        shapes = self.param_shapes(x.shape[-1], context.shape[-1], tuple(x.shape[1:-1]))
        channels, context_channels = x.shape[-1], context.shape[-1]
        stddevs = {"query": (self.dim_k * channels) ** -0.5, "value": context_channels**-0.5,
                   "key": context_channels**-0.5}
        params: dict[str, Any] = {}
        stats: dict[str, Any] = {}
        for name in ("query", "value"):
            params[name] = {"kernel": Kernel(*shapes[name]["kernel"], stddevs[name],
                                             self.param_dtype, name=name)()}
        if self.use_batchnorm:
            for name in ("query_norm", "value_norm"):
                params[name], stats[name] = BatchNormVariables(
                    shapes[name]["scale"][0], self.param_dtype, name=name)()
        params["key"] = {"kernel": Kernel(*shapes["key"]["kernel"], stddevs["key"],
                                          self.param_dtype, name="key")()}
        if self.position != "none" and embeddings is None:
            name = EMBEDDING_NAMES[self.position]
            params[name] = self.param(name, _normal(1.0), shapes[name], self.param_dtype)
        if self.position_bias:
            params["position_bias"] = self.param("position_bias", nn.initializers.zeros,
                                                 shapes["position_bias"], self.param_dtype)
        return params, stats

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: Optional[jax.Array] = None,
        train: bool = False,
        embeddings: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[batch, *spatial, channels]`` with 1 to 3 spatial axes: the queries' input.
          context: ``[batch, *context_spatial, context_channels]``, the keys' and values'
            input (default: ``x``). Same rank as ``x``; with position lambdas it must have
            the positions of ``x``.
          train: batch norm uses batch statistics (and updates ``batch_stats``) when True.
          embeddings: position embeddings to use instead of the layer's own parameter, of
            shape ``position_embedding_shape(spatial)``: the relative table
            ``[2*S_1-1, ..., k, u]`` (``"global"``) or the kernel ``[r, ..., r, k, u]``
            (``"local"``). With them the layer creates no embedding parameter, so several
            layers can share one table (the paper's "shared embeddings", Table 4).

        Returns:
          ``[batch, *spatial, dim_out]`` (each spatial size halved when ``stride=2``).
        """
        settings = self.settings
        core_layer.check_call(settings, x, context, embeddings)
        core_layer.check_relative_table(settings, self.variables.get("params", {}),
                                        tuple(x.shape[1:-1]))
        params, stat_variables = self._variables(x, x if context is None else context,
                                                 embeddings)
        stats = {name: {key: variable.value for key, variable in norm.items()}
                 for name, norm in stat_variables.items()}
        if self.is_initializing():
            # Like nn.BatchNorm: statistics are not synchronised across devices at init.
            settings = dataclasses.replace(settings, axis_name=None)
        out, new_stats = core_layer.apply_lambda_layer(settings, params, x, context,
                                                       embeddings, stats, train)
        if train and not self.is_initializing():
            for name, norm in stat_variables.items():
                for key, variable in norm.items():
                    variable.value = new_stats[name][key]
        if self.stride == 2:
            out = self._pool(out)
        return out

    def _pool(self, out: jax.Array) -> jax.Array:
        """Average-pools ``[batch, *spatial, dim_out]`` with stride 2 on every spatial axis."""
        return stride_pool(out, self.stride_pool)


class SharedPositionEmbeddings(nn.Module):
    """Position embeddings held apart from any layer, for lambda layers that share them.

    Calling it returns one parameter, initialised ``N(0, 1)`` like a layer's own and named
    like it (so :func:`lambda_jax.resize_relative_embeddings` finds global tables): the
    relative table ``relative_embeddings`` ``[2*S_1-1, ..., 2*S_s-1, k, u]`` for
    ``position="global"``, the kernel ``local_embeddings`` ``[r, ..., r, k, u]`` for
    ``"local"``. Pass it as ``embeddings=`` to every :class:`LambdaLayer` that shares it; its
    shape is their ``position_embedding_shape``.

    Attributes:
      shape: the embeddings' shape.
      position: ``"global"`` or ``"local"``.
      param_dtype: parameter dtype.
    """

    shape: tuple[int, ...]
    position: str = "local"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        """The embeddings: ``shape``."""
        if self.position not in EMBEDDING_NAMES:
            raise ValueError(
                f"SharedPositionEmbeddings.position must be one of {tuple(EMBEDDING_NAMES)}, "
                f"got {self.position!r}."
            )
        return self.param(
            EMBEDDING_NAMES[self.position], _normal(1.0), tuple(self.shape), self.param_dtype
        )
