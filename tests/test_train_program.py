"""The training program end to end: train.py and the configs on real and mock data."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar10, default, imagenet_lambda_resnet50
from lambda_jax.train import (
    EXIT_PREEMPTED,
    CheckpointError,
    Checkpointer,
    ConfigChangeError,
    NonFiniteError,
    train_and_evaluate,
)
from xla_test_flags import cpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kill-and-resume run: small enough to take seconds per step on a CPU.
QUICK = dict(image_size=8, batch_size=32, eval_batch_size=120, num_train_steps=20,
             log_every_steps=1, eval_every_steps=10, checkpoint_every_steps=10)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A JAX compilation cache shared by this module's train.py runs: the same program is
    compiled once."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def _env(num_devices, compilation_cache=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = cpu_flags(num_devices)
    if compilation_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache
    return env


def _train_command(workdir, config="configs/default.py", **overrides):
    return [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def _max_difference(a, b):
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
        a, b)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _quick_config(data_dir, **overrides):
    config = default.get_config()
    config.update(dict(QUICK, data_dir=data_dir, **overrides))
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, compilation_cache):
    """The quick digits run on one device, start to end: its workdir."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    run = subprocess.run(_train_command(workdir, data_dir=data_dir, **QUICK), cwd=ROOT,
                         env=_env(1, compilation_cache), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def _kept_steps(workdir):
    return Checkpointer(os.path.join(workdir, "checkpoints"), keep=2).all_steps()


def _saved_metrics(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "metrics", "metrics")) as f:
        return json.load(f)


