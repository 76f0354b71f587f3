"""How the layer picks its local formulation: the static rule of ``"auto"`` by mode and
backend, and ``implementation="autotune"`` measuring the formulations on the device: equal
to ``"conv"`` in output and gradient, its decisions cached on disk so that a second process
with the same key compiles no candidate."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lambda_jax import LambdaLayer
from lambda_jax.core import autotune, position
from xla_test_flags import cpu_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("spatial, r, u, backend, mode, expected", [
    ((32, 32), 9, 1, "cpu", "train", "tiled"),
    ((32, 32), 9, 1, "cpu", "inference", "shift"),
    ((28, 28), 23, 1, "cpu", "inference", "tiled"),
    ((28, 28), 7, 4, "cpu", "inference", "tiled"),
    ((7, 7), 23, 1, "cpu", "inference", "banded"),
    ((8, 8), 7, 4, "cpu", "inference", "banded"),
    ((9, 9), 7, 4, "cpu", "inference", "tiled"),
    ((7, 7), 23, 1, "cpu", "train", "tiled"),
    ((7, 7), 23, 1, "gpu", "inference", "tiled"),
    ((32, 32), 9, 1, "gpu", "inference", "tiled"),
    ((32, 32), 9, 1, "tpu", "train", "tiled"),
    ((64,), 9, 1, "cpu", "inference", "shift"),
    ((64,), 9, 1, "gpu", "train", "conv"),
])
def test_auto_picks_by_mode_and_backend(spatial, r, u, backend, mode, expected):
    assert position.resolve_local_implementation(
        "auto", spatial, r, u, backend=backend, mode=mode) == expected


def test_a_wrong_mode_and_an_unresolved_autotune_say_what_to_do():
    with pytest.raises(ValueError, match="mode must be one of"):
        position.resolve_local_implementation("auto", (8, 8), 3, 1, mode="eval")
    with pytest.raises(ValueError, match="choose_local_implementation"):
        position.resolve_local_implementation("autotune", (8, 8), 3, 1)


def test_autotune_candidates_fit_the_rank_and_skip_long_compiles():
    assert position.autotune_candidates((8, 8), 5, 1, "cpu") == ("conv", "banded", "tiled",
                                                                   "shift")
    assert position.autotune_candidates((8,), 5, 1, "cpu") == ("conv", "shift")
    assert "shift" not in position.autotune_candidates((56, 56), 23, 1, "cpu")


SETTINGS = dict(dim_out=16, dim_k=4, heads=2, dim_u=2, position="local", receptive_field=5)
SHAPE = (2, 6, 10, 8)
# The layer's training step and forward, as a second process runs them.
PROGRAM = """
import jax, jax.numpy as jnp
from lambda_jax import LambdaLayer
from lambda_jax.core import autotune
x = jax.random.normal(jax.random.key(0), {shape})
layer = LambdaLayer(implementation="autotune", **{settings})
variables = layer.init(jax.random.key(1), x)
jax.jit(lambda v, x: layer.apply(v, x, train=True, mutable=["batch_stats"])[0])(variables, x)
jax.jit(layer.apply)(variables, x)
print(autotune.compiled_candidates())
"""


def _loss(layer, variables, x, cotangent):
    out, _ = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.vdot(out, cotangent)


def test_autotune_equals_conv_writes_its_cache_and_a_second_process_measures_nothing(
        tmp_path, monkeypatch):
    monkeypatch.setenv("LAMBDA_JAX_CACHE_DIR", str(tmp_path))
    autotune.forget()
    x = jax.random.normal(jax.random.key(0), SHAPE)
    cotangent = jax.random.normal(jax.random.key(2), SHAPE[:-1] + (SETTINGS["dim_out"],))
    results = {}
    for implementation in ("conv", "autotune"):
        layer = LambdaLayer(implementation=implementation, **SETTINGS)
        variables = layer.init(jax.random.key(1), x)
        grad = jax.jit(jax.grad(lambda v, x: _loss(layer, v, x, cotangent), argnums=(0, 1)))
        results[implementation] = (jax.jit(layer.apply)(variables, x), grad(variables, x))
    compiled = autotune.compiled_candidates()
    assert compiled >= 2 * len(position.autotune_candidates(SHAPE[1:3], 5, 2, "cpu"))
    for got, want in zip(jax.tree.leaves(results["autotune"]), jax.tree.leaves(results["conv"])):
        assert jnp.allclose(got, want, atol=1e-4, rtol=1e-4)
    choices = autotune.cached_choices()
    assert sorted(choice.key["mode"] for choice in choices) == ["inference", "train"]
    files = list(autotune.cache_dir().glob("*.json"))
    assert len(files) == 2 and all(json.loads(f.read_text()) for f in files)

    env = {**os.environ, "LAMBDA_JAX_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": cpu_flags(1)}
    program = PROGRAM.format(shape=SHAPE, settings=SETTINGS)
    second = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.split()[-1] == "0"
    assert autotune.compiled_candidates() == compiled


def test_pallas_trains_a_lambda_resnet_for_one_step_as_conv_does():
    """The fused kernel (interpreted on CPU) in every lambda layer of a LambdaResNet-26 at 32
    px: one jitted training step, its loss finite and equal to the lambda convolution's."""
    import optax

    from lambda_jax import create_model

    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    labels = jnp.array([1, 2])
    losses, norms = {}, {}
    for implementation in ("pallas", "conv"):
        model = create_model("lambda_resnet26_cifar", num_classes=10,
                             lambda_implementation=implementation)
        variables = model.init(jax.random.key(1), images, train=False)

        def loss(params, stats):
            logits, _ = model.apply({"params": params, "batch_stats": stats}, images,
                                    train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"],
                                                         variables["batch_stats"])
        losses[implementation] = float(value)
        norms[implementation] = float(jnp.sqrt(sum(jnp.vdot(g, g)
                                                    for g in jax.tree.leaves(grads))))
    assert jnp.isfinite(losses["pallas"]) and jnp.isfinite(norms["pallas"])
    assert losses["pallas"] == pytest.approx(losses["conv"], rel=1e-4)
    assert norms["pallas"] == pytest.approx(norms["conv"], rel=1e-3)


