"""lambda_jax.functional against loop references, under jax.vmap and jax.grad, and its errors."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import lambda_jax
from lambda_jax import LambdaLayer
from lambda_jax import functional as F
from lambda_jax.core import position
from naive_lambda import (naive_apply_lambdas, naive_content_lambda, naive_lambda_layer,
                          naive_position_lambdas)
from test_lambda_layer import _build, _settings

TOL = dict(rtol=2e-4, atol=2e-4)


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def test_content_lambda_and_apply_lambdas_match_loops():
    keys, values = 3.0 * _normal(0, (2, 7, 4, 3)), _normal(1, (2, 7, 5, 3))
    content = F.content_lambda(keys, values)
    assert content.shape == (2, 4, 5)
    np.testing.assert_allclose(content, naive_content_lambda(keys, values), **TOL)
    queries = _normal(2, (2, 7, 3, 4))
    for lambdas in (content[:, None], _normal(3, (2, 7, 4, 5))):
        out = F.apply_lambdas(queries, lambdas)
        assert out.shape == (2, 7, 15)
        np.testing.assert_allclose(out, naive_apply_lambdas(queries, lambdas), **TOL)
    with pytest.raises(ValueError, match="1 or n = 7 positions"):
        F.apply_lambdas(queries, _normal(3, (2, 3, 4, 5)))


@pytest.mark.parametrize("spatial", [(6,), (3, 4), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_position_lambdas_match_loops(spatial):
    values = _normal(0, (2, *spatial, 3, 2))
    table = _normal(1, tuple(2 * s - 1 for s in spatial) + (4, 2))
    np.testing.assert_allclose(F.global_position_lambdas(values, table),
                               naive_position_lambdas(values, table, local=False), **TOL)
    kernel = _normal(2, (3,) * len(spatial) + (4, 2))
    expected = naive_position_lambdas(values, kernel, local=True)
    assert F.local_position_lambdas(values, kernel).shape == (2, np.prod(spatial), 4, 3)
    for implementation in position.LAMBDA_IMPLEMENTATIONS:
        if implementation == "banded" and len(spatial) != 2:
            continue
        np.testing.assert_allclose(F.local_position_lambdas(values, kernel, implementation),
                                   expected, **TOL)
    with pytest.raises(ValueError, match="to build position lambdas"):
        F.local_position_lambdas(values, kernel, position.OUTPUT_IMPLEMENTATIONS[0])


@pytest.mark.parametrize("implementation", position.IMPLEMENTATIONS)
def test_local_position_output_by_every_implementation_matches_the_loop(implementation):
    values, kernel = _normal(0, (2, 4, 5, 3, 2)), _normal(1, (3, 3, 4, 2))
    queries = _normal(2, (2, 4, 5, 2, 4))
    lambdas = naive_position_lambdas(values, kernel, local=True)
    expected = naive_apply_lambdas(np.asarray(queries).reshape(2, 20, 2, 4), lambdas)
    out = F.local_position_output(queries, values, kernel, implementation)
    assert out.shape == (2, 4, 5, 6)
    np.testing.assert_allclose(out, expected.reshape(2, 4, 5, 6), **TOL)


@pytest.mark.parametrize("position_mode", ["global", "local", "none"])
def test_lambda_layer_matches_the_loop_reference_and_the_linen_layer(position_mode):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position=position_mode,
                        receptive_field=3)
    x, variables = _build(layer, (3, 4, 5, 6))
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(F.LambdaSettings)}
    call = jax.jit(lambda v, x, train: F.lambda_layer(
        v["params"], x, batch_stats=v["batch_stats"], train=train, **fields),
        static_argnums=2)
    out = call(variables, x, False)
    close = dict(rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(out, jax.jit(layer.apply)(variables, x), **close)
    np.testing.assert_allclose(out, naive_lambda_layer(variables, x, **_settings(layer)), **TOL)
    train_out, stats = call(variables, x, True)
    linen_out, updates = jax.jit(lambda v, x: layer.apply(
        v, x, train=True, mutable=["batch_stats"]))(variables, x)
    np.testing.assert_allclose(train_out, linen_out, **close)
    np.testing.assert_allclose(
        train_out, naive_lambda_layer(variables, x, train=True, **_settings(layer)), **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **close), stats,
                 updates["batch_stats"])
    assert not np.allclose(stats["query_norm"]["mean"],
                           variables["batch_stats"]["query_norm"]["mean"])


def test_lambda_layer_under_vmap_over_parameter_sets_and_inputs():
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3,
                        use_batchnorm=False)
    x = _normal(0, (2, 5, 5, 4))
    ensemble = jax.vmap(layer.init, in_axes=(0, None))(jax.random.split(jax.random.key(1), 3), x)
    apply = jax.vmap(lambda p, x: F.lambda_layer(p, x, dim_out=8, dim_k=4, heads=2,
                                                 position="local", receptive_field=3,
                                                 use_batchnorm=False), in_axes=(0, 0))
    inputs = jnp.stack([x, 2 * x, -x])
    outs = apply(ensemble["params"], inputs)
    assert outs.shape == (3, 2, 5, 5, 8)
    for i in range(3):
        member = jax.tree.map(lambda a: a[i], ensemble)
        np.testing.assert_allclose(outs[i], layer.apply(member, inputs[i]), rtol=1e-5, atol=1e-5)
    # vmap over the examples, each a batch of one: without batch norm, the batched call.
    first = jax.tree.map(lambda a: a[0], ensemble["params"])
    per_example = jax.vmap(lambda x: F.lambda_layer(
        first, x[None], dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3,
        use_batchnorm=False)[0])(inputs[0])
    np.testing.assert_allclose(per_example, outs[0], rtol=1e-5, atol=1e-5)


def test_gradients_equal_the_linen_layers_and_finite_differences():
    layer = LambdaLayer(dim_out=4, dim_k=2, heads=2, dim_u=2, position="global")
    x, variables = _build(layer, (2, 3, 3, 3))
    cotangent = _normal(5, (2, 3, 3, 4))
    settings = dict(dim_out=4, dim_k=2, heads=2, dim_u=2, position="global")

    def functional_loss(params, x):
        out, _ = F.lambda_layer(params, x, batch_stats=variables["batch_stats"], train=True,
                                **settings)
        return jnp.vdot(out, cotangent)

    def linen_loss(params, x):
        out, _ = layer.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.vdot(out, cotangent)

    grads = jax.grad(functional_loss, argnums=(0, 1))(variables["params"], x)
    expected = jax.grad(linen_loss, argnums=(0, 1))(variables["params"], x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads, expected)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
    with jax.enable_x64(True):
        values = jax.random.normal(jax.random.key(0), (1, 3, 4, 2, 2), jnp.float64)
        kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 2), jnp.float64)
        queries = jax.random.normal(jax.random.key(2), (1, 3, 4, 2, 2), jnp.float64)
        keys = jax.random.normal(jax.random.key(3), (1, 12, 2, 2), jnp.float64)
        jax.test_util.check_grads(
            lambda q, v, e: F.local_position_output(q, v, e, "conv"), (queries, values, kernel),
            order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        jax.test_util.check_grads(F.content_lambda, (keys, values.reshape(1, 12, 2, 2)),
                                  order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_functional_is_exported_from_lambda_jax():
    assert lambda_jax.functional is F
    for name in ("content_lambda", "global_position_lambdas", "local_position_lambdas",
                 "local_position_output", "apply_lambdas", "lambda_layer"):
        assert name in F.__all__ and callable(getattr(F, name))


def test_parameters_that_do_not_fit_are_named_with_both_shapes():
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3)
    x, variables = _build(layer, (1, 4, 4, 6))
    settings = dict(dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3)
    with pytest.raises(ValueError, match=r"params\['local_embeddings'\] has shape \(3, 3, 4, 1\); "
                                         r"the layer needs \(5, 5, 4, 1\)"):
        F.lambda_layer(variables["params"], x, batch_stats=variables["batch_stats"],
                       **dict(settings, receptive_field=5))
    with pytest.raises(ValueError, match=r"params\['query'\]\['kernel'\] has shape \(6, 8\)"):
        F.lambda_layer(variables["params"], jnp.ones((1, 4, 4, 5)),
                       batch_stats=variables["batch_stats"], **settings)
    with pytest.raises(ValueError, match="needs batch_stats"):
        F.lambda_layer(variables["params"], x, **settings)
    params = {k: v for k, v in variables["params"].items() if k != "value_norm"}
    with pytest.raises(ValueError, match=r"params\['value_norm'\] is missing"):
        F.lambda_layer(params, x, batch_stats=variables["batch_stats"], **settings)
    with pytest.raises(ValueError, match="LambdaLayer.heads"):
        F.lambda_layer(variables["params"], x, **dict(settings, heads=0))


@pytest.mark.parametrize("shape", [(2, 0, 4, 3), (2, 4, 0, 3), (2, 4, 4, 0), (0, 4, 4, 3),
                                   (2, 0, 3)])
def test_empty_inputs_raise_value_error_naming_the_shape(shape):
    settings = dict(dim_out=8, dim_k=4, heads=2, position="global", use_batchnorm=False)
    params = LambdaLayer(**settings).init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))["params"]
    with pytest.raises(ValueError, match=rf"shape {re.escape(str(shape))} with no elements"):
        F.lambda_layer(params, jnp.ones(shape), **settings)
    with pytest.raises(ValueError, match="LambdaLayer context got an input of shape"):
        F.lambda_layer(params, jnp.ones((2, 4, 4, 3)), context=jnp.ones((2, 4, 4, 0)),
                       **settings)
