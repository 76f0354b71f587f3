"""An independent NumPy reference of the lambda layer, with explicit per-position loops.

Written from the paper's equations only; it reads the layer's variables by name.
"""

import itertools
import math

import numpy as np


def _batch_norm(x, norm_params, norm_stats, eps, train):
    """x: [batch, n, channels] -> normalised over batch and positions."""
    if train:
        mean = x.mean(axis=(0, 1))
        var = x.var(axis=(0, 1))
    else:
        mean = np.asarray(norm_stats["mean"], np.float64)
        var = np.asarray(norm_stats["var"], np.float64)
    scale = np.asarray(norm_params["scale"], np.float64)
    bias = np.asarray(norm_params["bias"], np.float64)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _layer_norm(x, norm_params, eps):
    """x: [batch, n, channels] -> normalised over the channels of each position."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    scale = np.asarray(norm_params["scale"], np.float64)
    bias = np.asarray(norm_params["bias"], np.float64)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def naive_lambda_layer(variables, x, *, dim_out, dim_k, heads, dim_u, position,
                       receptive_field=None, use_batchnorm=True, eps=1e-5, train=False,
                       context=None, causal=False):
    """x: [batch, *spatial, channels] -> [batch, *spatial, dim_out] (float64).

    context: [batch, *context_spatial, context_channels] for keys and values (default x).
    causal: query i sees context positions m <= i only (sequences).
    """
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    x = np.asarray(x, np.float64)
    context = x if context is None else np.asarray(context, np.float64)
    batch, *spatial, channels = x.shape
    context_spatial = context.shape[1:-1]
    n = math.prod(spatial)
    n_context = math.prod(context_spatial)
    h, k, u, v = heads, dim_k, dim_u, dim_out // heads
    flat = x.reshape(batch, n, channels)
    flat_context = context.reshape(batch, n_context, context.shape[-1])

    q = flat @ np.asarray(params["query"]["kernel"], np.float64)
    keys = flat_context @ np.asarray(params["key"]["kernel"], np.float64)
    vals = flat_context @ np.asarray(params["value"]["kernel"], np.float64)
    if use_batchnorm and causal:
        q = _layer_norm(q, params["query_norm"], eps)
        vals = _layer_norm(vals, params["value_norm"], eps)
    elif use_batchnorm:
        q = _batch_norm(q, params["query_norm"], stats.get("query_norm"), eps, train)
        vals = _batch_norm(vals, params["value_norm"], stats.get("value_norm"), eps, train)
    q = q.reshape(batch, n, h, k)
    keys = keys.reshape(batch, n_context, u, k)
    vals = vals.reshape(batch, n_context, u, v)

    coords = list(itertools.product(*[range(s) for s in spatial]))
    context_coords = list(itertools.product(*[range(s) for s in context_spatial]))
    if position == "global":
        table = np.asarray(params["relative_embeddings"], np.float64)
    if position == "local":
        kernel = np.asarray(params["local_embeddings"], np.float64)
        centre = (receptive_field - 1) // 2

    out = np.zeros((batch, n, h, v))
    for b in range(batch):
        for i in range(n):
            visible = range(i + 1) if causal else range(n_context)
            logits = np.stack([keys[b, m] for m in visible])
            softmaxed = np.exp(logits - logits.max(axis=0))
            softmaxed /= softmaxed.sum(axis=0)
            lam = np.zeros((k, v))
            for m in visible:
                for j in range(u):
                    lam += np.outer(softmaxed[m, j], vals[b, m, j])
            for m in visible:
                offset = [cm - ci for cm, ci in zip(context_coords[m], coords[i])]
                if position == "global":
                    emb = table[tuple(o + s - 1 for o, s in zip(offset, spatial))]
                elif position == "local" and causal:
                    if offset[0] < 1 - receptive_field:
                        continue
                    emb = kernel[offset[0] + receptive_field - 1]
                elif position == "local":
                    if any(abs(o) > centre for o in offset):
                        continue
                    emb = kernel[tuple(o + centre for o in offset)]
                else:
                    continue
                for j in range(u):
                    lam += np.outer(emb[:, j], vals[b, m, j])
            for head in range(h):
                out[b, i, head] = q[b, i, head] @ lam
    return out.reshape(batch, *spatial, h * v)
