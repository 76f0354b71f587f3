"""The lambda layer as pure functions of arrays (the paper's Figure 3).

The modules (:class:`lambda_jax.LambdaLayer` in linen, :class:`lambda_jax.nnx.LambdaLayer`
in NNX) own the parameters and call :func:`lambda_layer`; the formulations of the position
lambdas live in :mod:`lambda_jax.layers.position`. Shapes: b batch, n query positions
(``n = prod(S)`` for spatial sizes ``S``), m context positions, h heads, k key depth,
u intra-depth, v value depth.

Relative offsets ``o = m - n`` (context position minus query position): the local kernel
``[r, ..., r, k, u]`` holds offset o at index ``o + (r - 1) // 2``, the global table
``[2*S_1-1, ..., k, u]`` at index ``o + S - 1``.

Sums over positions accumulate in float32 (or wider) whatever the inputs' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp

from lambda_jax.layers import norm as norm_lib
from lambda_jax.layers import pooling
from lambda_jax.layers import position as position_lib

__all__ = [
    "LambdaSettings",
    "apply_lambdas",
    "content_lambda",
    "global_position_lambdas",
    "lambda_layer",
    "local_position_lambdas",
    "local_position_output",
    "position_embedding_shape",
]

POSITIONS = ("global", "local", "none")
STRIDE_POOLS = tuple(pooling.STRIDE_POOLS)
# The parameter that holds the position embeddings of each position mode.
EMBEDDING_NAMES = {"global": "relative_embeddings", "local": "local_embeddings"}


def content_lambda(keys: jax.Array, values: jax.Array) -> jax.Array:
    """The content lambda ``λc = Σ_m,u softmax_m(K)[m,k,u] V[m,v,u]``, shared by all queries.

    Args:
      keys: ``[b, m, k, u]`` key logits, softmaxed over the m context positions in float32.
      values: ``[b, m, v, u]``.

    Returns:
      ``[b, k, v]`` in ``accumulation_dtype(values.dtype)``.
    """
    chex.assert_rank([keys, values], 4)
    chex.assert_equal_shape([keys, values], dims=(0, 1, 3))
    accumulate = position_lib.accumulation_dtype(values.dtype)
    weights = jax.nn.softmax(keys.astype(jnp.promote_types(keys.dtype, jnp.float32)), axis=1)
    return jnp.einsum("bmku,bmvu->bkv", weights.astype(values.dtype), values,
                      preferred_element_type=accumulate)


def global_position_lambdas(values: jax.Array, table: jax.Array) -> jax.Array:
    """Position lambdas over the whole input, ``λp_n = Σ_m,u E[n,m,k,u] V[m,v,u]``.

    Args:
      values: ``[b, *S, v, u]``.
      table: ``[2*S_1-1, ..., 2*S_s-1, k, u]``, the embedding of offset o at ``o + S - 1``.

    Returns:
      ``[b, n, k, v]`` in ``accumulation_dtype(values.dtype)``.
    """
    return position_lib.global_position_lambdas(values, table)


def local_position_lambdas(
    values: jax.Array, kernel: jax.Array, implementation: str = "conv"
) -> jax.Array:
    """Position lambdas over an r x ... x r scope (the lambda convolution), zero padded.

    Args:
      values: ``[b, *S, v, u]``.
      kernel: ``[r, ..., r, k, u]`` (r odd), the embedding of offset o at ``o + (r-1)//2``.
      implementation: a formulation that builds the position lambdas, one of
        ``position.LAMBDA_IMPLEMENTATIONS`` (``"conv"``: the reference; ``"banded"``: images).

    Returns:
      ``[b, n, k, v]`` in ``accumulation_dtype(values.dtype)``.
    """
    chex.assert_rank(kernel, values.ndim - 1)
    return position_lib.local_position_lambdas(values, kernel, implementation)


def apply_lambdas(queries: jax.Array, lambdas: jax.Array) -> jax.Array:
    """The output ``y[n, h, v] = Σ_k Q[n,h,k] λ_n[k, v]``, heads merged.

    Args:
      queries: ``[b, n, h, k]``.
      lambdas: ``[b, n, k, v]``, or ``[b, 1, k, v]`` for one lambda shared by every query.

    Returns:
      ``[b, n, h*v]`` (head-major) in ``accumulation_dtype(queries.dtype)``.
    """
    chex.assert_rank([queries, lambdas], 4)
    batch, n, heads, depth_k = queries.shape
    chex.assert_shape(lambdas, (batch, None, depth_k, None))
    if lambdas.shape[1] not in (1, n):
        raise ValueError(f"lambdas must have 1 or n = {n} positions: queries {queries.shape}, "
                         f"lambdas {lambdas.shape}.")
    out = jnp.einsum("bnhk,bnkv->bnhv", queries, lambdas.astype(queries.dtype),
                     preferred_element_type=position_lib.accumulation_dtype(queries.dtype))
    return out.reshape(batch, n, heads * lambdas.shape[-1])


def local_position_output(
    queries: jax.Array, values: jax.Array, kernel: jax.Array, implementation: str = "auto"
) -> jax.Array:
    """The local position term of the output, ``Σ_k Q[n,h,k] λp_n[k, v]``, by any formulation.

    Formulations of ``position.OUTPUT_IMPLEMENTATIONS`` never build the position lambdas;
    for those of ``position.LAMBDA_IMPLEMENTATIONS`` the queries are applied to them.

    Args:
      queries: ``[b, *S, h, k]``.
      values: ``[b, *S, v, u]``.
      kernel: ``[r, ..., r, k, u]`` (r odd).
      implementation: one of ``position.IMPLEMENTATIONS``; ``"auto"`` picks one by
        backend and size (see ``position.resolve_local_implementation``).

    Returns:
      ``[b, *S, h*v]`` (head-major) in ``accumulation_dtype(values.dtype)``.
    """
    batch, *spatial, heads, depth_k = queries.shape
    chex.assert_shape(values, (batch, *spatial, None, None))
    chex.assert_shape(kernel, (kernel.shape[0],) * len(spatial) + (depth_k, values.shape[-1]))
    resolved = position_lib.resolve_local_implementation(
        implementation, spatial, kernel.shape[0], values.shape[-1])
    if resolved in position_lib.OUTPUT_IMPLEMENTATIONS:
        return position_lib.local_position_output(queries, values, kernel, resolved)
    lambdas = local_position_lambdas(values, kernel, resolved)
    flat = queries.reshape(batch, math.prod(spatial), heads, depth_k)
    out = apply_lambdas(flat.astype(lambdas.dtype), lambdas)
    return out.reshape(batch, *spatial, -1)


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


def check_input_shape(name: str, x: Any) -> None:
    """Raises ValueError unless ``x`` is ``[batch, *spatial, channels]`` with 1 to 3 spatial
    axes and no empty axis; ``name`` names the caller in the message."""
    shape = tuple(x.shape)
    if len(shape) not in (3, 4, 5):
        raise ValueError(
            f"{name} expects [batch, length, channels], [batch, height, width, channels] or "
            f"[batch, time, height, width, channels]; got an input of rank {len(shape)} with "
            f"shape {shape}."
        )
    if 0 in shape:
        axes = ["batch"] + [f"spatial axis {i + 1}" for i in range(len(shape) - 2)]
        empty = [axis for axis, size in zip(axes + ["channels"], shape) if size == 0]
        raise ValueError(
            f"{name} got an input of shape {shape} with no elements along {', '.join(empty)}; "
            "every axis needs at least one element."
        )


@dataclasses.dataclass(frozen=True)
class LambdaSettings:
    """The settings of a lambda layer: the fields of :class:`lambda_jax.LambdaLayer`, which
    documents each. ``check`` validates them, naming the field."""

    dim_out: int
    dim_k: int = 16
    heads: int = 4
    dim_u: int = 1
    position: str = "global"
    receptive_field: int = 23
    implementation: str = "auto"
    use_batchnorm: bool = True
    position_bias: bool = False
    stride: int = 1
    stride_pool: str = "3x3"
    axis_name: Optional[Any] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Optional[Any] = None

    @property
    def dim_v(self) -> int:
        return self.dim_out // self.heads

    def check(self) -> None:
        """Raises ValueError naming the first impossible field."""
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
        if self.implementation not in position_lib.IMPLEMENTATIONS:
            raise ValueError(
                f"LambdaLayer.implementation must be one of {position_lib.IMPLEMENTATIONS}, got "
                f"{self.implementation!r}."
            )
        if self.position == "local" and (self.receptive_field < 1 or self.receptive_field % 2 == 0):
            raise ValueError(
                "LambdaLayer.receptive_field must be a positive odd number for "
                f"position='local', got {self.receptive_field}."
            )
        if self.position_bias and self.position == "none":
            raise ValueError(
                "LambdaLayer.position_bias needs position lambdas: set position='global' or "
                "'local', or position_bias=False."
            )
        if self.stride not in (1, 2):
            raise ValueError(f"LambdaLayer.stride must be 1 or 2, got {self.stride}.")
        if self.stride_pool not in STRIDE_POOLS:
            raise ValueError(
                f"LambdaLayer.stride_pool must be one of {STRIDE_POOLS}, got {self.stride_pool!r}."
            )

    def check_inputs(self, x: Any, context: Any = None) -> None:
        """Raises ValueError if the input ``[batch, *S, channels]`` or the context
        ``[batch, *S_context, channels_context]`` cannot go through this layer."""
        check_input_shape("LambdaLayer", x)
        if (self.implementation in position_lib.IMAGE_IMPLEMENTATIONS
                and self.position == "local" and len(x.shape) != 4):
            raise ValueError(
                f"LambdaLayer.implementation={self.implementation!r} needs images [batch, "
                f"height, width, channels]; got an input of shape {tuple(x.shape)}. Use "
                "'auto', 'shift' or 'conv'."
            )
        if context is None:
            return
        check_input_shape("LambdaLayer context", context)
        if len(context.shape) != len(x.shape):
            raise ValueError(
                f"LambdaLayer context must have the input's rank: input {tuple(x.shape)}, "
                f"context {tuple(context.shape)}."
            )
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"LambdaLayer context must have the input's batch size: input "
                f"{tuple(x.shape)}, context {tuple(context.shape)}."
            )
        if self.position != "none" and tuple(context.shape[1:-1]) != tuple(x.shape[1:-1]):
            raise ValueError(
                f"LambdaLayer with position={self.position!r} needs a context with the input's "
                f"positions: input {tuple(x.shape)}, context {tuple(context.shape)}. Use "
                "position='none' for a context of another size."
            )

    def embedding_shape(self, spatial: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        """The position embeddings' shape for inputs of spatial size ``spatial``."""
        return position_embedding_shape(
            self.position, tuple(spatial), self.dim_k, self.dim_u, self.receptive_field)

    def param_shapes(self, in_features: int, context_features: int,
                     spatial: tuple[int, ...]) -> dict[str, Any]:
        """The shape of every parameter, as the tree ``lambda_layer`` takes."""
        h, k, u, v = self.heads, self.dim_k, self.dim_u, self.dim_v
        shapes: dict[str, Any] = {
            "query": {"kernel": (in_features, h * k)},
            "key": {"kernel": (context_features, u * k)},
            "value": {"kernel": (context_features, u * v)},
        }
        if self.use_batchnorm:
            shapes["query_norm"] = {"scale": (h * k,), "bias": (h * k,)}
            shapes["value_norm"] = {"scale": (u * v,), "bias": (u * v,)}
        if self.position != "none":
            shapes[EMBEDDING_NAMES[self.position]] = self.embedding_shape(spatial)
        if self.position_bias:
            shapes["position_bias"] = (k,)
        return shapes


