"""SAN's patchwise self-attention against a position-by-position reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax.layers.san import PatchwiseSelfAttention


def _key(seed):
    # RBG keys: threefry random bits are slow to compile on a CPU.
    return jax.random.key(seed, impl="rbg")


def _reflect(index, size):
    """Index into a reflection-padded axis (the edge is not repeated)."""
    if index < 0:
        return -index
    if index >= size:
        return 2 * (size - 1) - index
    return index


def naive_patchwise(x, params, stats, kernel_size, share_planes, epsilon=1e-5):
    """``y_i[c] = Σ_j w_i[c mod (C / share), j] β(x_j)[c]``, ``w_i`` an MLP of
    ``[φ(x_i), ψ(x_R(i))]``."""
    x = np.asarray(x, np.float64)
    p = {name: {k: np.asarray(v, np.float64) for k, v in leaf.items()}
         for name, leaf in params.items()}
    s = {name: {k: np.asarray(v, np.float64) for k, v in leaf.items()}
         for name, leaf in stats.items()}

    def dense(name, v):
        return v @ p[name]["kernel"] + p[name].get("bias", 0.0)

    def norm(name, v):
        normalised = (v - s[name]["mean"]) / np.sqrt(s[name]["var"] + epsilon)
        return normalised * p[name]["scale"] + p[name]["bias"]

    batch, height, width, _ = x.shape
    dim_out = p["value"]["kernel"].shape[1]
    weight_channels = dim_out // share_planes
    footprint = kernel_size**2
    pad = kernel_size // 2
    out = np.zeros((batch, height, width, dim_out))
    for b in range(batch):
        for y in range(height):
            for xx in range(width):
                sources = [(_reflect(y + dy - pad, height), _reflect(xx + dx - pad, width))
                           for dy in range(kernel_size) for dx in range(kernel_size)]
                keys = np.stack([dense("relation_key", x[b, i, j]) for i, j in sources])
                values = np.stack([dense("value", x[b, i, j]) for i, j in sources])
                # φ(x_i), then ψ channel by channel over the footprint (SAN's layout).
                relation = np.concatenate([dense("relation_query", x[b, y, xx]),
                                           keys.T.reshape(-1)])
                hidden = np.maximum(norm("relation_norm1", relation), 0.0)
                hidden = np.maximum(norm("relation_norm2", dense("relation_reduce", hidden)), 0)
                weights = dense("relation_weights", hidden).reshape(weight_channels, footprint)
                for c in range(dim_out):
                    out[b, y, xx, c] = weights[c % weight_channels] @ values[:, c]
    return out


def _randomised(tree, rng, positive=False):
    return jax.tree.map(lambda v: jnp.asarray(
        np.abs(rng.normal(size=v.shape)) + 0.5 if positive else rng.normal(size=v.shape),
        v.dtype), tree)


@pytest.mark.parametrize("kernel_size,share_planes,height,width", [(3, 2, 4, 5), (5, 4, 3, 4)])
def test_matches_the_naive_reference(kernel_size, share_planes, height, width):
    layer = PatchwiseSelfAttention(dim_out=8, relation_depth=3, share_planes=share_planes,
                                   kernel_size=kernel_size)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.normal(size=(2, height, width, 6)), jnp.float32)
    variables = jax.jit(layer.init)(_key(0), x)
    # Random parameters and running statistics so that every term of the reference matters.
    params = _randomised(variables["params"], rng)
    stats = {name: {"mean": _randomised(leaf["mean"], rng),
                    "var": _randomised(leaf["var"], rng, positive=True)}
             for name, leaf in variables["batch_stats"].items()}
    out = jax.jit(layer.apply)({"params": params, "batch_stats": stats}, x)
    assert out.shape == (2, height, width, 8)
    assert params["relation_weights"]["kernel"].shape == (
        8 // share_planes, kernel_size**2 * 8 // share_planes)
    assert params["relation_reduce"]["kernel"].shape == (3 * (kernel_size**2 + 1),
                                                        8 // share_planes)
    np.testing.assert_allclose(out, naive_patchwise(x, params, stats, kernel_size, share_planes),
                               rtol=1e-4, atol=1e-4)


def test_training_uses_batch_statistics_and_updates_them():
    layer = PatchwiseSelfAttention(dim_out=8, kernel_size=3)
    x = jnp.asarray(np.random.RandomState(2).normal(size=(4, 5, 5, 32)), jnp.float32)
    variables = jax.jit(layer.init)(_key(0), x)
    # The default relation depth is SAN's rel_planes = input channels // 16.
    assert variables["params"]["relation_query"]["kernel"].shape == (32, 2)
    out, updates = jax.jit(lambda v, x: layer.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    assert out.shape == (4, 5, 5, 8) and bool(jnp.all(jnp.isfinite(out)))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), updates["batch_stats"],
                         variables["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0
    assert not np.allclose(out, jax.jit(layer.apply)(variables, x))


@pytest.mark.parametrize("settings,shape,message", [
    (dict(dim_out=12, share_planes=8), (1, 5, 5, 16),
     "PatchwiseSelfAttention.dim_out \\(12\\) must be divisible by share_planes \\(8\\)"),
    (dict(dim_out=8, kernel_size=4), (1, 5, 5, 16),
     "PatchwiseSelfAttention.kernel_size must be a positive odd number"),
    (dict(dim_out=8, kernel_size=7), (1, 3, 5, 16),
     "PatchwiseSelfAttention.kernel_size \\(7\\) is too large for an input of 3x5"),
    (dict(dim_out=8), (1, 5, 5, 8), "PatchwiseSelfAttention.relation_depth must be positive"),
])
def test_bad_settings_raise(settings, shape, message):
    with pytest.raises(ValueError, match=message):
        PatchwiseSelfAttention(**settings).init(_key(0), jnp.ones(shape))


def test_bfloat16_compute_keeps_float32_params():
    layer = PatchwiseSelfAttention(dim_out=8, relation_depth=2, kernel_size=3,
                                   dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.RandomState(3).normal(size=(2, 4, 4, 8)), jnp.bfloat16)
    out, variables = jax.jit(lambda x: layer.init_with_output(_key(0), x))(x)
    assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
