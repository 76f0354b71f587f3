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


def naive_content_lambda(keys, values):
    """keys [b, m, k, u] logits, values [b, m, v, u] -> [b, k, v], one position at a time."""
    keys, values = np.asarray(keys, np.float64), np.asarray(values, np.float64)
    batch, m, k, u = keys.shape
    out = np.zeros((batch, k, values.shape[2]))
    for b in range(batch):
        weights = np.exp(keys[b] - keys[b].max(axis=0))
        weights /= weights.sum(axis=0)
        for position in range(m):
            for j in range(u):
                out[b] += np.outer(weights[position, :, j], values[b, position, :, j])
    return out


def naive_position_lambdas(values, embeddings, local):
    """values [b, *S, v, u] -> [b, n, k, v] by a loop over (query, context) pairs.

    embeddings: the local kernel [r, ..., r, k, u] (offset o at o + (r-1)//2) when ``local``,
    else the global table [2*S_1-1, ..., k, u] (offset o at o + S - 1).
    """
    values = np.asarray(values, np.float64)
    embeddings = np.asarray(embeddings, np.float64)
    batch, *spatial, depth_v, depth_u = values.shape
    coords = list(itertools.product(*[range(s) for s in spatial]))
    out = np.zeros((batch, len(coords), embeddings.shape[-2], depth_v))
    centre = (embeddings.shape[0] - 1) // 2
    for i, query in enumerate(coords):
        for context in coords:
            offset = [c - q for c, q in zip(context, query)]
            if local and any(abs(o) > centre for o in offset):
                continue
            shift = [centre] * len(spatial) if local else [s - 1 for s in spatial]
            embedding = embeddings[tuple(o + c for o, c in zip(offset, shift))]  # [k, u]
            out[:, i] += np.einsum("ku,bvu->bkv", embedding, values[(slice(None),) + context])
    return out


def naive_apply_lambdas(queries, lambdas):
    """queries [b, n, h, k], lambdas [b, n or 1, k, v] -> [b, n, h*v], one query at a time."""
    queries, lambdas = np.asarray(queries, np.float64), np.asarray(lambdas, np.float64)
    batch, n, heads, _ = queries.shape
    out = np.zeros((batch, n, heads, lambdas.shape[-1]))
    for b in range(batch):
        for i in range(n):
            for head in range(heads):
                out[b, i, head] = queries[b, i, head] @ lambdas[b, i if lambdas.shape[1] > 1 else 0]
    return out.reshape(batch, n, -1)
