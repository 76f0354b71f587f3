"""lambda_jax.convert without torch: NumPy state_dicts, and the errors for ones that don't fit."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambda_jax import LambdaLayer
from lambda_jax.convert import StateDictMismatchError, from_lambda_networks, from_timm

DIM, DIM_K, HEADS, DIM_U, DIM_OUT, R = 6, 4, 2, 3, 8, 5


def _lambda_networks_state_dict(seed=0):
    """What ``lambda_networks.LambdaLayer(6, dim_k=4, heads=2, dim_u=3, dim_out=8, r=5)`` stores."""
    rng = np.random.default_rng(seed)
    v = DIM_OUT // HEADS
    shapes = {
        "to_q.weight": (HEADS * DIM_K, DIM, 1, 1),
        "to_k.weight": (DIM_U * DIM_K, DIM, 1, 1),
        "to_v.weight": (DIM_U * v, DIM, 1, 1),
        "pos_conv.weight": (DIM_K, DIM_U, 1, R, R),
        "pos_conv.bias": (DIM_K,),
    }
    for norm, features in (("norm_q", HEADS * DIM_K), ("norm_v", DIM_U * v)):
        for name in ("weight", "bias", "running_mean"):
            shapes[f"{norm}.{name}"] = (features,)
        shapes[f"{norm}.running_var"] = (features,)
    state = {key: rng.normal(size=shape).astype(np.float32) for key, shape in shapes.items()}
    state["norm_q.running_var"] = np.abs(state["norm_q.running_var"]) + 0.5
    state["norm_v.running_var"] = np.abs(state["norm_v.running_var"]) + 0.5
    state["norm_q.num_batches_tracked"] = np.array(3)
    return state


LAYER = LambdaLayer(dim_out=DIM_OUT, dim_k=DIM_K, heads=HEADS, dim_u=DIM_U, position="local",
                    receptive_field=R, position_bias=True)


def test_numpy_state_dict_gives_variables_that_run_and_do_not_alias_it():
    state = _lambda_networks_state_dict()
    variables = from_lambda_networks(state, LAYER)
    expected = LAYER.init(jax.random.key(0), jnp.ones((1, 5, 5, DIM)))
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in
               zip(jax.tree.leaves(variables), jax.tree.leaves(expected)))
    np.testing.assert_array_equal(variables["params"]["position_bias"], state["pos_conv.bias"])
    np.testing.assert_array_equal(variables["params"]["query"]["kernel"],
                                  state["to_q.weight"][:, :, 0, 0].T)
    out = LAYER.apply(variables, jnp.ones((1, 5, 5, DIM)))
    assert out.shape == (1, 5, 5, DIM_OUT) and bool(jnp.isfinite(out).all())
    before = np.asarray(variables["batch_stats"]["query_norm"]["mean"]).copy()
    state["norm_q.running_mean"] += 1.0  # PyTorch updates its buffers in place
    np.testing.assert_array_equal(variables["batch_stats"]["query_norm"]["mean"], before)


def test_missing_unexpected_and_misshapen_keys_are_all_named_with_both_shapes():
    state = _lambda_networks_state_dict()
    del state["to_k.weight"]
    state["norm_v.weight"] = np.ones(5, np.float32)
    state["extra.weight"] = np.ones((2, 3), np.float32)
    with pytest.raises(StateDictMismatchError) as error:
        from_lambda_networks(state, LAYER)
    message = str(error.value)
    assert "missing key 'to_k.weight'" in message and "(12, 6, 1, 1)" in message
    assert "key 'norm_v.weight' has shape (5,)" in message and "expects (12,)" in message
    assert "unexpected key 'extra.weight' with shape (2, 3)" in message
    assert "num_batches_tracked" not in message


def test_layer_set_differently_from_the_state_dict_is_reported():
    with pytest.raises(StateDictMismatchError, match=r"'to_q.weight' has shape \(8, 6, 1, 1\)"):
        from_lambda_networks(_lambda_networks_state_dict(), LAYER.clone(heads=4, dim_out=8))
    with pytest.raises(StateDictMismatchError, match="missing key 'rel_pos_emb'"):
        from_lambda_networks(_lambda_networks_state_dict(), LAYER.clone(position="global",
                                                                         position_bias=False))


def test_local_layer_without_position_bias_is_told_to_set_it():
    with pytest.raises(ValueError, match="position_bias=True"):
        from_lambda_networks(_lambda_networks_state_dict(), LAYER.clone(position_bias=False))


def test_from_timm_rejects_what_it_cannot_fill():
    with pytest.raises(TypeError, match="LambdaLayer or a model"):
        from_timm({}, object())
    with pytest.raises(ValueError, match="u = 1"):
        from_timm({}, LAYER)


def test_bfloat16_parameters_take_the_layers_param_dtype():
    variables = from_lambda_networks(_lambda_networks_state_dict(),
                                     LAYER.clone(param_dtype=jnp.bfloat16))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype("bfloat16")}


def test_importing_lambda_jax_and_its_converters_does_not_import_torch():
    code = ("import sys, lambda_jax, lambda_jax.convert; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
