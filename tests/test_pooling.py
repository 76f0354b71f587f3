"""The stride-2 average pooling of lambda layers and ResNet blocks, by value."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax import LambdaLayer
from lambda_jax.core import pooling
from lambda_jax.models import LambdaSlot, ResNet

POOLS = tuple(pooling.STRIDE_POOLS)


def _windows(size, window, stride, padding):
    """Input index ranges of each output cell on one axis, from the definitions of the
    paddings (TensorFlow's "SAME": the odd padding cell after the input)."""
    if padding == "same":
        out = -(-size // stride)
        before = max((out - 1) * stride + window - size, 0) // 2
    elif padding == "symmetric":
        before = window // 2
        out = (size + window - 1 - window) // stride + 1
    else:
        before, out = 0, (size - window) // stride + 1
    return [range(max(i * stride - before, 0), min(i * stride - before + window, size))
            for i in range(out)]


def _reference_pool(x, window, stride, padding):
    """Loop reference of ``average_pool`` on ``[batch, height, width, channels]``: the mean of
    the input cells under each window, padding left out."""
    rows = _windows(x.shape[1], window, stride, padding)
    cols = _windows(x.shape[2], window, stride, padding)
    out = np.zeros((x.shape[0], len(rows), len(cols), x.shape[3]))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            out[:, i, j] = x[:, list(r)][:, :, list(c)].mean(axis=(1, 2))
    return out


def _ramp(height=8, width=8, channels=2):
    """``[2, height, width, channels]`` with x[b, i, j, c] = width * i + j + 100 c + 1000 b."""
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    plane = (width * i + j).astype(np.float32)
    return np.stack([np.stack([plane + 100 * c + 1000 * b for c in range(channels)], -1)
                     for b in range(2)])


@pytest.mark.parametrize("size", [8, 7])
def test_stride_pools_match_the_loop_reference(size):
    x = _ramp(size, size)
    for pool, (window, padding) in pooling.STRIDE_POOLS.items():
        out = np.asarray(pooling.stride_pool(jnp.asarray(x), pool))
        np.testing.assert_allclose(out, _reference_pool(x, window, 2, padding), rtol=1e-6,
                                   err_msg=pool)
    # The ResNet-D shortcut's 2x2 "SAME" pool (the odd cell averaged alone).
    shortcut = np.asarray(pooling.average_pool(jnp.asarray(x), 2, 2, "same"))
    np.testing.assert_allclose(shortcut, _reference_pool(x, 2, 2, "same"), rtol=1e-6)


def test_paper_and_symmetric_pools_on_an_8x8_ramp_by_hand():
    x = jnp.asarray(_ramp()[:1, :, :, :1])  # x[i, j] = 8 i + j
    paper = np.asarray(pooling.stride_pool(x, "3x3"))[0, :, :, 0]
    symmetric = np.asarray(pooling.stride_pool(x, "3x3_symmetric"))[0, :, :, 0]
    timm = np.asarray(pooling.stride_pool(x, "2x2"))[0, :, :, 0]
    # "3x3": output (0, 0) averages rows and columns 0-2, (3, 3) rows and columns 6-7.
    assert paper[0, 0] == pytest.approx(8 * 1 + 1) and paper[3, 3] == pytest.approx(58.5)
    # "3x3_symmetric": (0, 0) averages rows and columns 0-1, (1, 1) rows and columns 1-3.
    assert symmetric[0, 0] == pytest.approx(4.5) and symmetric[1, 1] == pytest.approx(18.0)
    assert paper[1, 1] == pytest.approx(27.0)
    assert timm[0, 0] == pytest.approx(4.5) and timm[3, 3] == pytest.approx(58.5)
    # One cell of shift on both axes: 8 + 1 apart inside the image.
    assert np.max(np.abs(paper - symmetric)) == pytest.approx(9.0)


def test_bad_pool_names_are_rejected():
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="pool must be one of \\('3x3', '3x3_symmetric', '2x2'\\)"):
        pooling.stride_pool(x, "3x3_same")
    with pytest.raises(ValueError, match="padding must be one of"):
        pooling.average_pool(x, 3, 2, "reflect")


def _random_variables(module, *inputs):
    """Random variables of ``module`` (batch-norm variances and scales positive), without
    running its initialisers."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(0)
    values = [np.abs(rng.normal(size=leaf.shape)) + 0.5
              if "var" in jax.tree_util.keystr(path) or "scale" in jax.tree_util.keystr(path)
              else rng.normal(size=leaf.shape) for path, leaf in leaves]
    return jax.tree.unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in values])


def test_strided_lambda_layer_pools_its_output_by_value():
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 8, 8, 8)), jnp.float32)
    layer = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3)
    variables = _random_variables(layer, x)
    # One program for the full-resolution output and every pooling.
    full, *strided = jax.jit(lambda v, x: [layer.apply(v, x)] + [
        layer.clone(stride=2, stride_pool=pool).apply(v, x) for pool in POOLS])(variables, x)
    for pool, out in zip(POOLS, strided):
        window, padding = pooling.STRIDE_POOLS[pool]
        np.testing.assert_allclose(out, _reference_pool(np.asarray(full), window, 2, padding),
                                   rtol=1e-5, atol=1e-5, err_msg=pool)


@pytest.fixture(scope="module")
def strided_resnet():
    """A one-block ResNet whose block has a strided lambda slot, and its variables."""
    model = ResNet(num_classes=3, stage_depths=(1,), stage_widths=(2,), stage_strides=(2,),
                   stage_slots=(LambdaSlot(dim_k=2, heads=1, receptive_field=3),),
                   stem="cifar", stem_width=4)
    return model, _random_variables(model, jnp.zeros((2, 8, 8, 3)))


@pytest.mark.parametrize("pool", POOLS)
def test_strided_block_pools_the_slot_output_by_value(strided_resnet, pool):
    model, variables = strided_resnet
    ramp = _ramp()
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        # The lambda layer's output becomes the ramp; record what the block's next batch
        # norm receives.
        if isinstance(context.module, LambdaLayer) and context.method_name == "__call__":
            return jnp.asarray(ramp)
        if context.module.name == "bn2" and context.method_name == "__call__":
            seen["pooled"] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.clone(stride_pool=pool).apply(variables, jnp.zeros((2, 8, 8, 3)))
    window, padding = pooling.STRIDE_POOLS[pool]
    np.testing.assert_allclose(seen["pooled"], _reference_pool(ramp, window, 2, padding),
                               rtol=1e-6)
