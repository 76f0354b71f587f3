"""The shifted-slice position output equals the lambda convolution in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax import LambdaLayer
from lambda_jax.layers import position


def _reference(queries, values, kernel):
    """einsum of the queries with the lambda convolution's position lambdas: [b, *S, h*v]."""
    batch, heads, depth_k = queries.shape[0], queries.shape[-2], queries.shape[-1]
    lambdas = position.lambda_convolution(values, kernel)
    out = jnp.einsum("bnhk,bnkv->bnhv", queries.reshape(batch, -1, heads, depth_k), lambdas,
                     preferred_element_type=lambdas.dtype)
    return out.reshape(*queries.shape[:-2], -1)


@jax.jit
def _value_and_vjp(queries, values, kernel, cotangent):
    """Both implementations' outputs and their vector-Jacobian products with cotangent."""
    results = []
    for f in (position.local_position_output, _reference):
        out, vjp = jax.vjp(f, queries, values, kernel)
        results.append((out, vjp(cotangent.astype(out.dtype))))
    return results


def _inputs(spatial, heads, depth_k, depth_v, depth_u, r, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    s = len(spatial)
    queries = jax.random.normal(keys[0], (2, *spatial, heads, depth_k)).astype(dtype)
    values = jax.random.normal(keys[1], (2, *spatial, depth_v, depth_u)).astype(dtype)
    kernel = jax.random.normal(keys[2], (r,) * s + (depth_k, depth_u)).astype(dtype)
    cotangent = jax.random.normal(keys[3], (2, *spatial, heads * depth_v))
    return queries, values, kernel, cotangent


CASES = [
    ((5, 7), 2, 3, 4, 1, 3),  # non-square image
    ((3, 5), 1, 2, 3, 2, 7),  # u > 1, r wider than the input: offsets outside it skipped
    ((9,), 2, 3, 4, 2, 5),  # sequence
    ((3, 4, 2), 2, 2, 3, 2, 3),  # volume
]


@pytest.mark.parametrize("spatial, heads, depth_k, depth_v, depth_u, r", CASES)
def test_shift_output_equals_lambda_convolution_in_value_and_gradient(
        spatial, heads, depth_k, depth_v, depth_u, r):
    queries, values, kernel, cotangent = _inputs(spatial, heads, depth_k, depth_v, depth_u, r)
    (out, grads), (expected, expected_grads) = _value_and_vjp(queries, values, kernel, cotangent)
    assert out.shape == (2, *spatial, heads * depth_v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    undifferentiated = jax.jit(position.local_position_output)(queries, values, kernel)
    np.testing.assert_allclose(undifferentiated, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_shift_output_bfloat16_matches_float32_reference():
    queries, values, kernel, cotangent = _inputs((6, 5), 2, 4, 8, 2, 3, dtype=jnp.bfloat16)
    (out, grads), _ = _value_and_vjp(queries, values, kernel, cotangent)
    assert out.dtype == jnp.float32
    as32 = [a.astype(jnp.float32) for a in (queries, values, kernel)]
    (_, _), (expected, expected_grads) = _value_and_vjp(*as32, cotangent)
    # Same bfloat16 inputs, float32 arithmetic in both: only the order of sums differs.
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    for got, want, arg in zip(grads, expected_grads, (queries, values, kernel)):
        assert got.dtype == jnp.bfloat16 == arg.dtype
        error = np.asarray(got, np.float32) - np.asarray(want)
        assert np.abs(error).max() < 1e-2 * np.abs(np.asarray(want)).max()


def test_layer_implementations_agree_in_value_and_parameter_gradients():
    shift = LambdaLayer(dim_out=8, dim_k=4, heads=2, dim_u=2, position="local",
                        receptive_field=3, implementation="shift")
    conv = shift.clone(implementation="conv")
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    variables = shift.init(jax.random.key(1), x)

    def loss(layer):
        def f(params, x):
            out, _ = layer.apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(jnp.sin(out)), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
            variables["params"], x)

    (_, out_conv), grads_conv = loss(conv)
    for other in (shift, shift.clone(implementation="banded")):
        (_, out), grads = loss(other)
        np.testing.assert_allclose(out, out_conv, rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_conv)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _implementation_used(layer, x):
    """Which formulation the layer's computation contains, read from its jaxpr."""
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(layer.apply)(variables, x))
    used = {"conv": "conv_general_dilated" in jaxpr, "shift": "custom_vjp" in jaxpr}
    assert sum(used.values()) <= 1
    return next((name for name, found in used.items() if found), "banded")


@pytest.mark.parametrize("receptive_field, rank, dim_u, expected", [
    (13, 2, 1, "shift"), (15, 2, 1, "banded"), (31, 1, 1, "shift"), (7, 3, 1, "conv"),
    (5, 3, 1, "shift"), (5, 2, 4, "shift"), (7, 2, 4, "banded"), (9, 2, 2, "shift"),
    (31, 1, 8, "conv"),
])
def test_auto_implementation_picks_by_kernel_offsets_times_u(receptive_field, rank, dim_u,
                                                             expected):
    layer = LambdaLayer(dim_out=4, dim_k=2, heads=2, dim_u=dim_u, position="local",
                        receptive_field=receptive_field)
    x = jnp.zeros((1,) + (3,) * rank + (4,))
    assert _implementation_used(layer, x) == expected
    for implementation in ("shift", "conv") + (("banded",) if rank == 2 else ()):
        pinned = layer.clone(implementation=implementation)
        assert _implementation_used(pinned, x) == implementation


def test_banded_implementation_on_a_sequence_raises_value_error_naming_the_field():
    layer = LambdaLayer(dim_out=4, dim_k=2, heads=2, position="local", receptive_field=3,
                        implementation="banded")
    with pytest.raises(ValueError, match="LambdaLayer.implementation='banded' needs images"):
        layer.init(jax.random.key(0), jnp.zeros((1, 6, 4)))


@pytest.mark.parametrize("height, width, depth_u, r", [
    (5, 7, 1, 3),  # one band matrix over the whole width
    (4, 40, 2, 5),  # blocks of 8 columns, the last one cut
    (6, 20, 1, 23),  # scope wider than the image
])
def test_banded_lambda_convolution_equals_the_convolution_in_value_and_gradient(
        height, width, depth_u, r):
    keys = jax.random.split(jax.random.key(3), 3)
    values = jax.random.normal(keys[0], (2, height, width, 3, depth_u))
    kernel = jax.random.normal(keys[1], (r, r, 4, depth_u))
    cotangent = jax.random.normal(keys[2], (2, height * width, 4, 3))
    results = []
    for f in (position.banded_lambda_convolution, position.lambda_convolution):
        out, vjp = jax.vjp(jax.jit(f), values, kernel)
        results.append((out, vjp(cotangent)))
    (out, grads), (expected, expected_grads) = results
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_unknown_implementation_raises_value_error_naming_the_field():
    layer = LambdaLayer(dim_out=8, position="local", receptive_field=3, implementation="fft")
    with pytest.raises(ValueError, match="LambdaLayer.implementation"):
        layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)))


@pytest.mark.parametrize("spatial", [(4, 6), (10,)], ids=["image", "sequence"])
def test_chunked_global_lambdas_equal_unchunked_in_value_and_gradient(spatial):
    keys = jax.random.split(jax.random.key(0), 3)
    values = jax.random.normal(keys[0], (2, *spatial, 3, 2))
    table = jax.random.normal(keys[1], tuple(2 * s - 1 for s in spatial) + (4, 2))
    cotangent = jax.random.normal(keys[2], (2, int(np.prod(spatial)), 4, 3))
    n = int(np.prod(spatial))
    row_bytes = n * 4 * 2 * 4

    @jax.jit
    def value_and_grads(values, table):
        results = []
        for chunk_bytes in (n * row_bytes, 2 * row_bytes):  # one chunk; n / 2 chunks
            f = lambda v, t, c=chunk_bytes: position.global_position_lambdas(v, t, c)  # noqa: E731
            out, vjp = jax.vjp(f, values, table)
            results.append((out, vjp(cotangent)))
        return results

    (out, grads), (chunked, chunked_grads) = value_and_grads(values, table)
    np.testing.assert_allclose(chunked, out, rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked_grads, grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
