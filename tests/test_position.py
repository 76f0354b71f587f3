"""Every formulation of the local position term equals the lambda convolution in value and
gradient, and "auto" resolves by backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax import LambdaLayer
from lambda_jax.core import position


def _reference(queries, values, kernel):
    """einsum of the queries with the lambda convolution's position lambdas: [b, *S, h*v]."""
    batch, heads, depth_k = queries.shape[0], queries.shape[-2], queries.shape[-1]
    lambdas = position.lambda_convolution(values, kernel)
    out = jnp.einsum("bnhk,bnkv->bnhv", queries.reshape(batch, -1, heads, depth_k), lambdas,
                     preferred_element_type=lambdas.dtype)
    return out.reshape(*queries.shape[:-2], -1)


@functools.partial(jax.jit, static_argnames="formulation")
def _value_and_vjp(queries, values, kernel, cotangent, formulation=position.local_position_output):
    """Both implementations' outputs and their vector-Jacobian products with cotangent."""
    results = []
    for f in (formulation, _reference):
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
# A 13 x 20 image with r = 5 has 3 blocks of 8 output columns reading 12 input columns; one
# output row's band rows take batch 2 * blocks 3 * v 4 * r 5 * 12 columns * u 2 * 4 bytes, so
# "tiles" runs 7 tiles of 2 rows (the last padded by one) and "rows" one tile per row. The
# default is one tile here.
TILED = {
    "default": position.tiled_position_output,
    "tiles": functools.partial(position.tiled_position_output,
                               tile_bytes=2 * (2 * 3 * 4 * 5 * 12 * 2 * 4)),
    "rows": functools.partial(position.tiled_position_output, tile_bytes=1),
}


def _output_cases():
    for case in CASES:
        yield pytest.param("shift", *case, id=f"shift-{case[0]}-u{case[4]}-r{case[5]}")
    for name, case in (("default", CASES[0]), ("default", CASES[1]),
                       ("tiles", ((13, 20), 2, 3, 4, 2, 5)), ("rows", ((7, 9), 2, 3, 2, 1, 3))):
        yield pytest.param(name, *case, id=f"tiled-{name}-{case[0]}-u{case[4]}-r{case[5]}")


@pytest.mark.parametrize("formulation, spatial, heads, depth_k, depth_v, depth_u, r",
                         list(_output_cases()))
