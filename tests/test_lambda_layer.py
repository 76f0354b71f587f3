"""Tests of lambda_jax.LambdaLayer against an independent reference and its invariants."""

import functools

import flax
import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax import LambdaLayer
from naive_lambda import naive_lambda_layer


def _randomise(variables, seed):
    """Random values for every variable, batch-norm statistics included (var > 0)."""
    leaves, treedef = jax.tree.flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        value = rng.normal(size=leaf.shape)
        if "var" in name or "scale" in name:
            value = 0.5 + np.abs(value)
        new.append(jnp.asarray(value, leaf.dtype))
    return jax.tree.unflatten(treedef, new)


def _build(layer, shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    variables = layer.init(jax.random.key(seed + 1), x)
    return x, _randomise(variables, seed + 2)


def _settings(layer):
    return dict(dim_out=layer.dim_out, dim_k=layer.dim_k, heads=layer.heads,
                dim_u=layer.dim_u, position=layer.position,
                receptive_field=layer.receptive_field, use_batchnorm=layer.use_batchnorm)


@pytest.mark.parametrize("position", ["global", "local", "none"])
@pytest.mark.parametrize("dim_u", [1, 4])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 7, 6)], ids=["image_4x5", "sequence_7"])
def test_matches_naive_reference(position, dim_u, heads, shape):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=heads, dim_u=dim_u, position=position,
                        receptive_field=3)
    x, variables = _build(layer, shape)
    expected = naive_lambda_layer(variables, x, **_settings(layer))
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("position", ["global", "local", "none"])
def test_volume_matches_naive_reference(position):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position=position,
                        receptive_field=3)
    x, variables = _build(layer, (2, 3, 4, 2, 5))
    expected = naive_lambda_layer(variables, x, **_settings(layer))
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("position", ["global", "local", "none"])
def test_train_mode_matches_naive_reference_and_updates_statistics(position):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position=position,
                        receptive_field=5)
    x, variables = _build(layer, (3, 5, 4, 6))
    out, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    expected = naive_lambda_layer(variables, x, train=True, **_settings(layer))
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
    old = variables["batch_stats"]["value_norm"]["mean"]
    new = updates["batch_stats"]["value_norm"]["mean"]
    values = np.asarray(x).reshape(-1, 6) @ np.asarray(variables["params"]["value"]["kernel"])
    np.testing.assert_allclose(new, 0.9 * old + 0.1 * values.mean(axis=0), rtol=1e-4, atol=1e-5)


def test_without_batchnorm_matches_reference_and_has_no_statistics():
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3,
                        use_batchnorm=False)
    x, variables = _build(layer, (2, 4, 4, 3))
    assert "batch_stats" not in variables
    expected = naive_lambda_layer(variables, x, **_settings(layer))
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=2e-4, atol=2e-4)


def test_train_and_eval_batch_norm_differ_as_expected():
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="none")
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 6, 6, 5))
    variables = layer.init(jax.random.key(1), x)
    eval_out = layer.apply(variables, x)
    train_out, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(eval_out, train_out, atol=1e-3)
    # In train mode the normalised queries have zero mean, so does not depend on a shift
    # of the running statistics; in eval mode the stored statistics are used.
    shifted = jax.tree.map(lambda a: a + 1.0, variables["batch_stats"])
    moved = {**variables, "batch_stats": shifted}
    np.testing.assert_allclose(
        layer.apply(moved, x, train=True, mutable=["batch_stats"])[0], train_out, atol=1e-5)
    assert not np.allclose(layer.apply(moved, x), eval_out, atol=1e-3)
    assert not np.allclose(updates["batch_stats"]["query_norm"]["mean"],
                           variables["batch_stats"]["query_norm"]["mean"])


def test_content_only_layer_is_permutation_equivariant():
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position="none")
    x, variables = _build(layer, (2, 12, 6))
    perm = np.random.default_rng(0).permutation(12)
    np.testing.assert_allclose(layer.apply(variables, x[:, perm]),
                               layer.apply(variables, x)[:, perm], rtol=1e-5, atol=1e-5)
    image = x.reshape(2, 3, 4, 6)
    out = layer.apply(variables, image).reshape(2, 12, 8)
    permuted = layer.apply(variables, x[:, perm].reshape(2, 3, 4, 6)).reshape(2, 12, 8)
    np.testing.assert_allclose(permuted, out[:, perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (2, 9, 5)], ids=["image", "sequence"])
