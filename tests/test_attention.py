"""Relative multi-head self-attention and attention-augmented convolutions against
loop-by-loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax.layers.attention import (
    AttentionAugmentedConv,
    AxialSelfAttention,
    RelativeSelfAttention,
)


def _key(seed):
    # RBG keys: threefry random bits are slow to compile on a CPU.
    return jax.random.key(seed, impl="rbg")


def naive_attention(x, params, heads, window, split=True):
    """Position by position: softmax over the context of q·k + row and column offset logits.

    ``split``: the row embedding meets the first half of the query and the column embedding
    the second (Ramachandran et al.); otherwise both meet the whole query (Bello et al.).
    """
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
                            if split:
                                position = query[:half] @ row + query[half:] @ col
                            else:
                                position = query @ row + query @ col
                            logits.append(query @ k[b, yc, xc, h] + position)
                            values.append(v[b, yc, xc, h])
                    weights = np.exp(np.array(logits) - max(logits))
                    out[b, y, xx, h] = (weights / weights.sum()) @ np.array(values)
    return out.reshape(batch, height, width, -1)


def _larger_embeddings(params):
    # Larger embeddings than at init so that the position logits matter.
    return {**params, "row_embeddings": params["row_embeddings"] * 3,
            "column_embeddings": params["column_embeddings"] * 3}


@pytest.mark.parametrize("window,height,width,position_logits",
                         [(None, 4, 3, "split"), (3, 5, 4, "split"), (5, 3, 4, "split"),
                          (None, 3, 4, "sum"), (3, 4, 3, "sum")])
def test_matches_the_naive_reference(window, height, width, position_logits):
    key_depth = 3 if position_logits == "sum" else None
    layer = RelativeSelfAttention(dim_out=8, heads=2, key_depth=key_depth, window=window,
                                  position_logits=position_logits)
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, height, width, 6)), jnp.float32)
    params = _larger_embeddings(jax.jit(layer.init)(_key(0), x)["params"])
    out = jax.jit(layer.apply)({"params": params}, x)
    assert out.shape == (2, height, width, 8)
    expected = naive_attention(x, params, 2, window, split=position_logits == "split")
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)


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
    augmented = AttentionAugmentedConv(16, key_depth=8, value_depth=4, heads=4, strides=2,
                                       dtype=jnp.bfloat16)
    out = jax.jit(lambda x: augmented.apply(augmented.init(_key(0), x), x))(x)
    assert out.shape == (1, 2, 3, 16)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


def test_bad_settings_and_sizes_raise():
    x = jnp.ones((1, 4, 4, 8))
    with pytest.raises(ValueError, match="multiple of heads"):
        RelativeSelfAttention(10, heads=4).init(_key(0), x)
    with pytest.raises(ValueError, match="window must be a positive odd number"):
        RelativeSelfAttention(8, heads=2, window=4).init(_key(0), x)
    with pytest.raises(ValueError, match="key_depth must be even"):
        RelativeSelfAttention(8, heads=2, key_depth=3).init(_key(0), x)
    with pytest.raises(ValueError, match="position_logits must be one of"):
        RelativeSelfAttention(8, heads=2, position_logits="concat").init(_key(0), x)
    layer = RelativeSelfAttention(8, heads=2, window=None)
    variables = jax.eval_shape(lambda: layer.init(_key(0), x))
    with pytest.raises(ValueError, match="built for inputs with 4 rows/columns"):
        jax.eval_shape(lambda v: layer.apply(v, jnp.ones((1, 6, 4, 8))), variables)


def naive_augmented_conv(x, params, heads, strides):
    """Concat[3x3 convolution (zero padding 1, ``strides``), global attention over the input
    average-pooled 3x3/2 (``strides=2``, padding left out of the means) times W_O]."""
    x = np.asarray(x, np.float64)
    batch, height, width, _ = x.shape
    kernel = np.asarray(params["conv"]["kernel"], np.float64)
    out_h, out_w = -(-height // strides), -(-width // strides)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    conv = np.zeros((batch, out_h, out_w, kernel.shape[-1]))
    pooled = np.zeros((batch, out_h, out_w, x.shape[-1]))
    for y in range(out_h):
        for xx in range(out_w):
            patch = padded[:, y * strides : y * strides + 3, xx * strides : xx * strides + 3]
            conv[:, y, xx] = np.einsum("bijc,ijco->bo", patch, kernel)
            rows = range(max(0, y * strides - 1), min(height, y * strides + 2))
            cols = range(max(0, xx * strides - 1), min(width, xx * strides + 2))
            pooled[:, y, xx] = x[:, rows][:, :, cols].mean(axis=(1, 2))
    context = x if strides == 1 else pooled
    attended = naive_attention(context, params["attention"], heads, None, split=False)
    projected = attended @ np.asarray(params["attention_output"]["kernel"], np.float64)
    return np.concatenate([conv, projected], axis=-1)


@pytest.mark.parametrize("strides,height,width", [(1, 4, 3), (2, 5, 6)])
def test_augmented_conv_matches_the_naive_reference(strides, height, width):
    layer = AttentionAugmentedConv(features=10, key_depth=6, value_depth=4, heads=2,
                                   strides=strides)
    x = jnp.asarray(np.random.RandomState(1).normal(size=(2, height, width, 5)), jnp.float32)
    params = jax.jit(layer.init)(_key(0), x)["params"]
    params = {**params, "attention": _larger_embeddings(params["attention"])}
    out = jax.jit(layer.apply)({"params": params}, x)
    out_h, out_w = -(-height // strides), -(-width // strides)
    assert out.shape == (2, out_h, out_w, 10)
    assert params["conv"]["kernel"].shape == (3, 3, 5, 6)
    assert params["attention"]["row_embeddings"].shape == (2 * out_h - 1, 3)
    assert params["attention_output"]["kernel"].shape == (4, 4)
    np.testing.assert_allclose(out, naive_augmented_conv(x, params, 2, strides),
                               rtol=2e-4, atol=2e-5)


def test_fully_attentional_augmented_conv_has_no_convolution():
    layer = AttentionAugmentedConv(features=4, key_depth=4, value_depth=4, heads=2)
    params = jax.eval_shape(lambda: layer.init(_key(0), jnp.ones((1, 3, 3, 6))))["params"]
    assert set(params) == {"attention", "attention_output"}


@pytest.mark.parametrize("settings,message", [
    (dict(value_depth=6), "AttentionAugmentedConv.value_depth \\(6\\) must be a positive "
                          "multiple of heads \\(4\\)"),
    (dict(key_depth=10), "AttentionAugmentedConv.key_depth \\(10\\) must be a positive "
                         "multiple of heads"),
    (dict(value_depth=16), "AttentionAugmentedConv.value_depth \\(16\\) must be at most "
                           "features"),
    (dict(strides=3), "AttentionAugmentedConv.strides must be 1 or 2"),
    (dict(heads=0), "AttentionAugmentedConv.heads must be positive"),
])
def test_augmented_conv_bad_settings_raise(settings, message):
    layer = AttentionAugmentedConv(**{**dict(features=8, key_depth=8, value_depth=4, heads=4),
                                      **settings})
    with pytest.raises(ValueError, match=message):
        layer.init(_key(0), jnp.ones((1, 4, 4, 8)))


def naive_axial_attention(x, params, heads):
    """Column by column, then row by row: softmax over the line of q·k + q·R[offset]."""
    out = np.asarray(x, np.float64)
    for axis in ("height", "width"):
        wq, wk, wv = (np.asarray(params[f"{axis}_{n}"]["kernel"], np.float64)
                      for n in ("query", "key", "value"))
        table = np.asarray(params[f"{axis}_embeddings"], np.float64)
        lines = out if axis == "height" else out.transpose(0, 2, 1, 3)  # attend along axis 1
        batch, length, others, _ = lines.shape
        depth = wq.shape[1] // heads
        q = (lines @ wq).reshape(batch, length, others, heads, depth) * depth**-0.5
        k = (lines @ wk).reshape(batch, length, others, heads, depth)
        v = (lines @ wv).reshape(batch, length, others, heads, -1)
        result = np.zeros(v.shape)
        for b in range(batch):
            for o in range(others):
                for h in range(heads):
                    for n in range(length):
                        logits = np.array([
                            q[b, n, o, h] @ (k[b, m, o, h] + table[m - n + length - 1])
                            for m in range(length)])
                        weights = np.exp(logits - logits.max())
                        result[b, n, o, h] = (weights / weights.sum()) @ v[b, :, o, h]
        out = result.reshape(batch, length, others, -1)
        if axis == "width":
            out = out.transpose(0, 2, 1, 3)
    return out


@pytest.mark.parametrize("height,width,key_depth", [(4, 3, None), (3, 5, 3)])
def test_axial_attention_matches_the_naive_reference(height, width, key_depth):
    layer = AxialSelfAttention(dim_out=8, heads=2, key_depth=key_depth)
    x = jnp.asarray(np.random.RandomState(1).normal(size=(2, height, width, 6)), jnp.float32)
    params = jax.jit(layer.init)(_key(0), x)["params"]
    params = {name: value * 3 if name.endswith("embeddings") else value
              for name, value in params.items()}  # so that the position logits matter
    assert params["height_embeddings"].shape == (2 * height - 1, key_depth or 4)
    assert params["width_embeddings"].shape == (2 * width - 1, key_depth or 4)
    out = jax.jit(layer.apply)({"params": params}, x)
    assert out.shape == (2, height, width, 8)
    np.testing.assert_allclose(out, naive_axial_attention(x, params, 2), rtol=2e-4, atol=2e-5)


def test_axial_attention_in_bfloat16_and_bad_settings():
    x = jnp.ones((1, 4, 6, 8), jnp.bfloat16)
    layer = AxialSelfAttention(16, heads=4, dtype=jnp.bfloat16)
    variables = jax.jit(layer.init)(_key(0), x)
    out = jax.jit(layer.apply)(variables, x)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="built for inputs with 4 rows/columns.*5"):
        layer.apply(variables, jnp.ones((1, 5, 6, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match="dim_out \\(10\\) must be a positive multiple of heads"):
        AxialSelfAttention(10, heads=4).init(_key(0), x)
