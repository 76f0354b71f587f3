"""The LambdaLayer fields that reproduce the PyTorch ports: position_bias, stride, stride_pool."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax import LambdaLayer


def _same_pool_reference(x: np.ndarray) -> np.ndarray:
    """TensorFlow's 3x3 / stride 2 'SAME' average pooling of [batch, h, w, c], pad not counted."""

    def windows(size):
        out = -(-size // 2)
        before = max((out - 1) * 2 + 3 - size, 0) // 2
        return [range(max(2 * i - before, 0), min(2 * i - before + 3, size)) for i in range(out)]

    rows, cols = windows(x.shape[1]), windows(x.shape[2])
    return np.stack([np.stack([x[:, list(r)][:, :, list(c)].mean(axis=(1, 2)) for c in cols],
                              axis=1) for r in rows], axis=1)


def _apply(layer, x, variables=None):
    variables = variables or layer.init(jax.random.key(1), x)
    return layer.apply(variables, x), variables


@pytest.mark.parametrize("height,width", [(6, 6), (5, 7)])
def test_stride_pools_the_output_like_the_paper_or_timm(height, width):
    x = jax.random.normal(jax.random.key(0), (2, height, width, 8))
    full, variables = _apply(LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local",
                                         receptive_field=3), x)
    full = np.asarray(full)
    paper, _ = _apply(LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local",
                                  receptive_field=3, stride=2), x, variables)
    assert paper.shape == (2, -(-height // 2), -(-width // 2), 8)
    np.testing.assert_allclose(paper, _same_pool_reference(full), rtol=1e-5, atol=1e-5)
    timm_like, _ = _apply(LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local",
                                      receptive_field=3, stride=2, stride_pool="2x2"),
                          x, variables)
    h, w = height // 2, width // 2
    blocks = full[:, : 2 * h, : 2 * w].reshape(2, h, 2, w, 2, 8).mean(axis=(2, 4))
    np.testing.assert_allclose(timm_like, blocks, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["local", "global"])
def test_position_bias_adds_the_same_lambda_offset_to_every_position(position):
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 6))
    plain = LambdaLayer(dim_out=8, dim_k=4, heads=2, position=position, receptive_field=3)
    biased = plain.clone(position_bias=True)
    without, variables = _apply(plain, x)
    biased_variables = biased.init(jax.random.key(1), x)
    assert biased_variables["params"]["position_bias"].shape == (4,)
    params = dict(variables["params"], position_bias=jnp.zeros(4))
    zero_bias, _ = _apply(biased, x, dict(variables, params=params))
    np.testing.assert_allclose(zero_bias, without, rtol=1e-6, atol=1e-6)
    params["position_bias"] = jnp.array([1.0, -2.0, 0.5, 3.0])
    shifted, _ = _apply(biased, x, dict(variables, params=params))
    # The bias is added to λ[k, v] for every v, so it shifts y[n, h, v] by Σ_k Q[n, h, k] b[k],
    # the same for every v of a head.
    difference = np.asarray(shifted - without).reshape(2, 5, 4, 2, 4)
    assert np.abs(difference).max() > 0.1
    np.testing.assert_allclose(difference, difference[..., :1].repeat(4, axis=-1), atol=1e-4)


@pytest.mark.parametrize("kwargs,field", [
    (dict(position="none", position_bias=True), "position_bias"),
    (dict(stride=3), "stride"),
    (dict(stride=2, stride_pool="4x4"), "stride_pool"),
])
def test_impossible_compatibility_settings_name_the_field(kwargs, field):
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, **kwargs)
    with pytest.raises(ValueError, match=f"LambdaLayer.{field}"):
        layer.init(jax.random.key(0), jnp.ones((1, 4, 4, 8)))
