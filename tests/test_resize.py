"""Resizing global relative embedding tables to a new input size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax import LambdaLayer, resize_relative_embeddings


class TwoScaleModel(nn.Module):
    """Global lambda layers at full and at half resolution. x: [batch, H, W, C] -> [batch, 3]."""

    @nn.compact
    def __call__(self, x):
        x = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="global")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position="global")(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_resizing_to_the_same_size_changes_nothing():
    model = TwoScaleModel()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 6, 3)))
    resized = resize_relative_embeddings(variables, (8, 6), (8, 6))
    for before, after in zip(jax.tree.leaves(variables), jax.tree.leaves(resized)):
        np.testing.assert_array_equal(before, after)


def test_a_resized_model_runs_at_the_new_size():
    model = TwoScaleModel()
    x_small = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x_small)
    with pytest.raises(ValueError, match="resize_relative_embeddings"):
        model.apply(variables, jnp.zeros((2, 12, 16, 3)))
    resized = resize_relative_embeddings(variables, (8, 8), (12, 16))
    tables = [leaf.shape for path, leaf in jax.tree.flatten_with_path(resized["params"])[0]
              if "relative_embeddings" in jax.tree_util.keystr(path)]
    assert sorted(tables) == [(11, 15, 4, 2), (23, 31, 4, 1)]
    out = model.apply(resized, jax.random.normal(jax.random.key(2), (2, 12, 16, 3)))
    assert out.shape == (2, 3) and np.all(np.isfinite(out))


def test_refining_and_coarsening_by_aligned_offsets_is_exact():
    """From S to 2S-1 every old offset is a new one, so going back recovers the table."""
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="global")
    x = jax.random.normal(jax.random.key(1), (2, 8, 6, 3))
    variables = layer.init(jax.random.key(0), x)
    fine = resize_relative_embeddings(variables, (8, 6), (15, 11))
    assert fine["params"]["relative_embeddings"].shape == (29, 21, 4, 1)
    assert layer.apply(fine, jnp.ones((1, 15, 11, 3))).shape == (1, 15, 11, 8)
    back = resize_relative_embeddings(fine, (15, 11), (8, 6))
    np.testing.assert_allclose(back["params"]["relative_embeddings"],
                               variables["params"]["relative_embeddings"], atol=1e-6)
    np.testing.assert_allclose(layer.apply(back, x), layer.apply(variables, x), atol=1e-5)


def test_a_table_linear_in_the_offset_stays_linear():
    """Linear interpolation reproduces R[o] = a o + b exactly at the rescaled offsets."""
    size, new_size = 5, 9
    offsets = np.arange(-(size - 1), size)
    table = np.stack([2.0 * offsets + 1.0, -offsets + 3.0], axis=-1)[:, :, None]  # [9, 2, 1]
    resized = resize_relative_embeddings({"relative_embeddings": jnp.asarray(table)},
                                         size, new_size)["relative_embeddings"]
    assert resized.shape == (17, 2, 1)
    old_offsets = np.arange(-(new_size - 1), new_size) * (size - 1) / (new_size - 1)
    expected = np.stack([2.0 * old_offsets + 1.0, -old_offsets + 3.0], axis=-1)[:, :, None]
    np.testing.assert_allclose(resized, expected, rtol=1e-6, atol=1e-6)


def test_a_size_that_breaks_a_stride_is_refused():
    model = TwoScaleModel()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="whole number of positions"):
        resize_relative_embeddings(variables, (8, 8), (9, 8))
