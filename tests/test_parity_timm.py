"""lambda_jax against timm: its LambdaLayer, and the LambdaResNets by name, float32.

Random weights (timm's own initialisation, random batch-norm scales and shifts and biases;
for eval mode, running statistics measured on other random images), eval and train mode:
outputs, logits and gradients with respect to the input agree to 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch
from timm.layers.lambda_layer import LambdaLayer as TimmLambdaLayer

import lambda_jax
from lambda_jax import LambdaLayer
from lambda_jax.convert import StateDictMismatchError, from_timm
from torch_reference import (
    TOLERANCE,
    assert_layer_matches,
    calibrate_,
    output_and_input_gradient,
    randomise_,
)

# (dim, num_heads, dim_head, r, stride, height, width); timm's layer needs dim == dim_out.
LAYER_CASES = {
    "local_r3": (32, 4, 8, 3, 1, 6, 9),
    "local_r5_stride2_odd": (16, 2, 16, 5, 2, 7, 6),
    "global": (16, 4, 4, None, 1, 5, 7),
    "global_stride2": (8, 1, 8, None, 2, 6, 6),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_outputs_and_input_gradients_match(case, train):
    dim, heads, dim_head, r, stride, height, width = LAYER_CASES[case]
    torch.manual_seed(0)
    reference = randomise_(TimmLambdaLayer(dim, feat_size=(height, width), stride=stride,
                                           num_heads=heads, dim_head=dim_head, r=r), 0)
    layer = LambdaLayer(dim_out=dim, dim_k=dim_head, heads=heads, dim_u=1,
                        position="global" if r is None else "local", receptive_field=r or 3,
                        position_bias=r is not None, stride=stride, stride_pool="2x2")
    variables = from_timm(reference.state_dict(), layer)
    images = np.random.default_rng(0).normal(size=(2, height, width, dim)).astype(np.float32)
    assert_layer_matches(reference, layer, variables, images, train)


@pytest.fixture(autouse=True)
def _release_compiled_models():
    # The whole suite runs in one process: free each model's compiled code after its test.
    yield
    jax.clear_caches()


def _check_model(name, size, train):
    """Logits and the input gradient of the mean cross-entropy, timm vs lambda_jax."""
    torch.manual_seed(0)
    reference = randomise_(timm.create_model(name, pretrained=False), 0)
    if not train:
        calibrate_(reference, size, seed=1)
    model = lambda_jax.create_model(name)
    variables = from_timm(reference.state_dict(), model)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, size=2)
    reference.train(train)
    expected, expected_gradient = output_and_input_gradient(
        reference, images,
        lambda logits: torch.nn.functional.cross_entropy(logits, torch.tensor(labels)))

    def loss(x):
        logits, _ = model.apply(variables, x, train=train, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (_, logits), gradient = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(images))
    assert logits.shape == expected.shape == (2, 1000)
    assert np.abs(logits - expected).max() <= TOLERANCE
    assert np.abs(gradient - expected_gradient).max() <= TOLERANCE
    assert np.abs(expected).max() > 0.1 and np.abs(expected_gradient).max() > 1e-3


# ReLU's gradient jumps where a pre-activation crosses zero, and float32 rounding can put a
# unit lying within ~1e-7 of zero on either side: PyTorch in float32 and in float64 then
# differ in the input gradient by ~3e-4 (lambda_resnet26t at 96 pixels), and so does any
# float32 port. The sizes here are ones where no unit lies that close.
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,size", [("lambda_resnet26t", 64), ("lambda_resnet50ts", 96)])
def test_local_models_match(name, size, train):
    _check_model(name, size, train)


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_lambda_resnet26rpt_256_matches(train):
    _check_model("lambda_resnet26rpt_256", 256, train)


def test_model_state_dict_that_does_not_fit_names_each_key_and_both_shapes():
    state = timm.create_model("lambda_resnet26t", pretrained=False, num_classes=10).state_dict()
    state["stages.3.1.self_attn.conv_lambda.weight"] = torch.zeros(16, 1, 7, 7, 1)
    del state["stages.0.0.conv1_1x1.bn.running_var"]
    with pytest.raises(StateDictMismatchError) as error:
        from_timm(state, lambda_jax.create_model("lambda_resnet26t"))
    message = str(error.value)
    assert ("key 'stages.3.1.self_attn.conv_lambda.weight' has shape (16, 1, 7, 7, 1)"
            in message and "expects (16, 1, 9, 9, 1)" in message)
    assert "key 'head.fc.weight' has shape (10, 2048)" in message and "(1000, 2048)" in message
    assert "missing key 'stages.0.0.conv1_1x1.bn.running_var'" in message
    with pytest.raises(StateDictMismatchError, match="unexpected key 'stages.1.3"):
        from_timm(timm.create_model("lambda_resnet50ts", pretrained=False).state_dict(),
                  lambda_jax.create_model("lambda_resnet26t"))
