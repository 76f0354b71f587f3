"""Config checks of lambda_jax.train: values at start, and the fields a resume may change."""

import numpy as np
import pytest

from configs import default
from lambda_jax.train import MAY_CHANGE_ON_RESUME, NonFiniteError
from lambda_jax.train.config_check import check_data_size, check_values, config_changes
from lambda_jax.train.loop import check_finite


def _config(**overrides):
    config = default.get_config()
    config.update(overrides)
    return config


@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", float("nan"), "config.learning_rate must be a finite number, got nan"),
    ("learning_rate", float("inf"), "config.learning_rate must be a finite number"),
    ("learning_rate", 0.0, "config.learning_rate must be positive, got 0.0"),
    ("num_train_steps", 0, "config.num_train_steps must be positive, or -1"),
    ("num_train_steps", -3, "config.num_train_steps must be positive, or -1"),
    ("num_epochs", 0.0, "config.num_epochs must be positive"),
    ("num_epochs", -3.0, "config.num_epochs must be positive"),
    ("ema_decay", 1.5, r"config.ema_decay must be in \[0, 1\), got 1.5"),
    ("ema_decay", 1.0, r"config.ema_decay must be in \[0, 1\)"),
    ("label_smoothing", 2.0, r"config.label_smoothing must be in \[0, 1\), got 2.0"),
    ("weight_decay", -1e-4, "config.weight_decay must be >= 0"),
    ("warmup_epochs", -1.0, "config.warmup_epochs must be >= 0"),
    ("momentum", 1.0, r"config.momentum must be in \[0, 1\)"),
    ("grad_clip_norm", float("nan"), "config.grad_clip_norm must be a finite number"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be at least 1"),
    ("optimizer", "lamb", "config.optimizer must be one of"),
])
def test_each_impossible_value_is_refused_naming_its_field(field, value, message):
    check_values(_config(), num_devices=1)
    with pytest.raises(ValueError, match=message):
        check_values(_config(**{field: value}), num_devices=1)


def test_num_epochs_is_free_when_num_train_steps_is_set():
    check_values(_config(num_epochs=0.0, num_train_steps=5), num_devices=1)


def test_a_batch_larger_than_the_training_set_is_refused():
    check_data_size(_config(batch_size=64), 64)
    with pytest.raises(ValueError, match="config.batch_size=128 is larger than the training set "
                                         "\\(100 examples of 'digits'\\)"):
        check_data_size(_config(batch_size=128), 100)


def test_run_defining_fields_are_reported_and_execution_fields_are_not():
    saved = _config().to_dict()
    moved = _config(data_dir="/elsewhere", num_workers=4, parallelism="shard_map",
                    keep_checkpoints=9, log_every_steps=3, eval_every_steps=5,
                    checkpoint_every_steps=5, init_from="/other")
    assert config_changes(saved, moved.to_dict()) == {}
    changed = _config(image_size=32, optimizer="adamw", num_train_steps=44)
    assert config_changes(saved, changed.to_dict()) == {
        "image_size": (16, 32), "num_train_steps": (-1, 44), "optimizer": ("sgd", "adamw")}
    assert set(MAY_CHANGE_ON_RESUME) <= set(saved)  # each named field exists
    # The local formulation may change (e.g. to "autotune"); the model's other overrides not.
    tuned = _config()
    tuned.model_overrides.lambda_implementation = "autotune"
    assert config_changes(saved, tuned.to_dict()) == {}
    other = _config()
    other.model_overrides.stride_pool = "2x2"
    assert set(config_changes(saved, other.to_dict())) == {"model_overrides"}


def test_a_non_finite_loss_names_its_step():
    check_finite([{"loss": np.float32(1.0)}, {"loss": np.float32(2.0)}], first_step=11)
    with pytest.raises(NonFiniteError, match="loss is nan at step 12"):
        check_finite([{"loss": np.float32(1.0)}, {"loss": np.float32(np.nan)}], first_step=11)
    with pytest.raises(NonFiniteError, match="grad_norm is inf at step 11"):
        check_finite([{"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)}], first_step=11)