def check_tree(kind: str, tree: Mapping[str, Any], shapes: Mapping[str, Any],
                prefix: str = "") -> None:
    """Raises ValueError naming each entry of ``tree`` that is missing or has the wrong shape."""
    for name, shape in shapes.items():
        path = f"{prefix}[{name!r}]"
        if not isinstance(tree, Mapping) or name not in tree:
            raise ValueError(f"{kind}{path} is missing; the layer needs it "
                             f"({shape if isinstance(shape, tuple) else 'a dict'}).")
        if isinstance(shape, Mapping):
            check_tree(kind, tree[name], shape, path)
        elif tuple(jnp.shape(tree[name])) != shape:
            raise ValueError(f"{kind}{path} has shape {tuple(jnp.shape(tree[name]))}; the layer "
                             f"needs {shape} for these settings and this input.")


def project(x: jax.Array, kernel: jax.Array, dtype: Optional[Any]) -> jax.Array:
    """``x @ kernel`` for ``[..., in]`` and ``[in, out]``, in ``dtype`` (None: promoted), as
    ``nn.Dense`` computes it."""
    dtype = dtype or jnp.result_type(x, kernel)
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                               (((x.ndim - 1,), (0,)), ((), ())))


def apply_lambda_layer(
    settings: LambdaSettings,
    params: Mapping[str, Any],
    x: jax.Array,
    context: Optional[jax.Array],
    embeddings: Optional[jax.Array],
    batch_stats: Optional[Mapping[str, Any]],
    train: bool,
) -> tuple[jax.Array, dict[str, Any]]:
    """:func:`lambda_layer` with checked settings and shapes, before the stride pooling.

    Returns ``([batch, *S, dim_out], new batch_stats)``; the modules call it.
    """
    if context is None:
        context = x
    batch, *spatial, _ = x.shape
    spatial = tuple(spatial)
    context_spatial = tuple(context.shape[1:-1])
    n, m = math.prod(spatial), math.prod(context_spatial)
    h, k, u, v = settings.heads, settings.dim_k, settings.dim_u, settings.dim_v

    queries = project(x, params["query"]["kernel"], settings.dtype)
    values = project(context, params["value"]["kernel"], settings.dtype)
    new_stats: dict[str, Any] = {}
    if settings.use_batchnorm:
        normalised = []
        for name, features in (("query_norm", queries), ("value_norm", values)):
            out, new_stats[name] = norm_lib.apply_batch_norm(
                features, params[name], batch_stats[name], train=train,
                momentum=settings.bn_momentum, epsilon=settings.bn_epsilon,
                axis_name=settings.axis_name, dtype=settings.dtype)
            normalised.append(out)
        queries, values = normalised
    compute_dtype = queries.dtype
    # The keys are softmax logits: a bfloat16 rounding of large keys would change which
    # positions the softmax selects, so they are projected in float32.
    keys = project(context, params["key"]["kernel"],
                    position_lib.accumulation_dtype(compute_dtype))

    queries = queries.reshape(batch, n, h, k)
    keys = jnp.swapaxes(keys.reshape(batch, m, u, k), -1, -2)  # [batch, m, k, u]
    values = jnp.swapaxes(values.reshape(batch, *context_spatial, u, v), -1, -2)
    lambdas = content_lambda(keys, values.reshape(batch, m, v, u))[:, None]  # [b, 1, k, v]

    position_output = None
    if settings.position == "global":
        table = params[EMBEDDING_NAMES["global"]] if embeddings is None else embeddings
        lambdas = lambdas + global_position_lambdas(values, table)
    elif settings.position == "local":
        kernel = params[EMBEDDING_NAMES["local"]] if embeddings is None else embeddings
        local = position_lib.resolve_local_implementation(
            settings.implementation, spatial, settings.receptive_field, u)
        if local in position_lib.LAMBDA_IMPLEMENTATIONS:
            lambdas = lambdas + local_position_lambdas(values, kernel, local)
        else:
            position_output = local_position_output(
                queries.reshape(batch, *spatial, h, k), values, kernel, local)
    if settings.position_bias:
        lambdas = lambdas + params["position_bias"][:, None].astype(lambdas.dtype)

    out = apply_lambdas(queries, lambdas).reshape(batch, *spatial, h * v)
    if position_output is not None:
        out = out + position_output
    out = out.astype(compute_dtype)
    chex.assert_shape(out, (batch, *spatial, settings.dim_out))
    return out, new_stats