def test_the_autotune_command_fills_the_cache_for_every_local_layer(tmp_path):
    env = {**os.environ, "LAMBDA_JAX_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": cpu_flags(1)}
    out = tmp_path / "table.json"
    command = [sys.executable, "-m", "lambda_jax.autotune", "--model", "lambda_resnet50",
               "--image_size", "64", "--batch", "2", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| layer | input | mode |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {row["mode"] for row in rows} == {"train", "inference"}
    layers = {row["layer"] for row in rows}
    assert len(rows) == 2 * len(layers) and len(layers) >= 2
    for row in rows:
        assert row["choice"] in row["measurements"] and "conv" in row["measurements"]
        assert row["measurements"][row["choice"]]["within_bound"]
        assert f"**{row['choice']}**" in run.stdout
    # Every distinct problem was measured once and written: the cache answers a second run.
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(row["from_cache"] for row in json.loads(out.read_text())["rows"])


def test_load_model_takes_autotune_and_computes_the_same(tmp_path, monkeypatch):
    import lambda_jax

    monkeypatch.setenv("LAMBDA_JAX_CACHE_DIR", str(tmp_path / "cache"))
    model = lambda_jax.create_model("lambda_resnet_tiny", num_classes=3)
    images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    variables = model.init(jax.random.key(1), images, train=False)
    path = lambda_jax.save_model(tmp_path / "tiny.safetensors", "lambda_resnet_tiny",
                                 variables, num_classes=3)
    tuned, loaded = lambda_jax.load_model("lambda_resnet_tiny", path,
                                          lambda_implementation="autotune")
    assert tuned.lambda_implementation == "autotune"
    assert jnp.allclose(tuned.apply(loaded, images, train=False),
                        model.apply(variables, images, train=False), atol=1e-4)
    with pytest.raises(ValueError, match="stride_pool"):
        lambda_jax.load_model("lambda_resnet_tiny", path, stride_pool="2x2")
