"""Train and eval steps, optimizer and data parallelism of lambda_jax.train."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lambda_jax import LambdaLayer
from lambda_jax.train import (
    DataParallel,
    create_learning_rate_fn,
    create_optimizer,
    create_train_state,
    cross_entropy_loss,
    eval_step,
    train_step,
    validate_config,
)
from lambda_jax.train.optim import ema_decay_at
from lambda_jax.train.parallel import AXIS

NUM_CLASSES = 5
IMAGE_SHAPE = (8, 8, 3)
BATCH = 16


class TinyLambdaNet(nn.Module):
    """conv -> batch norm -> lambda layer -> pooled logits; batch norm synced over axis_name."""

    axis_name: str = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name, dtype=self.dtype)(x)
        x = LambdaLayer(dim_out=8, dim_k=4, heads=2, position="global",
                        axis_name=self.axis_name, dtype=self.dtype)(nn.relu(x), train=train)
        x = nn.Dropout(0.0, deterministic=not train)(x)
        return nn.Dense(NUM_CLASSES, dtype=self.dtype)(x.mean((1, 2))).astype(jnp.float32)


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(
        optimizer="sgd", learning_rate=0.4, batch_size=BATCH, eval_batch_size=BATCH,
        warmup_epochs=1.0, momentum=0.9, nesterov=True, weight_decay=1e-4, grad_clip_norm=0.0,
        label_smoothing=0.1, ema_decay=0.9, dtype="float32", log_every_steps=1,
        keep_checkpoints=1, eval_every_steps=0, checkpoint_every_steps=0,
    ))
    config.update(overrides)
    return config


def _batches(num, seed=0):
    rs = np.random.RandomState(seed)
    return [{"image": rs.randn(BATCH, *IMAGE_SHAPE).astype(np.float32),
             "label": rs.randint(0, NUM_CLASSES, BATCH).astype(np.int32)} for _ in range(num)]


def _train(mode, num_devices, config=None, num_steps=3, dtype=jnp.float32, history=None):
    """Runs ``num_steps`` train steps; returns the host state and the last metrics.

    ``history``, a list, receives the host state after every step.
    """
    config = config or _config()
    parallel = DataParallel(mode, jax.devices()[:num_devices])
    model = TinyLambdaNet(axis_name=AXIS, dtype=dtype)
    lr_fn = create_learning_rate_fn(config, steps_per_epoch=2, num_train_steps=10)
    tx = create_optimizer(config, lr_fn)
    host_state = jax.device_get(create_train_state(jax.random.key(0), model, tx, IMAGE_SHAPE))
    step = parallel.map_train_step(functools.partial(
        train_step, model=model, tx=tx, learning_rate_fn=lr_fn, num_classes=NUM_CLASSES,
        label_smoothing=config.label_smoothing, ema_decay=config.ema_decay, axis_name=AXIS))
    state, metrics = parallel.replicate(host_state), None
    for batch in _batches(num_steps):
        state, metrics = step(state, parallel.shard_batch(batch), jax.random.key(1))
        if history is not None:
            history.append(parallel.to_host(state))
    return parallel.to_host(state), parallel.to_host(metrics)


def _max_difference(a, b):
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
        a, b)))


@pytest.fixture(scope="module")
def pmap_8_devices():
    return _train("pmap", 8)


@pytest.fixture(scope="module")
def pmap_1_device():
    """The last state and metrics, and the state after every step."""
    history = []
    state, metrics = _train("pmap", 1, history=history)
    return state, metrics, history


def test_train_steps_change_the_parameters(pmap_8_devices):
    state, metrics = pmap_8_devices
    initial, _ = _train("pmap", 1, num_steps=0)
    assert int(state.step) == 3
    assert _max_difference(state.params, initial.params) > 1e-3
    assert _max_difference(state.batch_stats, initial.batch_stats) > 1e-3
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1


def test_pmap_and_shard_map_give_the_same_parameters(pmap_8_devices):
    state, metrics = pmap_8_devices
    shard_state, shard_metrics = _train("shard_map", 8)
    assert _max_difference(state, shard_state) < 1e-5
    np.testing.assert_allclose(metrics["loss"], shard_metrics["loss"], rtol=1e-5)


def test_one_and_eight_devices_give_the_same_parameters(pmap_8_devices, pmap_1_device):
    assert _max_difference(pmap_8_devices[0], pmap_1_device[0]) < 1e-5
    np.testing.assert_allclose(pmap_8_devices[1]["loss"], pmap_1_device[1]["loss"], rtol=1e-5)


def test_ema_follows_the_parameters_with_the_ramped_decay(pmap_1_device):
    before, after = pmap_1_device[2][:2]
    decay = min(0.9, 2 / 11)  # min(decay, (1 + step) / (10 + step)) at step 1
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                            before.ema_params, after.params)
    assert _max_difference(after.ema_params, expected) < 1e-6
    assert _max_difference(after.ema_params, after.params) > 1e-4


def test_ema_decay_ramps_up_and_zero_disables_it():
    assert float(ema_decay_at(0, 0.9999)) == pytest.approx(0.1)
    assert float(ema_decay_at(10**6, 0.9999)) == pytest.approx(0.9999)
    assert float(ema_decay_at(5, 0.0)) == 0.0  # the "average" is then the weights themselves


def test_learning_rate_warms_up_then_decays_to_zero():
    lr_fn = create_learning_rate_fn(_config(learning_rate=0.1, batch_size=512), 10, 100)
    assert float(lr_fn(0)) == 0
    np.testing.assert_allclose(float(lr_fn(10)), 0.2, rtol=1e-6)  # peak: 0.1 * 512 / 256
    assert float(lr_fn(5)) == pytest.approx(0.1)
    assert float(lr_fn(55)) == pytest.approx(0.1, rel=1e-3)  # half way down the cosine
    assert float(lr_fn(100)) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_skips_biases_and_norm_scales():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "scale": jnp.ones(2)}
    config = _config(weight_decay=0.5, momentum=0.0, nesterov=False, learning_rate=256.0,
                     batch_size=1, warmup_epochs=0.0)
    tx = create_optimizer(config, lambda step: 1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5)
    np.testing.assert_allclose(updates["bias"], 0.0)
    np.testing.assert_allclose(updates["scale"], 0.0)


def test_gradient_clipping_bounds_the_update():
    params = {"kernel": jnp.zeros((3, 3))}
    grads = {"kernel": jnp.full((3, 3), 100.0)}
    config = _config(grad_clip_norm=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    tx = create_optimizer(config, lambda step: 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_label_smoothing_matches_the_formula():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    log_p = jax.nn.log_softmax(logits)[0]
    expected = -(0.9 + 0.1 / 3) * log_p[1] - (0.1 / 3) * (log_p[0] + log_p[2])
    loss = cross_entropy_loss(logits, jnp.array([1]), 3, 0.1)
    np.testing.assert_allclose(loss[0], expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_eval_step_ignores_padding(mode):
    parallel = DataParallel(mode, jax.devices()[:4])
    model = TinyLambdaNet(axis_name=AXIS)
    tx = optax.sgd(0.1)
    state = create_train_state(jax.random.key(0), model, tx, IMAGE_SHAPE)
    batch = _batches(1)[0]
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"])
    mask = (np.arange(BATCH) < 11).astype(np.float32)
    p_eval = parallel.map_eval_step(functools.partial(
        eval_step, model=model, num_classes=NUM_CLASSES, axis_name=AXIS))
    sums = parallel.to_host(p_eval(parallel.replicate(jax.device_get(state)),
                                   parallel.shard_batch({**batch, "mask": mask})))
    correct = np.argmax(logits, -1) == batch["label"]
    top5 = np.any(np.argsort(-np.asarray(logits), -1)[:, :5] == batch["label"][:, None], -1)
    losses = cross_entropy_loss(logits, jnp.asarray(batch["label"]), NUM_CLASSES, 0.0)
    assert sums["count"] == 11
    assert sums["top1"] == correct[:11].sum()
    assert sums["top5"] == top5[:11].sum() == 11  # 5 classes: every label is in the top 5
    np.testing.assert_allclose(sums["loss"], np.sum(losses[:11]), rtol=1e-5)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_a_step_compiled_ahead_is_not_compiled_again_when_called(mode):
    """DataParallel.compile is what keeps the processes of a run in step: the first call
    must reuse its program instead of compiling one while the other processes wait."""
    parallel = DataParallel(mode, jax.devices()[:2])

    def compiles_of_first_call(ahead):
        def step(state, batch, rng):  # a new function: nothing compiled for it yet
            total = jax.lax.psum(jnp.sum(batch["x"] * state), AXIS)
            return state + total, {"total": total}

        mapped = parallel.map_train_step(step)
        state = parallel.replicate(np.float32(1))
        batch = parallel.shard_batch({"x": np.arange(4, dtype=np.float32)})
        if ahead:
            parallel.compile(mapped, state, batch, jax.random.key(0), name="test")
        events = []

        def listen(event, duration, **kwargs):
            events.append(event)

        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            state, metrics = mapped(state, batch, jax.random.key(0))
            total = parallel.to_host(metrics)["total"]
        finally:
            jax.monitoring.unregister_event_duration_listener(listen)
        assert total == 6
        return events.count("/jax/core/compile/backend_compile_duration")

    compiles_of_first_call(ahead=False)  # compiles the helpers every call uses
    assert compiles_of_first_call(ahead=True) == compiles_of_first_call(ahead=False) - 1


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
    parallel = DataParallel("pmap", jax.devices()[:8])
    with pytest.raises(ValueError, match=r"config.batch_size=12 .* multiple of the device count \(8\)"):
        validate_config(_config(batch_size=12), parallel)
    with pytest.raises(ValueError, match="config.eval_batch_size"):
        validate_config(_config(eval_batch_size=4), parallel)
    with pytest.raises(ValueError, match="config.dtype"):
        validate_config(_config(dtype="float16"), parallel)
    with pytest.raises(ValueError, match="config.parallelism"):
        DataParallel("xmap")
    with pytest.raises(ValueError, match="config.optimizer"):
        create_optimizer(_config(optimizer="lamb"), lambda step: 1.0)


def test_uint8_batches_normalised_in_the_steps_match_host_normalised_batches():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    rs = np.random.RandomState(3)
    pixels = {"image": rs.randint(0, 256, (BATCH, *IMAGE_SHAPE)).astype(np.uint8),
              "label": rs.randint(0, NUM_CLASSES, BATCH).astype(np.int32),
              "mask": np.ones(BATCH, np.float32)}
    # What the host sent before: float32 images normalised with the same statistics.
    host = {**pixels, "image": ((pixels["image"].astype(np.float32) / 255 - np.float32(mean))
                                / np.float32(std)).astype(np.float32)}
    config = _config()
    parallel = DataParallel("pmap", jax.devices()[:2])
    model = TinyLambdaNet(axis_name=AXIS)
    lr_fn = create_learning_rate_fn(config, steps_per_epoch=2, num_train_steps=10)
    tx = create_optimizer(config, lr_fn)
    host_state = jax.device_get(create_train_state(jax.random.key(0), model, tx, IMAGE_SHAPE))
    results = []
    for batch, statistics in ((pixels, dict(mean=mean, std=std)), (host, {})):
        step = parallel.map_train_step(functools.partial(
            train_step, model=model, tx=tx, learning_rate_fn=lr_fn, num_classes=NUM_CLASSES,
            label_smoothing=0.1, ema_decay=0.9, axis_name=AXIS, **statistics))
        evaluate = parallel.map_eval_step(functools.partial(
            eval_step, model=model, num_classes=NUM_CLASSES, axis_name=AXIS, **statistics))
        device_batch = parallel.shard_batch(batch)
        state, metrics = step(parallel.replicate(host_state), device_batch, jax.random.key(1))
        results.append((parallel.to_host(state), parallel.to_host(metrics),
                        parallel.to_host(evaluate(state, device_batch))))
    (state, metrics, sums), (expected_state, expected_metrics, expected_sums) = results
    assert _max_difference(state, expected_state) < 1e-5
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(sums["loss"], expected_sums["loss"], rtol=1e-5)
    assert sums["top1"] == expected_sums["top1"] and sums["count"] == BATCH


def test_grad_norm_is_the_norm_of_the_device_mean_gradient(pmap_8_devices, pmap_1_device):
    """The same mean gradient on 1 and 8 devices: the same norm (a per-device norm would
    differ)."""
    norm_8, norm_1 = pmap_8_devices[1]["grad_norm"], pmap_1_device[1]["grad_norm"]
    assert norm_1 > 0
    np.testing.assert_allclose(norm_8, norm_1, rtol=1e-4)