def test_sigterm_saves_and_a_rerun_ends_with_the_same_parameters(tmp_path, data_dir,
                                                                  uninterrupted,
                                                                  compilation_cache):
    workdir = str(tmp_path / "run")
    command = _train_command(workdir, data_dir=data_dir, **QUICK)
    env = _env(1, compilation_cache)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    log = []
    for line in process.stderr:
        log.append(line)
        if "step 8/20" in line:
            process.send_signal(signal.SIGTERM)
            break
    log.extend(process.stderr)
    assert process.wait(timeout=300) == EXIT_PREEMPTED, "".join(log[-20:])
    log = "".join(log)
    assert "Received SIGTERM" in log and "rerun the same command to resume" in log
    stopped_at = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2).latest_step()
    assert 8 <= stopped_at < 20
    assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))

    # keep_checkpoints may change on resume; the best by eval_top1 must survive it.
    rerun = subprocess.run([*command, "--config.keep_checkpoints=1"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resumed from {workdir}/checkpoints/{stopped_at} (step {stopped_at})" in rerun.stderr
    resumed = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2).read_state()
    reference = Checkpointer(os.path.join(uninterrupted, "checkpoints"), keep=2).read_state()
    assert int(resumed["step"]) == 20
    assert _max_difference(resumed, reference) < 1e-5
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    with open(os.path.join(uninterrupted, "final_metrics.json")) as f:
        assert final["eval_top1"] == pytest.approx(json.load(f)["eval_top1"])
    top1 = {step: _saved_metrics(uninterrupted, step)["eval_top1"] for step in (10, 20)}
    best = max(top1, key=lambda step: (top1[step], step))
    kept = _kept_steps(workdir)
    assert kept == sorted({best, 20})
    assert {step: _saved_metrics(workdir, step)["eval_top1"] for step in kept} == \
        pytest.approx({step: top1[step] for step in kept})


def _slurm_port():
    """A free port of the range JAX derives from SLURM_JOB_ID: [61440, 65535]."""
    for port in np.random.default_rng().permutation(np.arange(61440, 65536)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port")


@pytest.fixture
def copied(tmp_path, uninterrupted):
    workdir = str(tmp_path / "copy")
    shutil.copytree(uninterrupted, workdir)
    return workdir


def test_a_workdir_of_another_model_is_refused_at_start(copied, data_dir):
    config = _quick_config(data_dir, model="resnet26_cifar")
    with pytest.raises(CheckpointError, match=r"20 holds a checkpoint of a different run "
                                              r"\(model: 'lambda_resnet_tiny' -> 'resnet26_cifar'"):
        train_and_evaluate(config, copied, devices=jax.devices()[:1])


def test_a_resume_that_changes_the_run_is_refused_naming_each_field(copied, data_dir):
    with open(os.path.join(copied, "config.json")) as f:
        config_json = f.read()
    config = _quick_config(data_dir, image_size=16, optimizer="adamw", num_workers=1)
    with pytest.raises(ConfigChangeError, match=r"image_size: 8 -> 16; optimizer: 'sgd' -> "
                                                r"'adamw'\)\. These fields define the run.*"
                                                r"--allow_config_changes.*--config.init_from="):
        train_and_evaluate(config, copied, devices=jax.devices()[:1])
    with open(os.path.join(copied, "config.json")) as f:
        assert f.read() == config_json  # written only after the checks pass
    assert _kept_steps(copied) == [10, 20]


def test_a_damaged_newest_checkpoint_is_set_aside_and_training_redone(copied, data_dir,
                                                                      compilation_cache):
    state_dir = os.path.join(copied, "checkpoints", "20", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0")
    os.makedirs(os.path.join(copied, "checkpoints", "999"))
    run = subprocess.run(_train_command(copied, data_dir=data_dir, **QUICK), cwd=ROOT,
                         env=_env(1, compilation_cache), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"step 20 at {copied}/checkpoints/20 is damaged" in run.stderr
    assert f"Resumed from {copied}/checkpoints/10 (step 10)" in run.stderr
    assert os.path.isdir(os.path.join(copied, "checkpoints_damaged", "20", "state"))
    assert os.path.isdir(os.path.join(copied, "checkpoints_damaged", "999"))
    assert _kept_steps(copied) == [10, 20]


def test_a_diverging_run_stops_naming_the_step_and_saves_nothing(copied, data_dir,
                                                                 compilation_cache):
    """Continues the finished run on purpose with a learning rate that diverges: the change
    is logged with the learning rate before and after, and the run stops at the first NaN."""
    overrides = dict(QUICK, num_train_steps=24, learning_rate=1e30, checkpoint_every_steps=1)
    run = subprocess.run([*_train_command(copied, data_dir=data_dir, **overrides),
                          "--allow_config_changes"], cwd=ROOT, env=_env(1, compilation_cache),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    assert ("changed config (--allow_config_changes): learning_rate: 0.4 -> 1e+30; "
            "num_train_steps: 20 -> 24. Learning rate at step 20: 0 before, ") in run.stderr
    # Stopped by the loss at a log step, or by the state before a save.
    stopped = re.search(r"The training loss is (?:nan|inf) at step (\d+); stopping|"
                        r"Not saving step (\d+): non-finite values", run.stderr)
    assert stopped, run.stderr[-3000:]
    newest = _kept_steps(copied)[-1]
    assert 20 <= newest < int(stopped.group(1) or stopped.group(2))
    state = Checkpointer(os.path.join(copied, "checkpoints"), keep=2).read_state(newest)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_bad_settings_fail_at_start_with_a_clear_message(tmp_path, data_dir):
    run = subprocess.run(_train_command(tmp_path, batch_size=12, data_dir=data_dir),
                         cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "config.batch_size=12 is the global batch and must be a positive multiple of the " \
           "device count (8)" in run.stderr
    with pytest.raises(ValueError, match="Unknown model 'lambda_resnet_huge'"):
        train_and_evaluate(_quick_config(data_dir, model="lambda_resnet_huge"), str(tmp_path))
    with pytest.raises(ValueError, match="Unknown data set 'no_such_dataset'"):
        train_and_evaluate(_quick_config(data_dir, dataset="no_such_dataset"), str(tmp_path))
    with pytest.raises(FileNotFoundError,
                       match="(?s)'cifar10' is not prepared.*tfds build cifar10"):
        train_and_evaluate(_quick_config(str(tmp_path / "empty"), dataset="cifar10"),
                           str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


# Tiny versions of the paper-scale configs: the same recipe, fewer and narrower blocks.
TINY_CIFAR = dict(stage_depths=(1, 1, 1, 1), stage_widths=(8, 8, 16, 16), stem_width=8)
TINY_IMAGENET = dict(TINY_CIFAR, stage_slots=("conv", "conv", "lambda", "lambda"))


@pytest.mark.parametrize("get_config,model_overrides,image_size,num_devices", [
    (cifar10.get_config, TINY_CIFAR, 16, 1),
    (cifar10.get_config, TINY_CIFAR, 16, 8),
    (imagenet_lambda_resnet50.get_config, TINY_IMAGENET, 32, 8),
], ids=["cifar10-1", "cifar10-8", "imagenet_lambda_resnet50-8"])
def test_config_trains_on_mock_data(tmp_path, get_config, model_overrides, image_size,
                                    num_devices):
    config = get_config()
    config.update(dict(image_size=image_size, batch_size=8, eval_batch_size=8, num_train_steps=2,
                       num_workers=0, log_every_steps=1))
    config.model_overrides.update(model_overrides)
    with tfds.testing.mock_data(num_examples=12):
        result = train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:num_devices])
    assert result["step"] == 2 and np.isfinite(result["train_loss"])
    assert 0 <= result["eval_top1"] <= result["eval_top5"] <= 1
    state = Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=1).read_state()
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
    with open(os.path.join(tmp_path, "final_metrics.json")) as f:
        assert json.load(f)["step"] == 2
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


@pytest.mark.slow
def test_default_config_reaches_the_documented_accuracy(tmp_path):
    """The README's run command, as a new user runs it (one CPU device, digits prepared on
    first use), reaches at least 90% eval top-1."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=ROOT, TFDS_DATA_DIR=str(tmp_path / "tfds"))
    workdir = tmp_path / "digits"
    run = subprocess.run(_train_command(workdir), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(workdir / "final_metrics.json") as f:
        final = json.load(f)
    assert final["step"] == 176
    assert final["eval_top1"] >= 0.90
    assert "eval_top1" in run.stderr  # the console progress line


def test_a_nan_gradient_norm_stops_the_run_before_it_is_saved(tmp_path, monkeypatch):
    """A finite loss with a NaN gradient norm from step 2 on: the run stops naming step 2
    and the newest checkpoint is step 1's."""
    from lambda_jax.train import loop
    from lambda_jax.train.steps import train_step

    def nan_from_step_2(state, batch, rng, **kwargs):
        new_state, step_metrics = train_step(state, batch, rng, **kwargs)
        nan = jax.numpy.where(state.step >= 1, jax.numpy.nan, step_metrics["grad_norm"])
        return new_state, {**step_metrics, "grad_norm": nan}

    monkeypatch.setattr(loop, "train_step", nan_from_step_2)
    config = default.get_config()
    config.update(dict(image_size=8, batch_size=8, eval_batch_size=8, num_train_steps=4,
                       log_every_steps=1, checkpoint_every_steps=1, eval_every_steps=4))
    with tfds.testing.mock_data(num_examples=16):
        with pytest.raises(NonFiniteError, match="The training grad_norm is nan at step 2"):
            train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert _kept_steps(str(tmp_path)) == [1]
