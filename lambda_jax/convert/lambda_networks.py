"""Weights of lucidrains' ``lambda_networks.LambdaLayer`` (PyPI ``lambda-networks``) in lambda_jax.

A PyTorch layer ``lambda_networks.LambdaLayer(dim, dim_k=K, heads=H, dim_out=D, dim_u=U,
r=R)`` (local) or ``(..., n=N)`` (global, N x N inputs) computes what
``lambda_jax.LambdaLayer(dim_out=D, dim_k=K, heads=H, dim_u=U, position="local",
receptive_field=R, position_bias=True)`` or ``(..., position="global")`` computes with the
variables :func:`from_lambda_networks` returns. Its channel layouts are the paper's and
ours: queries ``(h k)``, keys ``(u k)``, values ``(u v)``, output ``(h v)``; the lambda
convolution is a ``Conv3d(u, k, (1, r, r))`` over ``[u, v, H, W]`` with a bias, which
lambda_jax holds in ``position_bias``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lambda_jax.convert import state_dict as sd
from lambda_jax.layers.lambda_layer import LambdaLayer


def _input_shape(reader: sd.StateDictReader, layer: LambdaLayer) -> tuple[int, ...]:
    """``[1, height, width, dim]`` of an input that builds variables of the stored shapes."""
    weight = reader.shape("to_q.weight") or reader.shape("to_k.weight") or (0, 1)
    table = reader.shape("rel_pos_emb")
    if layer.position == "global" and table is not None:
        spatial = tuple((size + 1) // 2 for size in table[:2])
    else:
        spatial = (2, 2)
    return (1, *spatial, weight[1])


def from_lambda_networks(state_dict: Mapping[str, Any], layer: LambdaLayer) -> dict:
    """Flax variables for ``layer`` equal to a ``lambda_networks.LambdaLayer``'s ``state_dict``.

    Args:
      state_dict: the PyTorch layer's own ``state_dict()`` (keys ``to_q.weight``, ...;
        strip the prefix of a layer inside a bigger model); torch tensors or NumPy arrays.
      layer: a ``lambda_jax.LambdaLayer`` set like the PyTorch layer (see the module
        docstring): ``position_bias=True`` for a local one.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``layer.apply``, in ``layer.param_dtype``.

    Raises:
      StateDictMismatchError: listing every missing or unexpected key and every key whose
        shape differs from what ``layer`` needs (both shapes given).
      ValueError: if ``layer`` cannot hold such a layer at all.
    """
    if not isinstance(layer, LambdaLayer):
        raise TypeError(f"from_lambda_networks converts into a lambda_jax.LambdaLayer, got "
                        f"{type(layer).__name__}.")
    if layer.position == "local" and "pos_conv.bias" in state_dict and not layer.position_bias:
        raise ValueError(
            "lambda-networks' local layer adds a bias to its position convolution: build the "
            "lambda_jax layer with LambdaLayer(..., position='local', position_bias=True)."
        )
    if layer.position == "global" and "rel_pos_emb" not in state_dict:
        raise sd.StateDictMismatchError(
            "missing key 'rel_pos_emb': a global lambda_jax LambdaLayer needs the relative "
            f"table [2n-1, 2n-1, {layer.dim_k}, {layer.dim_u}]; a local PyTorch layer (r=...) "
            "loads into LambdaLayer(position='local', position_bias=True)."
        )
    reader = sd.StateDictReader(state_dict, "the lambda_jax LambdaLayer")
    expected = jax.eval_shape(
        layer.init, jax.random.key(0), jax.ShapeDtypeStruct(_input_shape(reader, layer),
                                                            jnp.float32))
    expected_params = expected["params"]
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for name, key in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
        params[name] = {"kernel": sd.dense_kernel(
            reader, f"{key}.weight", expected_params[name]["kernel"].shape, conv=True)}
    for name, key in (("query_norm", "norm_q"), ("value_norm", "norm_v")):
        if name in expected_params:
            params[name], stats[name] = sd.batch_norm(
                reader, f"{key}.", expected_params[name]["scale"].shape[0])
    if "local_embeddings" in expected_params:
        r, _, depth_k, depth_u = expected_params["local_embeddings"].shape
        weight = reader.take("pos_conv.weight", (depth_k, depth_u, 1, r, r))
        params["local_embeddings"] = weight[:, :, 0].transpose(2, 3, 0, 1)
    if "position_bias" in expected_params:
        params["position_bias"] = reader.take("pos_conv.bias", expected_params["position_bias"].shape)
    if "relative_embeddings" in expected_params:
        params["relative_embeddings"] = reader.take(
            "rel_pos_emb", expected_params["relative_embeddings"].shape)
    reader.finish()
    converted = {"params": params}
    if stats:
        converted["batch_stats"] = stats
    return sd.cast_like(converted, expected)
