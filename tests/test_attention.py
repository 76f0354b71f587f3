"""Relative multi-head self-attention against a loop-by-loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax.layers.attention import RelativeSelfAttention


def _key(seed):
    # RBG keys: threefry random bits are slow to compile on a CPU.
    return jax.random.key(seed, impl="rbg")


def naive_attention(x, params, heads, window):
    """Position by position: softmax over the context of q·k + row and column offset logits."""
    x = np.asarray(x, np.float64)
    batch, height, width, _ = x.shape
    wq, wk, wv = (np.asarray(params[n]["kernel"], np.float64) for n in ("query", "key", "value"))
    rows = np.asarray(params["row_embeddings"], np.float64)
    cols = np.asarray(params["column_embeddings"], np.float64)
    depth = wq.shape[1] // heads
    half = depth // 2
    q = (x @ wq).reshape(batch, height, width, heads, depth) * depth**-0.5
    k = (x @ wk).reshape(batch, height, width, heads, depth)
    v = (x @ wv).reshape(batch, height, width, heads, -1)
    out = np.zeros(v.shape)
    for b in range(batch):
        for y in range(height):
            for xx in range(width):
                for h in range(heads):
                    logits, values = [], []
                    for yc in range(height):
                        for xc in range(width):
                            dy, dx = yc - y, xc - xx
                            if window is None:
                                row, col = rows[dy + height - 1], cols[dx + width - 1]
                            elif max(abs(dy), abs(dx)) <= window // 2:
                                row, col = rows[dy + window // 2], cols[dx + window // 2]
                            else:
                                continue
                            query = q[b, y, xx, h]
                            logits.append(query @ k[b, yc, xc, h] + query[:half] @ row
                                          + query[half:] @ col)
                            values.append(v[b, yc, xc, h])
                    weights = np.exp(np.array(logits) - max(logits))
                    out[b, y, xx, h] = (weights / weights.sum()) @ np.array(values)
    return out.reshape(batch, height, width, -1)


@pytest.mark.parametrize("window,height,width", [(None, 4, 3), (3, 5, 4), (5, 3, 4)])
def test_matches_the_naive_reference(window, height, width):
    layer = RelativeSelfAttention(dim_out=8, heads=2, window=window)
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, height, width, 6)), jnp.float32)
    params = jax.jit(layer.init)(_key(0), x)["params"]
    # Larger embeddings than at init so that the position logits matter.
    params = {**params, "row_embeddings": params["row_embeddings"] * 3,
              "column_embeddings": params["column_embeddings"] * 3}
    out = jax.jit(layer.apply)({"params": params}, x)
    assert out.shape == (2, height, width, 8)
    np.testing.assert_allclose(out, naive_attention(x, params, 2, window), rtol=2e-4, atol=2e-5)


def test_table_shapes_and_bfloat16():
    x = jnp.ones((1, 4, 6, 8), jnp.bfloat16)
    params = jax.eval_shape(lambda: RelativeSelfAttention(16, heads=4).init(_key(0), x))["params"]
    assert params["row_embeddings"].shape == (7, 2) and params["query"]["kernel"].shape == (8, 16)
    global_params = jax.eval_shape(
        lambda: RelativeSelfAttention(16, heads=4, window=None).init(_key(0), x))["params"]
    assert global_params["row_embeddings"].shape == (7, 2)
    assert global_params["column_embeddings"].shape == (11, 2)
    layer = RelativeSelfAttention(16, heads=4, window=3, dtype=jnp.bfloat16)
    out = jax.jit(lambda x: layer.apply(layer.init(_key(0), x), x))(x)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


def test_bad_settings_and_sizes_raise():
    x = jnp.ones((1, 4, 4, 8))
    with pytest.raises(ValueError, match="multiple of heads"):
        RelativeSelfAttention(10, heads=4).init(_key(0), x)
    with pytest.raises(ValueError, match="window must be a positive odd number"):
        RelativeSelfAttention(8, heads=2, window=4).init(_key(0), x)
    with pytest.raises(ValueError, match="key_depth must be even"):
        RelativeSelfAttention(8, heads=2, key_depth=3).init(_key(0), x)
    layer = RelativeSelfAttention(8, heads=2, window=None)
    variables = jax.eval_shape(lambda: layer.init(_key(0), x))
    with pytest.raises(ValueError, match="built for inputs with 4 rows/columns"):
        jax.eval_shape(lambda v: layer.apply(v, jnp.ones((1, 6, 4, 8))), variables)
