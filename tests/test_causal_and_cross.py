"""CausalLambdaLayer (masked lambdas, step-by-step decoding), and cross lambdas with a separate
context."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax import CausalLambdaLayer, LambdaLayer
from naive_lambda import naive_lambda_layer
from test_lambda_layer import _build, _randomise, _settings


def _causal(position, **kwargs):
    return CausalLambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position=position,
                             receptive_field=4, **kwargs)


def _causal_settings(layer):
    return dict(dim_out=layer.dim_out, dim_k=layer.dim_k, heads=layer.heads,
                dim_u=layer.dim_u, position=layer.position,
                receptive_field=layer.receptive_field, use_batchnorm=layer.use_layernorm)


@pytest.mark.parametrize("position", ["none", "local"])
def test_causal_matches_naive_reference(position):
    layer = _causal(position)
    x, variables = _build(layer, (2, 9, 5))
    assert "batch_stats" not in variables
    out = layer.apply(variables, x)
    expected = naive_lambda_layer(variables, x, causal=True, **_causal_settings(layer))
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("position", ["none", "local"])
def test_changing_the_future_never_changes_the_past(position):
    layer = _causal(position)
    x, variables = _build(layer, (3, 12, 5))
    apply = jax.jit(lambda x: layer.apply(variables, x))
    out = apply(x)
    for n in (0, 5, 10):
        changed = x.at[:, n + 1:].set(100.0 * jax.random.normal(jax.random.key(n),
                                                                x[:, n + 1:].shape))
        out_changed = apply(changed)
        np.testing.assert_allclose(out_changed[:, :n + 1], out[:, :n + 1], rtol=1e-5,
                                   atol=1e-5)
        assert not np.allclose(out_changed[:, n + 1:], out[:, n + 1:], atol=1e-3)


@pytest.mark.parametrize("position", ["none", "local"])
@pytest.mark.parametrize("use_layernorm", [True, False])
def test_step_by_step_decoding_equals_the_full_call(position, use_layernorm):
    layer = _causal(position, use_layernorm=use_layernorm)
    x, variables = _build(layer, (2, 11, 5))
    full = layer.apply(variables, x)
    state = layer.init_decode_state(2)
    step = jax.jit(lambda state, x_t: layer.apply(variables, x_t, decode_state=state))
    outputs = []
    for t in range(x.shape[1]):
        out_t, state = step(state, x[:, t:t + 1])
        outputs.append(out_t)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_decoding_state_has_constant_size():
    layer = _causal("local")
    x, variables = _build(layer, (1, 6, 5))
    state = layer.init_decode_state(1)
    shapes = jax.tree.map(jnp.shape, state)
    step = jax.jit(lambda state, x_t: layer.apply(variables, x_t, decode_state=state))
    for t in range(6):
        _, state = step(state, x[:, t:t + 1])
        assert jax.tree.map(jnp.shape, state) == shapes
    assert state.recent_values.shape == (1, 3, 4, 2)


@pytest.mark.parametrize("position", ["none", "local"])
def test_causal_layer_is_finite_for_huge_keys(position):
    layer = _causal(position)
    x, variables = _build(layer, (2, 10, 5))
    params = dict(variables["params"])
    params["key"] = {"kernel": params["key"]["kernel"] * 1e4}
    big = {**variables, "params": params}
    keys = np.asarray(x).reshape(-1, 5) @ np.asarray(params["key"]["kernel"])
    assert np.abs(keys).max() > 1e4
    out = layer.apply(big, x)
    assert np.all(np.isfinite(out))
    expected = naive_lambda_layer(big, x, causal=True, **_causal_settings(layer))
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
    grads = jax.grad(lambda p: jnp.sum(layer.apply({**big, "params": p}, x)))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    state = layer.init_decode_state(2)
    step = jax.jit(lambda state, x_t: layer.apply(big, x_t, decode_state=state))
    for t in range(10):
        out_t, state = step(state, x[:, t:t + 1])
        np.testing.assert_allclose(out_t[:, 0], out[:, t], rtol=1e-4, atol=1e-4)


def test_causal_settings_are_checked():
    with pytest.raises(ValueError, match="CausalLambdaLayer.position.*'global'"):
        _causal("global").init(jax.random.key(0), jnp.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="CausalLambdaLayer needs sequences"):
        _causal("local").init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="CausalLambdaLayer.receptive_field"):
        _causal("local", ).clone(receptive_field=0).init(jax.random.key(0), jnp.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match=r"shape \(1, 0, 3\)"):
        _causal("local").init(jax.random.key(0), jnp.zeros((1, 0, 3)))
    layer = _causal("none")
    x, variables = _build(layer, (1, 4, 3))
    with pytest.raises(ValueError, match="one position per step"):
        layer.apply(variables, x, decode_state=layer.init_decode_state(1))
    assert _causal("local", ).clone(receptive_field=4).init(
        jax.random.key(0), jnp.zeros((1, 4, 3)))["params"]["local_embeddings"].shape == (4, 4, 2)


def test_the_paper_layer_has_no_causal_or_decoding_options():
    fields = {field.name for field in dataclasses.fields(LambdaLayer)}
    assert not fields & {"causal", "use_layernorm"}
    assert not hasattr(LambdaLayer, "init_decode_state")
    with pytest.raises(TypeError, match="decode_state"):
        layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="none")
        x, variables = _build(layer, (1, 4, 3))
        layer.apply(variables, x, decode_state=None)


@pytest.mark.parametrize("shape, context_shape", [
    ((2, 5, 6), (2, 9, 3)),
    ((2, 3, 4, 6), (2, 2, 5, 3)),
    ((2, 2, 3, 2, 6), (2, 1, 2, 3, 3)),
], ids=["sequence", "image", "volume"])
def test_cross_lambda_matches_naive_reference(shape, context_shape):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position="none")
    x = jax.random.normal(jax.random.key(0), shape)
    context = jax.random.normal(jax.random.key(1), context_shape)
    variables = _randomise(layer.init(jax.random.key(2), x, context), 3)
    assert variables["params"]["key"]["kernel"].shape == (3, 8)
    for train in (False, True):
        out, _ = layer.apply(variables, x, context, train=train, mutable=["batch_stats"])
        expected = naive_lambda_layer(variables, x, context=context, train=train,
                                      **_settings(layer))
        np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("position", ["global", "local"])
def test_cross_lambda_with_positions_matches_naive_reference(position):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position=position,
                        receptive_field=3)
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 6))
    context = jax.random.normal(jax.random.key(1), (2, 3, 4, 5))
    variables = _randomise(layer.init(jax.random.key(2), x, context), 3)
    expected = naive_lambda_layer(variables, x, context=context, **_settings(layer))
    np.testing.assert_allclose(layer.apply(variables, x, context), expected, rtol=2e-4,
                               atol=2e-4)


def test_cross_lambda_errors_name_both_shapes():
    x = jnp.zeros((2, 4, 4, 6))
    local = LambdaLayer(dim_out=8, position="local", receptive_field=3)
    with pytest.raises(ValueError, match=r"input \(2, 4, 4, 6\), context \(2, 5, 4, 6\)"):
        local.init(jax.random.key(0), x, jnp.zeros((2, 5, 4, 6)))
    content = LambdaLayer(dim_out=8, position="none")
    with pytest.raises(ValueError, match=r"rank: input \(2, 4, 4, 6\), context \(2, 16, 6\)"):
        content.init(jax.random.key(0), x, jnp.zeros((2, 16, 6)))
    with pytest.raises(ValueError, match="batch size"):
        content.init(jax.random.key(0), x, jnp.zeros((3, 4, 4, 6)))
