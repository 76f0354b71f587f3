"""The whole lambda layer as a pure function of its parameters and inputs (the paper's
Figure 3), with the checks that name a wrong setting, input or parameter.

Shapes: b batch, n query positions (``n = prod(S)`` for spatial sizes ``S``), m context
positions, h heads, k key depth, u intra-depth, v value depth. Sums over positions
accumulate in float32 (or wider) whatever the inputs' dtype.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp

from lambda_jax.core import pooling
from lambda_jax.core.content import apply_lambdas, content_lambda
from lambda_jax.core.norm import apply_batch_norm
from lambda_jax.core.numerics import accumulation_dtype, project
from lambda_jax.core.position import (
    LAMBDA_IMPLEMENTATIONS,
    choose_local_implementation,
    global_position_lambdas,
    local_position_lambdas,
)
from lambda_jax.core.position.output import position_output
from lambda_jax.core.settings import EMBEDDING_NAMES, LambdaSettings, check_tree


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

    The local formulation ``"auto"`` and ``"autotune"`` pick is that for a training step
    when ``train`` (batch statistics), for inference otherwise. Returns ``([batch, *S, dim_out], new
    batch_stats)``; the modules call it.
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
            out, new_stats[name] = apply_batch_norm(
                features, params[name], batch_stats[name], train=train,
                momentum=settings.bn_momentum, epsilon=settings.bn_epsilon,
                axis_name=settings.axis_name, dtype=settings.dtype)
            normalised.append(out)
        queries, values = normalised
    compute_dtype = queries.dtype
    # The keys are softmax logits: a bfloat16 rounding of large keys would change which
    # positions the softmax selects, so they are projected in float32.
    keys = project(context, params["key"]["kernel"],
                    accumulation_dtype(compute_dtype))

    queries = queries.reshape(batch, n, h, k)
    keys = jnp.swapaxes(keys.reshape(batch, m, u, k), -1, -2)  # [batch, m, k, u]
    values = jnp.swapaxes(values.reshape(batch, *context_spatial, u, v), -1, -2)
    lambdas = content_lambda(keys, values.reshape(batch, m, v, u))[:, None]  # [b, 1, k, v]

    local_output = None
    if settings.position == "global":
        table = params[EMBEDDING_NAMES["global"]] if embeddings is None else embeddings
        lambdas = lambdas + global_position_lambdas(values, table)
    elif settings.position == "local":
        kernel = params[EMBEDDING_NAMES["local"]] if embeddings is None else embeddings
        image_queries = queries.reshape(batch, *spatial, h, k)
        local = choose_local_implementation(settings.implementation, image_queries, values,
                                            kernel, "train" if train else "inference")
        if local in LAMBDA_IMPLEMENTATIONS:
            lambdas = lambdas + local_position_lambdas(values, kernel, local)
        else:
            local_output = position_output(image_queries, values, kernel, local)
    if settings.position_bias:
        lambdas = lambdas + params["position_bias"][:, None].astype(lambdas.dtype)

    out = apply_lambdas(queries, lambdas).reshape(batch, *spatial, h * v)
    if local_output is not None:
        out = out + local_output
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
