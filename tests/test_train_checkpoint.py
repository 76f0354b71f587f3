"""Orbax checkpoints of lambda_jax.train: resume position, retention, bad checkpoints."""

import os
import shutil

import grain
import numpy as np
import pytest

from lambda_jax.train import CheckpointError, Checkpointer

RUN = {"model": "lambda_resnet_tiny", "model_overrides": {}, "num_classes": 10,
       "dataset": "digits"}


def _iterator(seed=0):
    loader = grain.DataLoader(
        data_source=grain.sources.RangeDataSource(0, 100, 1),
        sampler=grain.samplers.IndexSampler(100, grain.sharding.NoSharding(), shuffle=True,
                                            num_epochs=None, seed=seed),
        operations=[grain.transforms.Batch(4)],
        worker_count=0,
    )
    return iter(loader)


def _state(value):
    return {"step": np.array(value, np.int32), "params": {"kernel": np.full((3, 2), value, np.float32)}}


def _save_steps(directory, steps, metrics=None, keep=2):
    checkpointer = Checkpointer(directory, keep=keep, async_saves=True)
    iterator = _iterator()
    for i, step in enumerate(steps):
        next(iterator)
        checkpointer.save(step, _state(step), iterator, RUN,
                          metrics=None if metrics is None else {"eval_top1": metrics[i]})
    checkpointer.wait()
    checkpointer.close()
    return iterator


def test_restore_returns_the_state_and_the_data_position(tmp_path):
    saved_iterator = _save_steps(tmp_path, [1, 2, 3])
    checkpointer = Checkpointer(tmp_path, keep=2)
    assert checkpointer.latest_step() == 3
    iterator = _iterator()
    state = checkpointer.restore(3, _state(0), iterator)
    np.testing.assert_array_equal(state["params"]["kernel"], np.full((3, 2), 3))
    for _ in range(3):
        np.testing.assert_array_equal(next(iterator), next(saved_iterator))
    np.testing.assert_array_equal(checkpointer.read_state()["params"]["kernel"], 3)
    checkpointer.close()


def test_keeps_the_last_n_and_the_best_by_eval_accuracy(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4, 5], metrics=[0.2, 0.9, 0.1, 0.3, 0.4], keep=2)
    assert sorted(int(name) for name in os.listdir(tmp_path) if name.isdigit()) == [2, 4, 5]


def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path):
    _save_steps(tmp_path, [1, 2])
    # What a crash mid-save leaves: a temporary step directory holding part of the files.
    partial = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "2", partial)
    shutil.rmtree(partial / "state")
    checkpointer = Checkpointer(tmp_path, keep=2)
    assert checkpointer.latest_step() == 2
    state = checkpointer.restore(2, _state(0), _iterator())
    np.testing.assert_array_equal(state["params"]["kernel"], 2)
    checkpointer.close()
    assert not partial.exists()  # removed when the manager opened


def test_a_corrupt_checkpoint_names_its_step_and_path(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0garbage")
    checkpointer = Checkpointer(tmp_path, keep=2)
    with pytest.raises(CheckpointError, match=f"step 2 at {tmp_path / '2'}.*Delete that step"):
        checkpointer.restore(2, _state(0), _iterator())
    checkpointer.close()


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    _save_steps(tmp_path, [1])
    checkpointer = Checkpointer(tmp_path, keep=2)
    checkpointer.check_run(RUN)
    with pytest.raises(CheckpointError, match="different run.*model: checkpoint "
                                              "'lambda_resnet_tiny', config 'resnet26_cifar'"):
        checkpointer.check_run({**RUN, "model": "resnet26_cifar"})
    checkpointer.close()