def check_call(settings: LambdaSettings, x: Any, context: Any, embeddings: Any) -> None:
    """Raises ValueError for impossible settings, inputs or given embeddings."""
    settings.check()
    settings.check_inputs(x, context)
    if embeddings is None:
        return
    if settings.position == "none":
        raise ValueError(
            "LambdaLayer with position='none' takes no embeddings; set position='global' "
            "or 'local', or leave embeddings out."
        )
    spatial = tuple(x.shape[1:-1])
    needed = settings.embedding_shape(spatial)
    if tuple(embeddings.shape) != needed:
        raise ValueError(
            f"LambdaLayer with position={settings.position!r} on inputs of spatial size "
            f"{spatial} needs embeddings of shape {needed} (see position_embedding_shape); "
            f"got {tuple(embeddings.shape)}."
        )


def check_relative_table(settings: LambdaSettings, params: Mapping[str, Any],
                         spatial: tuple[int, ...]) -> None:
    """Raises ValueError if ``params`` hold a global table built for another input size."""
    name = EMBEDDING_NAMES["global"]
    if settings.position != "global" or name not in params:
        return
    built = tuple(jnp.shape(params[name]))
    if built != settings.embedding_shape(spatial):
        built_size = tuple((size + 1) // 2 for size in built[: len(spatial)])
        raise ValueError(
            "LambdaLayer with position='global' was built for inputs of spatial "
            f"size {built_size} and cannot be applied to size {spatial}: its relative "
            f"embedding table has shape {built}. Resize it with "
            "lambda_jax.resize_relative_embeddings, or use position='local'."
        )


def check_variables(
    settings: LambdaSettings,
    params: Mapping[str, Any],
    batch_stats: Optional[Mapping[str, Any]],
    x: Any,
    context: Any,
    embeddings: Any,
) -> None:
    """Raises ValueError naming each parameter or statistic that is missing or misshapen."""
    spatial = tuple(x.shape[1:-1])
    check_relative_table(settings, params, spatial)
    context_shape = x.shape if context is None else context.shape
    shapes = settings.param_shapes(x.shape[-1], context_shape[-1], spatial)
    if embeddings is not None:
        del shapes[EMBEDDING_NAMES[settings.position]]
    check_tree("params", params, shapes)
    if settings.use_batchnorm:
        if batch_stats is None:
            raise ValueError("LambdaLayer with use_batchnorm=True needs batch_stats "
                             "(the running averages of query_norm and value_norm).")
        check_tree("batch_stats", batch_stats, {
            name: {"mean": shapes[name]["scale"], "var": shapes[name]["scale"]}
            for name in ("query_norm", "value_norm")})


def lambda_layer(
    params: Mapping[str, Any],
    x: jax.Array,
    *,
    context: Optional[jax.Array] = None,
    embeddings: Optional[jax.Array] = None,
    batch_stats: Optional[Mapping[str, Any]] = None,
    train: bool = False,
    **settings: Any,
):
    """The lambda layer over the parameters of :class:`lambda_jax.LambdaLayer` (linen).

    ``lambda_layer(variables["params"], x, batch_stats=variables["batch_stats"], **fields)``
    equals ``LambdaLayer(**fields).apply(variables, x)``.

    Args:
      params: the linen layer's ``params``: ``query``, ``key``, ``value`` (``{"kernel":
        [in, out]}``), ``query_norm`` and ``value_norm`` (``{"scale", "bias"}``, with
        ``use_batchnorm``), ``relative_embeddings`` ``[2*S_1-1, ..., k, u]`` or
        ``local_embeddings`` ``[r, ..., r, k, u]``, and ``position_bias`` ``[k]`` (with it).
      x: ``[batch, *S, channels]`` with 1 to 3 spatial axes.
      context: ``[batch, *S_context, channels_context]`` for the keys and values (default
        ``x``); with position lambdas ``S_context = S``.
      embeddings: position embeddings to use instead of ``params``' own (shared embeddings).
      batch_stats: the linen layer's ``batch_stats`` (``query_norm`` and ``value_norm``,
        each ``{"mean", "var"}``), needed with ``use_batchnorm``.
      train: normalise with the batch's statistics and return the updated ``batch_stats``.
      **settings: the fields of :class:`lambda_jax.LambdaLayer` (``dim_out`` required;
        ``dim_k``, ``heads``, ``dim_u``, ``position``, ``receptive_field``,
        ``implementation``, ``use_batchnorm``, ``position_bias``, ``stride``,
        ``stride_pool``, ``axis_name``, ``bn_momentum``, ``bn_epsilon``, ``dtype``).

    Returns:
      ``[batch, *S, dim_out]`` (halved per spatial axis when ``stride=2``); with
      ``train=True`` the pair ``(output, new batch_stats)``.
    """
    layer_settings = LambdaSettings(**settings)
    check_call(layer_settings, x, context, embeddings)
    check_variables(layer_settings, params, batch_stats, x, context, embeddings)
    out, new_stats = apply_lambda_layer(layer_settings, params, x, context, embeddings,
                                        batch_stats, train)
    if layer_settings.stride == 2:
        out = pool_output(layer_settings, out)
    return (out, new_stats) if train else out


def pool_output(settings: LambdaSettings, out: jax.Array) -> jax.Array:
    """The stride-2 average pooling of ``[batch, *S, dim_out]`` named by ``stride_pool``."""
    return pooling.stride_pool(out, settings.stride_pool)
