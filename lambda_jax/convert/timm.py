"""Weights of timm's ``LambdaLayer`` and LambdaResNets in lambda_jax.

A timm layer ``timm.layers.LambdaLayer(dim, dim_out=dim, feat_size, stride, num_heads=H,
dim_head=K, r=R)`` computes what ``lambda_jax.LambdaLayer(dim_out=dim, dim_k=K, heads=H,
dim_u=1, position="local", receptive_field=R, position_bias=True, stride=stride,
stride_pool="2x2")`` computes (``position="global"``, no ``position_bias``, for ``r=None``)
with the variables :func:`from_timm` returns. timm fuses the projections into one 1x1
convolution ``qkv`` (queries ``(h k)``, then keys, then values), holds the lambda
convolution as a ``Conv3d(1, k, (r, r, 1))`` with a bias over ``[H, W, v]`` and the global
table as ``[2H-1, 2W-1, k]``; its layer has no intra-depth (u = 1).

The timm models ``lambda_resnet26t``, ``lambda_resnet50ts`` and ``lambda_resnet26rpt_256``
load into ``lambda_jax.create_model`` of the same name.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lambda_jax.convert import state_dict as sd
from lambda_jax.layers.lambda_layer import LambdaLayer
from lambda_jax.models.byoanet import TimmLambdaResNet

# Flax module names of TimmLambdaResNet that are not timm's names with "." for "/".
_TIMM_NAMES = (
    (re.compile(r"stem_conv(\d+)"), r"stem.conv\1"),
    (re.compile(r"stages_(\d+)_(\d+)"), r"stages.\1.\2"),
    (re.compile(r"head_fc"), "head.fc"),
)


def _timm_name(flax_name: str) -> str:
    for pattern, replacement in _TIMM_NAMES:
        if pattern.fullmatch(flax_name):
            return pattern.sub(replacement, flax_name)
    return flax_name


def _lambda_layer(reader: sd.StateDictReader, prefix: str, shapes: Mapping[str, Any]
                  ) -> tuple[dict, dict]:
    """A timm LambdaLayer at ``prefix`` as ``(params, batch_stats)`` of shapes ``shapes``."""
    dim, queries = shapes["query"]["kernel"].shape
    depth_k = shapes["key"]["kernel"].shape[1]
    depth_v = shapes["value"]["kernel"].shape[1]
    qkv = sd.dense_kernel(reader, prefix + "qkv.weight", (dim, queries + depth_k + depth_v),
                          conv=True)
    query, key, value = np.split(qkv, [queries, queries + depth_k], axis=1)
    params: dict[str, Any] = {"query": {"kernel": query}, "key": {"kernel": key},
                              "value": {"kernel": value}}
    stats: dict[str, Any] = {}
    for name, torch_name in (("query_norm", "norm_q"), ("value_norm", "norm_v")):
        if name in shapes:
            params[name], stats[name] = sd.batch_norm(
                reader, f"{prefix}{torch_name}.", shapes[name]["scale"].shape[0])
    if "local_embeddings" in shapes:
        r = shapes["local_embeddings"].shape[0]
        weight = reader.take(prefix + "conv_lambda.weight", (depth_k, 1, r, r, 1))
        params["local_embeddings"] = weight[:, 0, :, :, 0].transpose(1, 2, 0)[..., None]
    if "position_bias" in shapes:
        params["position_bias"] = reader.take(prefix + "conv_lambda.bias", (depth_k,))
    if "relative_embeddings" in shapes:
        table = shapes["relative_embeddings"].shape
        params["relative_embeddings"] = reader.take(prefix + "pos_emb", table[:-1])[..., None]
    return params, stats


def _module(reader: sd.StateDictReader, prefix: str, shapes: Mapping[str, Any],
            stat_shapes: Mapping[str, Any]) -> tuple[dict, dict]:
    """Any module of a TimmLambdaResNet (or the model itself) at ``prefix``."""
    if "query" in shapes:
        return _lambda_layer(reader, prefix, shapes)
    if "kernel" in shapes:
        kernel = shapes["kernel"].shape
        if len(kernel) == 4:
            params = {"kernel": sd.conv_kernel(reader, prefix + "weight", kernel)}
        else:
            params = {"kernel": sd.dense_kernel(reader, prefix + "weight", kernel, conv=False)}
        if "bias" in shapes:
            params["bias"] = reader.take(prefix + "bias", shapes["bias"].shape)
        return params, {}
    if "scale" in shapes:
        return sd.batch_norm(reader, prefix, shapes["scale"].shape[0])
    params, stats = {}, {}
    for name, sub_shapes in shapes.items():
        params[name], sub_stats = _module(reader, f"{prefix}{_timm_name(name)}.", sub_shapes,
                                          stat_shapes.get(name, {}))
        if sub_stats:
            stats[name] = sub_stats
    return params, stats


def _layer_input(state_dict: Mapping[str, Any], layer: LambdaLayer) -> tuple[int, ...]:
    """``[1, height, width, dim]`` of an input that builds the stored variables' shapes."""
    dim = sd.to_numpy(state_dict["qkv.weight"]).shape[1] if "qkv.weight" in state_dict else 1
    if layer.position == "global":
        if "pos_emb" not in state_dict:
            raise sd.StateDictMismatchError(
                "missing key 'pos_emb': a global lambda_jax LambdaLayer needs timm's relative "
                f"table [2H-1, 2W-1, {layer.dim_k}]; a local timm layer (r=...) loads into "
                "LambdaLayer(position='local', position_bias=True)."
            )
        spatial = tuple((size + 1) // 2 for size in sd.to_numpy(state_dict["pos_emb"]).shape[:2])
    else:
        spatial = (2, 2)
    return (1, *spatial, dim)


def from_timm(state_dict: Mapping[str, Any], module: Any) -> dict:
    """Flax variables for ``module`` equal to a timm module's ``state_dict``.

    Args:
      state_dict: torch tensors or NumPy arrays, keyed as timm keys them: a
        ``timm.layers.LambdaLayer``'s own ``state_dict()`` (``qkv.weight``, ...), or the whole
        ``state_dict()`` of ``timm.create_model(name)`` for one of the models above.
      module: a ``lambda_jax.LambdaLayer`` set like the timm layer (module docstring), or
        ``lambda_jax.create_model(name)`` with the timm model's name.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``module.apply``, in its ``param_dtype``.

    Raises:
      StateDictMismatchError: listing every missing or unexpected key and every key whose
        shape differs from what ``module`` needs (both shapes given).
      ValueError: if ``module`` cannot hold a timm module.
    """
    if isinstance(module, LambdaLayer):
        if module.dim_u != 1:
            raise ValueError(f"timm's LambdaLayer has u = 1; the lambda_jax layer has "
                             f"dim_u={module.dim_u}.")
        if (module.position == "local" and "conv_lambda.bias" in state_dict
                and not module.position_bias):
            raise ValueError(
                "timm's local layer adds a bias to its position convolution: build the "
                "lambda_jax layer with LambdaLayer(..., position='local', position_bias=True)."
            )
        inputs = jax.ShapeDtypeStruct(_layer_input(state_dict, module), jnp.float32)
        target = "the lambda_jax LambdaLayer"
    elif isinstance(module, TimmLambdaResNet):
        inputs = jax.ShapeDtypeStruct((1, module.image_size, module.image_size, 3), jnp.float32)
        target = "the lambda_jax TimmLambdaResNet"
    else:
        raise TypeError(f"from_timm converts into a lambda_jax.LambdaLayer or a model from "
                        f"lambda_jax.create_model, got {type(module).__name__}.")
    expected = jax.eval_shape(module.init, jax.random.key(0), inputs)
    reader = sd.StateDictReader(state_dict, target)
    params, stats = _module(reader, "", expected["params"], expected.get("batch_stats", {}))
    reader.finish()
    converted = {"params": params}
    if stats:
        converted["batch_stats"] = stats
    return sd.cast_like(converted, expected)