def test_output_formulations_equal_lambda_convolution_in_value_and_gradient(
        formulation, spatial, heads, depth_k, depth_v, depth_u, r):
    f = position.local_position_output if formulation == "shift" else TILED[formulation]
    queries, values, kernel, cotangent = _inputs(spatial, heads, depth_k, depth_v, depth_u, r)
    (out, grads), (expected, expected_grads) = _value_and_vjp(queries, values, kernel, cotangent,
                                                              formulation=f)
    assert out.shape == (2, *spatial, heads * depth_v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    undifferentiated = jax.jit(f)(queries, values, kernel)
    np.testing.assert_allclose(undifferentiated, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("formulation", ["shift", "tiled"])
def test_output_formulations_in_bfloat16_match_float32_reference(formulation):
    f = functools.partial(position.local_position_output, implementation=formulation)
    queries, values, kernel, cotangent = _inputs((6, 5), 2, 4, 8, 2, 3, dtype=jnp.bfloat16)
    (out, grads), _ = _value_and_vjp(queries, values, kernel, cotangent, formulation=f)
    assert out.dtype == jnp.float32
    as32 = [a.astype(jnp.float32) for a in (queries, values, kernel)]
    (_, _), (expected, expected_grads) = _value_and_vjp(*as32, cotangent)
    # "shift": the same bfloat16 inputs, float32 arithmetic in both, only the order of sums
    # differs. "tiled" multiplies in bfloat16 (float32 sums) and rounds each tile's
    # position lambdas to bfloat16 before the queries, as the layer does with "conv".
    tolerance = 1e-4 if formulation == "shift" else 2e-2
    scale = np.abs(np.asarray(expected)).max()
    assert np.abs(np.asarray(out) - np.asarray(expected)).max() < tolerance * scale
    for got, want, arg in zip(grads, expected_grads, (queries, values, kernel)):
        assert got.dtype == jnp.bfloat16 == arg.dtype
        error = np.asarray(got, np.float32) - np.asarray(want)
        assert np.abs(error).max() < 2e-2 * np.abs(np.asarray(want)).max()


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
    for other in (shift, shift.clone(implementation="banded"), shift.clone(implementation="tiled")):
        (_, out), grads = loss(other)
        np.testing.assert_allclose(out, out_conv, rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_conv)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _implementation_used(layer, x, train=False):
    """Which formulation the layer's computation contains, read from its jaxpr."""
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(
        lambda v, x: layer.apply(v, x, train=train, mutable=["batch_stats"]))(variables, x))
    used = {"conv": "conv_general_dilated" in jaxpr, "shift": "custom_vjp" in jaxpr,
            "tiled": "scan" in jaxpr}
    assert sum(used.values()) <= 1
    return next((name for name, found in used.items() if found), "banded")


@pytest.mark.parametrize("backend, receptive_field, rank, dim_u, expected", [
    ("cpu", 3, 2, 1, "tiled"), ("cpu", 23, 2, 1, "tiled"), ("cpu", 7, 2, 4, "tiled"),
    ("gpu", 23, 2, 1, "tiled"), ("tpu", 7, 2, 4, "tiled"),
    ("cpu", 31, 1, 1, "shift"), ("cpu", 5, 3, 1, "shift"), ("cpu", 7, 3, 1, "conv"),
    ("cpu", 31, 1, 8, "conv"), ("gpu", 5, 1, 1, "conv"), ("tpu", 3, 3, 1, "conv"),
])
def test_auto_resolves_by_backend_rank_and_kernel_offsets_times_u(backend, receptive_field,
                                                                   rank, dim_u, expected):
    spatial = (4,) * rank
    assert position.resolve_local_implementation(
        "auto", spatial, receptive_field, dim_u, backend=backend) == expected
    for pinned in ("conv", "shift") + (("banded", "tiled") if rank == 2 else ()):
        assert position.resolve_local_implementation(
            pinned, spatial, receptive_field, dim_u, backend=backend) == pinned


@pytest.mark.parametrize("rank, train, expected", [
    (2, True, "tiled"), (2, False, "shift"), (1, True, "shift"), (1, False, "shift"),
    (3, True, "conv"), (3, False, "conv")])
def test_layer_auto_uses_the_formulation_of_the_default_backend_and_mode(rank, train,
                                                                         expected):
    assert jax.default_backend() == "cpu"
    layer = LambdaLayer(dim_out=4, dim_k=2, heads=2, position="local",
                        receptive_field=7 if rank == 3 else 5)
    x = jnp.zeros((1,) + (3,) * rank + (4,))
    assert _implementation_used(layer, x, train) == expected
    for implementation in ("shift", "conv") + (("banded", "tiled") if rank == 2 else ()):
        assert _implementation_used(layer.clone(implementation=implementation), x) == implementation


@pytest.mark.parametrize("implementation", ["banded", "tiled"])
def test_image_formulations_on_a_sequence_raise_value_error_naming_the_formulation(
        implementation):
    with pytest.raises(ValueError, match=f"implementation='{implementation}' needs images"):
        position.resolve_local_implementation(implementation, (6,), 3, 1)
    values, kernel = jnp.zeros((1, 6, 2, 1)), jnp.zeros((3, 2, 1))
    with pytest.raises(ValueError, match=f"implementation='{implementation}' needs images"):
        if implementation in position.OUTPUT_IMPLEMENTATIONS:
            position.local_position_output(jnp.zeros((1, 6, 2, 2)), values, kernel,
                                           implementation)
        else:
            position.local_position_lambdas(values, kernel, implementation)


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
