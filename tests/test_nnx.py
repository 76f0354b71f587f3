"""lambda_jax.nnx: the NNX lambda layer equals the linen one; bridged models; the example."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lambda_jax
import lambda_jax.nnx as lnnx
from test_lambda_layer import _build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import nnx_training  # noqa: E402

CASES = {
    "global": dict(dim_out=8, dim_k=4, heads=2, dim_u=2, position="global"),
    "local_timm": dict(dim_out=8, dim_k=4, heads=2, position="local", receptive_field=3,
                       position_bias=True, stride=2, stride_pool="2x2"),
    "sequence_none": dict(dim_out=8, dim_k=4, heads=2, dim_u=2, position="none"),
}
SHAPES = {"global": (4, 4, 5, 6), "local_timm": (4, 5, 4, 6), "sequence_none": (4, 7, 6)}


@pytest.mark.parametrize("case", CASES)
def test_from_linen_equals_the_linen_layer_in_train_and_eval_mode(case):
    linen_layer = lambda_jax.LambdaLayer(**CASES[case])
    x, variables = _build(linen_layer, SHAPES[case])
    layer = lnnx.LambdaLayer.from_linen(linen_layer, variables)
    assert layer.use_running_average is False  # NNX modules start in training mode

    layer.eval()
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x),
                               jax.jit(linen_layer.apply)(variables, x), rtol=2e-5, atol=1e-4)
    jax.tree.map(np.testing.assert_array_equal, layer.linen_variables(), variables)

    layer.train()
    out = nnx.jit(lambda m, x: m(x))(layer, x)
    expected, updates = jax.jit(lambda v, x: linen_layer.apply(
        v, x, train=True, mutable=["batch_stats"]))(variables, x)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=1e-4)
    stats = layer.linen_variables()["batch_stats"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stats, updates["batch_stats"])
    assert not np.allclose(stats["value_norm"]["mean"],
                           variables["batch_stats"]["value_norm"]["mean"])


def test_native_layer_has_the_linen_layers_variables_and_trains():
    layer = lnnx.LambdaLayer(6, 8, dim_k=4, heads=2, position="global", spatial_size=(4, 5),
                             rngs=nnx.Rngs(0))
    linen_layer = lambda_jax.LambdaLayer(dim_out=8, dim_k=4, heads=2, position="global")
    x = jax.random.normal(jax.random.key(0), (2, 4, 5, 6))
    expected = linen_layer.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, layer.linen_variables()) == jax.tree.map(jnp.shape, expected)
    state = nnx.state(layer, nnx.Param)
    assert state["relative_embeddings"].get_value().shape == (7, 9, 4, 1)

    def loss_fn(model):
        return jnp.mean((model(x) - 1.0) ** 2)

    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(layer, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match=r"spatial size \(4, 5\) and cannot be applied"):
        layer(jnp.ones((2, 5, 5, 6)))


def test_layer_settings_and_inputs_are_checked():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="needs spatial_size"):
        lnnx.LambdaLayer(4, 8, position="global", rngs=rngs)
    with pytest.raises(ValueError, match="LambdaLayer.receptive_field"):
        lnnx.LambdaLayer(4, 8, position="local", receptive_field=4, rngs=rngs)
    with pytest.raises(ValueError, match="LambdaLayer in_features must be positive"):
        lnnx.LambdaLayer(0, 8, position="local", rngs=rngs)
    layer = lnnx.LambdaLayer(4, 8, dim_k=4, heads=2, position="local", receptive_field=3,
                             spatial_dims=1, rngs=rngs)
    assert layer.local_embeddings.get_value().shape == (3, 4, 1)
    for shape in [(2, 0, 4), (0, 5, 4), (2, 5, 0)]:
        with pytest.raises(ValueError, match=rf"shape \({shape[0]}, {shape[1]}, {shape[2]}\)"):
            layer(jnp.ones(shape))
    with pytest.raises(ValueError, match=r"params\['query'\]\['kernel'\] has shape \(4, 8\)"):
        layer(jnp.ones((2, 5, 3)))
    shared = lnnx.LambdaLayer(4, 8, dim_k=4, heads=2, position="local", receptive_field=3,
                              own_embeddings=False, rngs=rngs)
    with pytest.raises(ValueError, match="pass embeddings="):
        shared(jnp.ones((1, 3, 3, 4)))
    assert shared(jnp.ones((1, 3, 3, 4)), embeddings=jnp.ones((3, 3, 4, 1))).shape == (1, 3, 3, 8)
    with pytest.raises(TypeError, match="takes a lambda_jax.LambdaLayer"):
        lnnx.LambdaLayer.from_linen(object(), {})


def test_bridged_lambda_resnet_runs_and_matches_linen():
    model = lnnx.create_model("lambda_resnet_tiny", image_size=16, num_classes=3,
                              rngs=nnx.Rngs(0))
    linen_model = lambda_jax.create_model("lambda_resnet_tiny", num_classes=3)
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = model.linen_variables()
    expected_shapes = jax.eval_shape(
        lambda: linen_model.init(jax.random.key(0), images, train=False))
    assert jax.tree.structure(variables) == jax.tree.structure(expected_shapes)
    model.eval()
    eval_logits = nnx.jit(lambda m, x: m(x))(model, images)
    assert eval_logits.shape == (4, 3)
    np.testing.assert_allclose(eval_logits, linen_model.apply(variables, images),
                               rtol=1e-5, atol=1e-5)
    model.train()
    train_logits = nnx.jit(lambda m, x: m(x))(model, images)
    expected, updates = linen_model.apply(variables, images, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(train_logits, expected, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 model.linen_variables()["batch_stats"], updates["batch_stats"])


def test_nnx_training_example_lowers_the_loss():
    results = nnx_training.main(["--steps", "40", "--batch-size", "32"])
    losses = results["losses"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert results["test_accuracy"] > 0.3
