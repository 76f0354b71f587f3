"""The lambda layer (Bello, "LambdaNetworks", ICLR 2021) as a flax.linen module."""

from __future__ import annotations

import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.layers import causal as causal_lib
from lambda_jax.layers import pooling
from lambda_jax.layers import position as position_lib
from lambda_jax.layers.norm import batch_norm

POSITIONS = ("global", "local", "none")
IMPLEMENTATIONS = position_lib.IMPLEMENTATIONS
STRIDE_POOLS = tuple(pooling.STRIDE_POOLS)
# The parameter that holds the position embeddings of each position mode.
EMBEDDING_NAMES = {"global": "relative_embeddings", "local": "local_embeddings"}


def position_embedding_shape(
    position: str, spatial: tuple[int, ...], dim_k: int, dim_u: int, receptive_field: int
) -> Optional[tuple[int, ...]]:
    """Shape of a lambda layer's position embeddings for inputs of spatial size ``spatial``.

    ``[2*S_1-1, ..., 2*S_s-1, k, u]`` (the relative table) for ``position="global"``,
    ``[r, ..., r, k, u]`` (the lambda convolution's kernel) for ``"local"``, ``None`` for
    ``"none"``.
    """
    if position == "global":
        return tuple(2 * size - 1 for size in spatial) + (dim_k, dim_u)
    if position == "local":
        return (receptive_field,) * len(spatial) + (dim_k, dim_u)
    return None


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

    Where the PyTorch ports deviate from the paper, the paper is the default and the ported
    behaviour a field (``lambda_jax.convert`` loads their weights into layers set this way):

    * ``position_bias=True``: a learned bias ``[k]`` added to the position lambdas, as the
      bias of the lambda convolution in timm's and lambda-networks' ``LambdaLayer``; the paper
      has none.
    * ``stride=2, stride_pool="2x2"``: 2x2 average pooling of the output without padding
      (odd sizes floored), as timm; the paper (its LambdaResNets) strides with 3x3 average
      pooling after the layer, ``stride_pool="3x3"`` (see :mod:`lambda_jax.layers.pooling`).

    Initialisation follows the paper: ``W_Q ~ N(0, (k d)^-1/2)``, ``W_K, W_V ~ N(0, d^-1/2)``,
    position embeddings ``N(0, 1)``; projections have no bias.

    Attributes:
      dim_out: output channels; divisible by ``heads``.
      dim_k: query/key depth k.
      heads: number of queries per position h.
      dim_u: intra-depth u.
      position: ``"global"``, ``"local"`` or ``"none"`` (content lambda only).
      receptive_field: scope r of the lambda convolution (odd, ``position="local"``).
      implementation: how non-causal ``position="local"`` is computed, all with the same
        values and gradients: ``"shift"`` contracts the queries with the kernel first and
        sums shifted value slices, with a hand-written gradient (fewest FLOPs, fastest for
        small scopes); ``"banded"`` (images only) computes the lambda convolution as one
        matrix product with banded kernel matrices (fastest for large scopes); ``"conv"`` is
        the paper's lambda convolution, one ``jax.lax.conv_general_dilated`` call (the
        reference); ``"auto"`` takes ``"shift"`` while ``r ** rank * u <= 169`` (r <= 13
        for images with u = 1, r <= 5 with u = 4), else ``"banded"`` for images and
        ``"conv"`` for sequences and volumes.
      use_batchnorm: normalise queries and values: batch norm, or layer norm over the
        channels of each position when ``causal`` (batch statistics over positions would
        leak the future into the past during training).
      causal: masked lambdas for sequences (``position="none"`` or ``"local"``): query n
        sees only context positions ``m <= n``; the keys' softmax is normalised over the
        visible prefix, and the local scope is the r positions ending at n (the kernel's
        index j holds the offset ``j - (r - 1)``). Decode step by step with
        ``init_decode_state`` and ``decode_state=``.
      position_bias: learned bias ``[k]`` on the position lambdas (PyTorch ports; not in the
        paper).
      stride: 1, or 2 to average-pool the output to ``ceil(size / 2)`` (``"3x3"``) or
        ``floor(size / 2)`` (``"2x2"``) per spatial axis.
      stride_pool: the pooling used when ``stride=2``, one of
        :data:`lambda_jax.layers.pooling.STRIDE_POOLS`: ``"3x3"`` (the paper's, TensorFlow
        ``"SAME"`` padding), ``"3x3_symmetric"`` (one cell of padding on each side) or
        ``"2x2"`` (timm's).
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
    implementation: str = "auto"
    use_batchnorm: bool = True
    causal: bool = False
    position_bias: bool = False
    stride: int = 1
    stride_pool: str = "3x3"
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
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"LambdaLayer.implementation must be one of {IMPLEMENTATIONS}, got "
                f"{self.implementation!r}."
            )
        if self.implementation == "banded" and x.ndim != 4 and self.position == "local":
            raise ValueError(
                "LambdaLayer.implementation='banded' needs images [batch, height, width, "
                f"channels]; got an input of shape {x.shape}. Use 'auto', 'shift' or 'conv'."
            )
        if self.position == "local" and (
            self.receptive_field < 1 or (self.receptive_field % 2 == 0 and not self.causal)
        ):
            raise ValueError(
                "LambdaLayer.receptive_field must be a positive odd number for "
                f"position='local' (any positive number when causal), got "
                f"{self.receptive_field}."
            )
        if self.causal and self.position == "global":
            raise ValueError(
                "LambdaLayer.causal supports position='none' or 'local', got 'global'."
            )
        if self.causal and x.ndim != 3:
            raise ValueError(
                "LambdaLayer.causal needs sequences [batch, length, channels]; got an input "
                f"of shape {x.shape}."
            )
        if self.position_bias and self.position == "none":
            raise ValueError(
                "LambdaLayer.position_bias needs position lambdas: set position='global' or "
                "'local', or position_bias=False."
            )
        if self.stride not in (1, 2) or (self.causal and self.stride != 1):
            raise ValueError(
                f"LambdaLayer.stride must be 1 or 2 (1 when causal), got {self.stride}."
            )
        if self.stride_pool not in STRIDE_POOLS:
            raise ValueError(
                f"LambdaLayer.stride_pool must be one of {STRIDE_POOLS}, got {self.stride_pool!r}."
            )
        if x.ndim not in (3, 4, 5):
            raise ValueError(
                "LambdaLayer expects [batch, length, channels], [batch, height, width, "
                "channels] or [batch, time, height, width, channels]; got an input of rank "
                f"{x.ndim} with shape {x.shape}."
            )

    def _local_implementation(self, spatial: tuple[int, ...]) -> str:
        """The local formulation, ``implementation`` with ``"auto"`` resolved (see
        :func:`lambda_jax.layers.position.resolve_local_implementation`)."""
        return position_lib.resolve_local_implementation(
            self.implementation, spatial, self.receptive_field, self.dim_u)

    def position_embedding_shape(self, spatial: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        """The shape of the ``embeddings`` argument for inputs of spatial size ``spatial``
        (see :func:`position_embedding_shape`)."""
        return position_embedding_shape(
            self.position, spatial, self.dim_k, self.dim_u, self.receptive_field)

    def _position_embeddings(
        self, spatial: tuple[int, ...], embeddings: Optional[jax.Array]
    ) -> jax.Array:
        """The given ``embeddings`` (checked) or the layer's own table or kernel parameter."""
        shape = self.position_embedding_shape(spatial)
        if embeddings is not None:
            if tuple(embeddings.shape) != shape:
                raise ValueError(
                    f"LambdaLayer with position={self.position!r} on inputs of spatial size "
                    f"{spatial} needs embeddings of shape {shape} (see "
                    f"position_embedding_shape); got {tuple(embeddings.shape)}."
                )
            return embeddings
        if self.position == "local":
            return self.param(EMBEDDING_NAMES["local"], _normal(1.0), shape, self.param_dtype)
        if self.has_variable("params", EMBEDDING_NAMES["global"]):
            built = self.get_variable("params", EMBEDDING_NAMES["global"]).shape
            if built != shape:
                built_size = tuple((size + 1) // 2 for size in built[: len(spatial)])
                raise ValueError(
                    "LambdaLayer with position='global' was built for inputs of spatial "
                    f"size {built_size} and cannot be applied to size {spatial}: its relative "
                    "embedding table has shape "
                    f"{built}. Resize it with lambda_jax.resize_relative_embeddings, or use "
                    "position='local'."
                )
        return self.param(EMBEDDING_NAMES["global"], _normal(1.0), shape, self.param_dtype)

    def _norm(self, name: str, train: bool) -> nn.Module:
        if self.causal:
            # Batch statistics over positions would let the future shift the past.
            return nn.LayerNorm(epsilon=self.bn_epsilon, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=name)
        return batch_norm(self, train, name)

    def _check_context(self, x: jax.Array, context: jax.Array) -> None:
        if context.ndim != x.ndim:
            raise ValueError(
                f"LambdaLayer context must have the input's rank: input {x.shape}, "
                f"context {context.shape}."
            )
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"LambdaLayer context must have the input's batch size: input {x.shape}, "
                f"context {context.shape}."
            )
        if (self.position != "none" or self.causal) and context.shape[1:-1] != x.shape[1:-1]:
            raise ValueError(
                f"LambdaLayer with position={self.position!r}"
                f"{' and causal=True' if self.causal else ''} needs a context with the "
                f"input's positions: input {x.shape}, context {context.shape}. Use "
                "position='none' for a context of another size."
            )

    def init_decode_state(self, batch_size: int) -> causal_lib.DecodeState:
        """The decoding state before the first position of a causal layer.

        Args:
          batch_size: number of sequences decoded together.

        Returns:
          A ``DecodeState`` for ``apply(variables, x_t, decode_state=state)``.
        """
        if not self.causal:
            raise ValueError("LambdaLayer.init_decode_state needs causal=True.")
        window = self.receptive_field - 1 if self.position == "local" else 0
        dtype = self.dtype if self.dtype is not None else self.param_dtype
        return causal_lib.init_decode_state(
            batch_size, self.dim_k, self.dim_u, self.dim_out // self.heads, window, dtype)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: Optional[jax.Array] = None,
        train: bool = False,
        decode_state: Optional[causal_lib.DecodeState] = None,
        embeddings: Optional[jax.Array] = None,
    ):
        """Applies the layer.

        Args:
          x: ``[batch, *spatial, channels]`` with 1 to 3 spatial axes: the queries' input.
          context: ``[batch, *context_spatial, context_channels]``, the keys' and values'
            input (default: ``x``). Same rank as ``x``; with position lambdas or
            ``causal=True`` it must have the positions of ``x``.
          train: batch norm uses batch statistics (and updates ``batch_stats``) when True.
          decode_state: for a causal layer, the state from ``init_decode_state`` or from the
            previous step; ``x`` is then one position ``[batch, 1, channels]``.
          embeddings: position embeddings to use instead of the layer's own parameter, of
            shape ``position_embedding_shape(spatial)``: the relative table
            ``[2*S_1-1, ..., k, u]`` (``"global"``) or the kernel ``[r, ..., r, k, u]``
            (``"local"``). With them the layer creates no embedding parameter, so several
            layers can share one table (the paper's "shared embeddings", Table 4).

        Returns:
          ``[batch, *spatial, dim_out]`` (each spatial size halved when ``stride=2``);
          with ``decode_state``, the pair ``([batch, 1, dim_out], next DecodeState)``.
        """
        self._check_settings(x)
        if context is None:
            context = x
        else:
            self._check_context(x, context)
        if decode_state is not None and not (self.causal and x.shape[1] == 1):
            raise ValueError(
                "LambdaLayer decode_state needs causal=True and one position per step, "
                f"[batch, 1, channels]; got causal={self.causal} and input {x.shape}."
            )
        batch, *spatial, channels = x.shape
        spatial = tuple(spatial)
        context_spatial = tuple(context.shape[1:-1])
        n = math.prod(spatial)
        m = math.prod(context_spatial)
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

        context_channels = context.shape[-1]
        queries = projection(k * h, (k * channels) ** -0.5, "query", self.dtype)(x)
        values = projection(v * u, context_channels**-0.5, "value", self.dtype)(context)
        if self.use_batchnorm:
            queries = self._norm("query_norm", train)(queries)
            values = self._norm("value_norm", train)(values)
        compute_dtype = queries.dtype
        accumulate = position_lib.accumulation_dtype(compute_dtype)
        # The keys are softmax logits: a bfloat16 rounding of large keys would change
        # which positions the softmax selects, so they are projected in float32.
        keys = projection(k * u, context_channels**-0.5, "key", accumulate)(context)

        queries = queries.reshape(batch, n, h, k)
        keys = keys.reshape(batch, m, u, k)
        values = values.reshape(batch, *context_spatial, u, v)
        values = jnp.swapaxes(values, -1, -2)  # [batch, *context_spatial, v, u]
        flat_values = values.reshape(batch, m, v, u)

        if embeddings is not None and self.position == "none":
            raise ValueError(
                "LambdaLayer with position='none' takes no embeddings; set position='global' "
                "or 'local', or leave embeddings out."
            )
        kernel = None
        if self.position == "local":
            kernel = self._position_embeddings(spatial, embeddings)

        local = None  # the non-causal local formulation, resolved from "auto"
        if decode_state is not None:
            lambdas, decode_state = causal_lib.decode_content_step(
                decode_state, keys[:, 0], flat_values[:, 0])
            if kernel is not None:
                position, decode_state = causal_lib.decode_position_step(
                    decode_state, kernel, flat_values[:, 0], accumulate)
                lambdas = lambdas + position
            lambdas = lambdas[:, None]  # [batch, 1, k, v]
        elif self.causal:
            lambdas = causal_lib.causal_content_lambdas(keys, flat_values)
            if kernel is not None:
                lambdas = lambdas + position_lib.lambda_convolution(values, kernel, causal=True)
        else:
            keys = jax.nn.softmax(keys, axis=1).astype(compute_dtype)
            lambdas = jnp.einsum(
                "bmuk,bmvu->bkv", keys, flat_values, preferred_element_type=accumulate
            )[:, None]  # content lambda, shared by every position: [batch, 1, k, v]
            if kernel is not None:
                local = self._local_implementation(spatial)
            if self.position == "global":
                table = self._position_embeddings(spatial, embeddings)
                lambdas = lambdas + position_lib.global_position_lambdas(values, table)
            elif local in position_lib.LAMBDA_IMPLEMENTATIONS:
                lambdas = lambdas + position_lib.local_position_lambdas(values, kernel, local)
        if self.position_bias:
            bias = self.param("position_bias", nn.initializers.zeros, (k,), self.param_dtype)
            lambdas = lambdas + bias[:, None].astype(lambdas.dtype)

        out = jnp.einsum(
            "bnhk,bnkv->bnhv",
            queries,
            lambdas.astype(compute_dtype),
            preferred_element_type=accumulate,
        ).reshape(batch, *spatial, h * v)
        if local in position_lib.OUTPUT_IMPLEMENTATIONS:
            out = out + position_lib.local_position_output(
                queries.reshape(batch, *spatial, h, k), values, kernel, local
            )
        out = out.astype(compute_dtype)
        chex.assert_shape(out, (batch, *spatial, self.dim_out))
        if decode_state is not None:
            return out, decode_state
        if self.stride == 2:
            out = self._pool(out)
        return out

    def _pool(self, out: jax.Array) -> jax.Array:
        """Average-pools ``[batch, *spatial, dim_out]`` with stride 2 on every spatial axis."""
        return pooling.stride_pool(out, self.stride_pool)


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
