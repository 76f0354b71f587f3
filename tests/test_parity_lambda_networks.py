"""lambda_jax.LambdaLayer against lucidrains' lambda_networks.LambdaLayer, float32.

Random weights, eval and train mode: outputs and gradients with respect to the input agree
to 1e-4; a train step updates the running statistics alike (see the variance note below).
"""

import jax.numpy as jnp
import lambda_networks
import numpy as np
import pytest
import torch

from lambda_jax import LambdaLayer
from lambda_jax.convert import from_lambda_networks
from torch_reference import assert_layer_matches, randomise_

# (dim, dim_out, dim_k, heads, dim_u, position kwargs, height, width); lambda_networks'
# global layer takes square inputs only.
CASES = {
    "local_r3_h4": (16, 32, 8, 4, 1, dict(r=3), 7, 5),
    "local_r5_u4_dim_out_lt_dim": (12, 8, 4, 2, 4, dict(r=5), 6, 6),
    "local_r7_h1_u2": (8, 8, 16, 1, 2, dict(r=7), 5, 9),
    "global_n5_u2_h1": (8, 16, 16, 1, 2, dict(n=5), 5, 5),
    "global_n4_h4": (16, 16, 4, 4, 1, dict(n=4), 4, 4),
}


def _pair(case, seed=0):
    dim, dim_out, dim_k, heads, dim_u, position, height, width = CASES[case]
    torch.manual_seed(seed)
    reference = randomise_(lambda_networks.LambdaLayer(
        dim, dim_k=dim_k, heads=heads, dim_out=dim_out, dim_u=dim_u, **position), seed)
    local = "r" in position
    layer = LambdaLayer(dim_out=dim_out, dim_k=dim_k, heads=heads, dim_u=dim_u,
                        position="local" if local else "global",
                        receptive_field=position.get("r", 3), position_bias=local)
    images = np.random.default_rng(seed).normal(size=(2, height, width, dim)).astype(np.float32)
    return reference, layer, images


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_input_gradients_match(case, train):
    reference, layer, images = _pair(case)
    variables = from_lambda_networks(reference.state_dict(), layer)
    assert_layer_matches(reference, layer, variables, images, train)


@pytest.mark.parametrize("case", ["local_r5_u4_dim_out_lt_dim", "global_n5_u2_h1"])
def test_train_step_updates_running_statistics_alike(case):
    reference, layer, images = _pair(case)
    variables = from_lambda_networks(reference.state_dict(), layer)
    reference.train()
    with torch.no_grad():
        reference(torch.tensor(np.moveaxis(images, -1, 1)))
    _, updates = layer.apply(variables, jnp.asarray(images), train=True, mutable=["batch_stats"])
    after = from_lambda_networks(reference.state_dict(), layer)["batch_stats"]
    count = images.shape[0] * images.shape[1] * images.shape[2]
    for name in ("query_norm", "value_norm"):
        old_var = variables["batch_stats"][name]["var"]
        np.testing.assert_allclose(updates["batch_stats"][name]["mean"], after[name]["mean"],
                                   atol=1e-5)
        # PyTorch blends the unbiased batch variance into the running variance, Flax the
        # biased one (the one both normalise with): the updates differ by count/(count-1).
        torch_batch_var = (after[name]["var"] - 0.9 * old_var) / 0.1
        flax_batch_var = (updates["batch_stats"][name]["var"] - 0.9 * old_var) / 0.1
        np.testing.assert_allclose(flax_batch_var * count / (count - 1), torch_batch_var,
                                   rtol=1e-4, atol=1e-4)