def test_local_with_full_scope_equals_global(shape):
    spatial = shape[1:-1]
    global_layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=3, position="global")
    x, variables = _build(global_layer, shape)
    longest = max(spatial)
    r = 2 * longest - 1
    table = variables["params"]["relative_embeddings"]
    # Embed the table in the centre of an r x r kernel; the offsets it does not hold
    # never occur for this input, so their values must not matter.
    kernel = np.random.default_rng(3).normal(size=(r,) * len(spatial) + table.shape[-2:])
    centre = tuple(slice(longest - s, longest + s - 1) for s in spatial)
    kernel[centre] = table
    params = dict(variables["params"])
    del params["relative_embeddings"]
    params["local_embeddings"] = jnp.asarray(kernel, jnp.float32)
    local_layer = global_layer.clone(position="local", receptive_field=r)
    local_vars = {**variables, "params": params}
    np.testing.assert_allclose(local_layer.apply(local_vars, x), global_layer.apply(variables, x),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("position", ["global", "local", "none"])
def test_gradients_are_finite_and_nonzero(position):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position=position,
                        receptive_field=3)
    x, variables = _build(layer, (2, 5, 3, 4))

    def loss(params, x):
        out, _ = layer.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.mean(out**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    for path, g in jax.tree.flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.any(g != 0), jax.tree_util.keystr(path)


def test_gradient_matches_finite_differences():
    layer = LambdaLayer(dim_out=4, dim_k=2, heads=2, dim_u=2, position="local",
                        receptive_field=3, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 3, 4, 3), jnp.float64)
        variables = layer.init(jax.random.key(1), x)

        @jax.jit
        def loss(x):
            return jnp.sum(jnp.sin(layer.apply(variables, x)))

        jax.test_util.check_grads(loss, (x,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("position", ["global", "local", "none"])
def test_bfloat16_compute_is_close_to_float32_and_finite_for_large_inputs(position):
    layer32 = LambdaLayer(dim_out=16, dim_k=8, heads=4, position=position, receptive_field=5)
    layer16 = layer32.clone(dtype=jnp.bfloat16)
    x = 1e3 * jax.random.normal(jax.random.key(0), (2, 16, 16, 8))
    variables = layer32.init(jax.random.key(1), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    for train in (True, False):
        out32, _ = layer32.apply(variables, x, train=train, mutable=["batch_stats"])
        out16, _ = layer16.apply(variables, x, train=train, mutable=["batch_stats"])
        assert out16.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(out16, np.float32)))
        error = np.asarray(out16, np.float32) - np.asarray(out32)
        assert np.linalg.norm(error) < 2e-2 * np.linalg.norm(out32)
        assert np.abs(error).max() < 2e-2 * np.abs(out32).max()


def test_jit_vmap_over_parameter_sets():
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
    keys = jax.random.split(jax.random.key(1), 3)
    ensemble = jax.vmap(layer.init, in_axes=(0, None))(keys, x)
    outs = jax.jit(jax.vmap(layer.apply, in_axes=(0, None)))(ensemble, x)
    assert outs.shape == (3, 2, 5, 5, 8)
    for i in range(3):
        member = jax.tree.map(lambda a: a[i], ensemble)
        np.testing.assert_allclose(outs[i], layer.apply(member, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["global", "local"])
def test_pmap_with_cross_device_batch_norm_equals_one_device(position):
    devices = jax.local_devices()
    assert len(devices) == 8, "conftest.py simulates 8 CPU devices"
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position=position, receptive_field=3)
    synced = layer.clone(axis_name="batch")
    x = jax.random.normal(jax.random.key(0), (16, 4, 6, 3))
    variables = layer.init(jax.random.key(1), x)

    expected, expected_stats = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    step = jax.pmap(functools.partial(synced.apply, train=True, mutable=["batch_stats"]),
                    axis_name="batch", in_axes=(None, 0))
    out, stats = step(variables, x.reshape(8, 2, 4, 6, 3))
    np.testing.assert_allclose(out.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(expected_stats)):
        for replica in got:
            np.testing.assert_allclose(replica, want, rtol=1e-5, atol=1e-6)
    eval_out = jax.pmap(synced.apply, axis_name="batch", in_axes=(None, 0))(
        variables, x.reshape(8, 2, 4, 6, 3))
    np.testing.assert_allclose(eval_out.reshape(expected.shape), layer.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


def test_global_layer_rejects_another_input_size():
    layer = LambdaLayer(dim_out=8, position="global")
    variables = layer.init(jax.random.key(0), jnp.zeros((1, 6, 8, 4)))
    assert variables["params"]["relative_embeddings"].shape == (11, 15, 16, 1)
    with pytest.raises(ValueError, match=r"built for inputs of spatial size \(6, 8\).*\(8, 8\)"):
        layer.apply(variables, jnp.zeros((1, 8, 8, 4)))


def test_local_and_content_layers_accept_any_size():
    for position in ("local", "none"):
        layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position=position, receptive_field=3)
        variables = layer.init(jax.random.key(0), jnp.zeros((1, 6, 8, 4)))
        assert layer.apply(variables, jnp.ones((3, 9, 5, 4))).shape == (3, 9, 5, 8)


@pytest.mark.parametrize("position,shape", [("global", (2, 4, 5, 6)), ("local", (2, 4, 5, 6)),
                                            ("local", (2, 7, 6))])
def test_given_embeddings_replace_the_layers_own(position, shape):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position=position,
                        receptive_field=3)
    x, variables = _build(layer, shape)
    name = "relative_embeddings" if position == "global" else "local_embeddings"
    own = variables["params"][name]
    assert own.shape == layer.position_embedding_shape(shape[1:-1])
    without = {**variables, "params": {k: v for k, v in variables["params"].items() if k != name}}
    given = jax.jit(lambda v, x, e: layer.apply(v, x, embeddings=e))(without, x, own)
    np.testing.assert_allclose(given, jax.jit(layer.apply)(variables, x), rtol=1e-5, atol=1e-4)
    assert name not in layer.init(jax.random.key(0), x, embeddings=own)["params"]
    gradient = jax.grad(lambda e: layer.apply(without, x, embeddings=e).sum())(own)
    own_gradient = jax.grad(lambda p: layer.apply({**variables, "params": p}, x).sum())(
        variables["params"])[name]
    np.testing.assert_allclose(gradient, own_gradient, rtol=1e-5, atol=1e-5)


