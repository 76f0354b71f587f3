"""Plain jnp layers for the benchmarks: the paper's lambda layer and the layers it is compared with.

Every layer maps ``x: [batch, height, width, channels]`` to ``[batch, height, width, dim_out]``
with parameters from its ``init_*`` function, so all are measured the same way.

* ``reference_lambda``: the paper's formulation, written straightforwardly (its Figure 3
  einsums; the local position lambdas as one convolution of the values folded into the
  batch). Its FLOPs (XLA's cost analysis) define the roofline. Batch norm is left out: its
  elementwise work does not change the FLOP count that matters.
* ``relative_self_attention``: multi-head self-attention with relative position logits
  (a ``[2H-1, 2W-1, dim_k]`` table), the same heads, key and value depths as the lambda
  layer; it holds a ``[batch, heads, n, n]`` attention map.
* ``linear_attention``: attention with the elu + 1 feature map (Katharopoulos et al. 2020).
* ``convolution``: a 3x3 convolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lambda_jax import LambdaLayer
from lambda_jax.core import position


def _dense(key, shape, fan_in):
    return jax.random.normal(key, shape) * fan_in**-0.5


def init_reference_lambda(key, channels, dim_out, dim_k, heads, spatial, receptive_field=None):
    """Parameters of ``reference_lambda``; the embeddings are global if ``receptive_field``
    is None, else an r x r kernel."""
    keys = jax.random.split(key, 4)
    v = dim_out // heads
    params = {
        "query": _dense(keys[0], (channels, heads * dim_k), channels * dim_k),
        "key": _dense(keys[1], (channels, dim_k), channels),
        "value": _dense(keys[2], (channels, v), channels),
    }
    if receptive_field is None:
        shape = tuple(2 * s - 1 for s in spatial) + (dim_k,)
    else:
        shape = (receptive_field, receptive_field, dim_k)
    params["embeddings"] = jax.random.normal(keys[3], shape)
    return params


def reference_lambda(params, x, heads, position_mode):
    """The paper's lambda layer, u = 1: ``[b, H, W, c] -> [b, H, W, heads * v]``.

    ``position_mode``: ``"global"``, ``"local"`` or ``"none"`` (content lambda only).
    """
    batch, height, width, _ = x.shape
    n = height * width
    depth_k = params["key"].shape[1]
    queries = (x @ params["query"]).reshape(batch, n, heads, depth_k)
    keys = jax.nn.softmax((x @ params["key"]).reshape(batch, n, depth_k), axis=1)
    values = (x @ params["value"]).reshape(batch, n, -1)
    content = jnp.einsum("bmk,bmv->bkv", keys, values)
    out = jnp.einsum("bnhk,bkv->bnhv", queries, content)
    embeddings = params["embeddings"][..., None]  # u = 1
    if position_mode == "local":
        lambdas = position.lambda_convolution(
            values.reshape(batch, height, width, -1, 1), embeddings)
    elif position_mode == "global":
        table = position.relative_embeddings(embeddings, (height, width))[..., 0]
        lambdas = jnp.einsum("nmk,bmv->bnkv", table, values)
    else:
        return out.reshape(batch, height, width, -1)
    out = out + jnp.einsum("bnhk,bnkv->bnhv", queries, lambdas)
    return out.reshape(batch, height, width, -1)


def init_relative_self_attention(key, channels, dim_out, dim_k, heads, spatial):
    keys = jax.random.split(key, 5)
    return {
        "query": _dense(keys[0], (channels, heads * dim_k), channels * dim_k),
        "key": _dense(keys[1], (channels, heads * dim_k), channels),
        "value": _dense(keys[2], (channels, dim_out), channels),
        "relative": jax.random.normal(keys[3], tuple(2 * s - 1 for s in spatial) + (dim_k,))
        * dim_k**-0.5,
    }


def relative_self_attention(params, x, heads):
    """Softmax(q k^T + q r^T) v over all positions: ``[b, H, W, c] -> [b, H, W, d]``."""
    batch, height, width, _ = x.shape
    n = height * width
    queries = (x @ params["query"]).reshape(batch, n, heads, -1)
    keys = (x @ params["key"]).reshape(batch, n, heads, -1)
    values = (x @ params["value"]).reshape(batch, n, heads, -1)
    relative = position.relative_embeddings(params["relative"][..., None],
                                            (height, width))[..., 0]  # [n, m, dim_k]
    logits = jnp.einsum("bnhk,bmhk->bhnm", queries, keys)
    logits = logits + jnp.einsum("bnhk,nmk->bhnm", queries, relative)
    weights = jax.nn.softmax(logits * queries.shape[-1] ** -0.5, axis=-1)
    out = jnp.einsum("bhnm,bmhv->bnhv", weights, values)
    return out.reshape(batch, height, width, -1)


def init_linear_attention(key, channels, dim_out, dim_k, heads, spatial):
    del spatial
    keys = jax.random.split(key, 3)
    return {
        "query": _dense(keys[0], (channels, heads * dim_k), channels),
        "key": _dense(keys[1], (channels, heads * dim_k), channels),
        "value": _dense(keys[2], (channels, dim_out), channels),
    }


def linear_attention(params, x, heads):
    """phi(q) (phi(k)^T v) / (phi(q) Σ phi(k)), phi = elu + 1: ``[b, H, W, c] -> [b, H, W, d]``."""
    batch, height, width, _ = x.shape
    n = height * width
    queries = jax.nn.elu((x @ params["query"]).reshape(batch, n, heads, -1)) + 1
    keys = jax.nn.elu((x @ params["key"]).reshape(batch, n, heads, -1)) + 1
    values = (x @ params["value"]).reshape(batch, n, heads, -1)
    summary = jnp.einsum("bmhk,bmhv->bhkv", keys, values)
    normaliser = jnp.einsum("bnhk,bhk->bnh", queries, keys.sum(axis=1))
    out = jnp.einsum("bnhk,bhkv->bnhv", queries, summary) / normaliser[..., None]
    return out.reshape(batch, height, width, -1)


def init_convolution(key, channels, dim_out, dim_k, heads, spatial):
    del dim_k, heads, spatial
    return {"kernel": _dense(key, (3, 3, channels, dim_out), 9 * channels)}


def convolution(params, x, heads):
    del heads
    return jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init_lambda_layer(key, x, **settings):
    """``(apply, params)`` of a lambda_jax.LambdaLayer in training mode (batch statistics).

    ``apply(params, x)`` returns ``[b, H, W, dim_out]``; the running statistics it would
    update are dropped, as a training step's loss does not depend on them.
    """
    layer = LambdaLayer(**settings)
    variables = layer.init(key, x)

    def apply(params, x):
        out, _ = layer.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return out

    return apply, variables["params"]
