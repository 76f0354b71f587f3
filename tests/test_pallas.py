"""The Pallas lambda convolution (interpreted on CPU) equals the one-convolution reference in
value and in all three gradients, and rejects inputs it cannot take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax.core.position.pallas import pallas_position_output
from lambda_jax.core.position import lambda_convolution


def _reference(queries, values, kernel):
    """einsum of the queries with the lambda convolution's position lambdas: [b, H, W, h*v]."""
    batch, height, width, heads, depth_k = queries.shape
    lambdas = lambda_convolution(values, kernel)
    out = jnp.einsum("bnhk,bnkv->bnhv", queries.reshape(batch, -1, heads, depth_k), lambdas)
    return out.reshape(batch, height, width, -1)


@jax.jit
def _values_and_vjps(queries, values, kernel, cotangent):
    """(output, (dq, dV, dE)) of the Pallas kernels and of the reference, in one program."""
    results = []
    for f in (pallas_position_output, _reference):
        out, vjp = jax.vjp(f, queries, values, kernel)
        results.append((out, vjp(cotangent)))
    return results


def _inputs(batch, spatial, heads, depth_k, depth_v, depth_u, r, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    queries = jax.random.normal(keys[0], (batch, *spatial, heads, depth_k)).astype(dtype)
    values = jax.random.normal(keys[1], (batch, *spatial, depth_v, depth_u)).astype(dtype)
    kernel = jax.random.normal(keys[2], (r, r, depth_k, depth_u)).astype(dtype)
    cotangent = jax.random.normal(keys[3], (batch, *spatial, heads * depth_v))
    return queries, values, kernel, cotangent


# (batch, spatial, heads, k, v, u, r, dtype). 6 x 10 is one strip and one tile of rows;
# 9 x 18 two strips (their value windows overlap) and two row tiles; r = 7 on 3 x 5 has a
# scope wider than the image, so most of it reads the zero padding.
CASES = [
    pytest.param(3, (6, 10), 2, 3, 4, 1, 3, jnp.float32, id="r3-u1-b3-6x10-f32"),
    pytest.param(1, (6, 10), 1, 4, 3, 4, 5, jnp.float32, id="r5-u4-b1-6x10-f32"),
    pytest.param(1, (6, 10), 2, 2, 2, 1, 7, jnp.float32, id="r7-u1-b1-6x10-f32"),
    pytest.param(3, (3, 5), 2, 2, 3, 4, 7, jnp.float32, id="r7-u4-b3-3x5-f32"),
    pytest.param(1, (9, 18), 1, 2, 3, 1, 5, jnp.float32, id="r5-u1-b1-9x18-f32"),
    pytest.param(3, (6, 10), 2, 3, 4, 4, 3, jnp.bfloat16, id="r3-u4-b3-6x10-bf16"),
    pytest.param(1, (6, 10), 1, 4, 3, 1, 7, jnp.bfloat16, id="r7-u1-b1-6x10-bf16"),
]


@pytest.mark.parametrize("batch, spatial, heads, depth_k, depth_v, depth_u, r, dtype", CASES)
def test_output_and_gradients_equal_the_convolution(batch, spatial, heads, depth_k, depth_v,
                                                    depth_u, r, dtype):
    queries, values, kernel, cotangent = _inputs(batch, spatial, heads, depth_k, depth_v,
                                                 depth_u, r, dtype)
    (out, grads), (expected, expected_grads) = _values_and_vjps(queries, values, kernel,
                                                                cotangent)
    assert out.shape == (batch, *spatial, heads * depth_v)
    assert out.dtype == jnp.float32
    for name, got, want, inp in zip(("output", "dq", "dV", "dE"), (out, *grads),
                                    (expected, *expected_grads), (out, queries, values, kernel)):
        assert got.shape == want.shape and got.dtype == inp.dtype, name
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        if dtype == jnp.float32:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
        else:
            error = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert error < 2e-2, (name, error)


def test_under_jit_and_grad_of_a_loss():
    queries, values, kernel, _ = _inputs(2, (4, 6), 2, 3, 2, 1, 3, jnp.float32, seed=1)

    def loss(f):
        return lambda q, v, e: jnp.mean(jnp.square(f(q, v, e)))

    argnums = (0, 1, 2)
    grads = jax.jit(jax.grad(loss(pallas_position_output), argnums))(queries, values, kernel)
    expected = jax.jit(jax.grad(loss(_reference), argnums))(queries, values, kernel)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The forward and both backward passes are Pallas kernels; no convolution is left.
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(pallas_position_output), argnums))(
        queries, values, kernel))
    assert jaxpr.count("pallas_call") == 3
    assert "conv_general_dilated" not in jaxpr


@pytest.mark.parametrize("shapes, message", [
    (((1, 4, 4, 2, 3), (1, 4, 4, 2, 1), (4, 4, 3, 1)), "r odd"),
    (((1, 4, 4, 2, 3), (1, 16, 2, 1), (3, 3, 3, 1)), "needs images"),
    (((1, 4, 2, 3), (1, 4, 2, 1), (3, 3, 1)), "needs images"),
    (((1, 4, 4, 2, 3), (1, 4, 4, 2, 2), (3, 3, 3, 1)), "values' u"),
    (((1, 4, 4, 2, 2), (1, 4, 4, 2, 1), (3, 3, 3, 1)), "queries' k"),
])
def test_rejects_what_it_cannot_take(shapes, message):
    queries, values, kernel = (jnp.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=message) as error:
        pallas_position_output(queries, values, kernel)
    assert str(shapes[2]) in str(error.value)  # the message names the shapes