def test_embeddings_of_the_wrong_shape_or_mode_raise():
    x = jnp.zeros((1, 4, 5, 6))
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3)
    with pytest.raises(ValueError,
                       match=r"needs embeddings of shape \(3, 3, 4, 1\).*\(5, 5, 4, 1\)"):
        layer.init(jax.random.key(0), x, embeddings=jnp.zeros((5, 5, 4, 1)))
    with pytest.raises(ValueError, match="position='none' takes no embeddings"):
        layer.clone(position="none").init(jax.random.key(0), x, embeddings=jnp.zeros((3, 3, 4, 1)))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dim_out=10, heads=4), "dim_out"),
        (dict(dim_out=8, position="local", receptive_field=4), "receptive_field"),
        (dict(dim_out=8, position="local", receptive_field=0), "receptive_field"),
        (dict(dim_out=8, position="local", receptive_field=-3), "receptive_field"),
        (dict(dim_out=8, position="axial"), "position"),
        (dict(dim_out=8, dim_k=0), "dim_k"),
        (dict(dim_out=8, dim_u=0), "dim_u"),
    ],
)
def test_impossible_settings_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LambdaLayer.{field}"):
        LambdaLayer(**kwargs).init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)))


@pytest.mark.parametrize("shape", [(4, 4), (1, 2, 3, 4, 5, 6)])
def test_wrong_input_rank_raises(shape):
    with pytest.raises(ValueError, match="rank"):
        LambdaLayer(dim_out=8).init(jax.random.key(0), jnp.zeros(shape))


def test_works_inside_a_users_flax_model():
    class Classifier(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x, train=False):
            x = flax.linen.Conv(16, (3, 3))(x)
            x = LambdaLayer(dim_out=16, dim_k=8, heads=4, position="local",
                            receptive_field=5)(x, train=train)
            return flax.linen.Dense(3)(x.mean(axis=(1, 2)))

    model = Classifier()
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    labels = jnp.array([0, 1, 2, 0])
    variables = model.init(jax.random.key(1), x)

    def loss(params, stats):
        logits, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
        onehot = jax.nn.one_hot(labels, 3)
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), updates

    params, stats = variables["params"], variables["batch_stats"]
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    first = None
    for _ in range(30):
        (value, updates), grads = step(params, stats)
        first = value if first is None else first
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        stats = updates["batch_stats"]
    assert value < 0.5 * first


@pytest.mark.parametrize("position", ["global", "local"])
@pytest.mark.parametrize("shape", [(2, 0, 0, 4), (2, 4, 4, 0), (0, 4, 4, 4)],
                         ids=["0x0_image", "0_channels", "batch_0"])
def test_empty_inputs_raise_value_error_naming_the_shape(position, shape):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position=position, receptive_field=3)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 4, 4, 4)))
    pattern = r"shape \(" + ", ".join(map(str, shape)) + r"\) with no elements"
    with pytest.raises(ValueError, match=pattern):
        layer.init(jax.random.key(0), jnp.ones(shape))
    with pytest.raises(ValueError, match=pattern):
        layer.apply(variables, jnp.ones(shape), train=True, mutable=["batch_stats"])
