"""Orbax checkpoints of lambda_jax.train: resume position, retention, integrity, fallback."""

import json
import os
import shutil

import grain
import numpy as np
import pytest

from lambda_jax.train import CheckpointError, Checkpointer, DamagedCheckpointError, NonFiniteError
from lambda_jax.train.checkpoint import DAMAGED_DIR, read_weights

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
    with pytest.raises(DamagedCheckpointError, match=f"step 2 at {tmp_path / '2'} is damaged"):
        checkpointer.restore(2, _state(0), _iterator())
    checkpointer.close()


def _flip_one_bit(directory):
    """Flips the lowest bit of the middle byte of the largest file under ``directory``."""
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    return largest


def _big_state(value):
    rng = np.random.default_rng(value)
    return {"step": np.array(value, np.int32),
            "params": {"kernel": rng.standard_normal((64, 64)).astype(np.float32)}}


def test_a_flipped_bit_is_found_and_the_newest_intact_checkpoint_restored(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory, keep=3)
    iterator = _iterator()
    for step in (1, 2, 3):
        next(iterator)
        checkpointer.save(step, _big_state(step), iterator, RUN)
    checkpointer.close()
    flipped = _flip_one_bit(directory / "3")

    checkpointer = Checkpointer(directory, keep=3)
    with pytest.raises(DamagedCheckpointError, match=f"step 3 at {directory / '3'} is damaged: "
                                                     "the checksums of 1 arrays do not match"):
        checkpointer.restore(3, _big_state(0), _iterator())
    restored_iterator = _iterator()
    step, state = checkpointer.restore_latest_intact(_big_state(0), restored_iterator)
    assert step == 2 and checkpointer.all_steps() == [1, 2]
    np.testing.assert_array_equal(state["params"]["kernel"], _big_state(2)["params"]["kernel"])
    checkpointer.close()
    assert f"step 3 at {directory / '3'} is damaged" in caplog.text
    # Moved aside, never deleted: the flipped file is still there.
    kept = tmp_path / DAMAGED_DIR / "3" / os.path.relpath(flipped, directory / "3")
    assert kept.exists() and not (directory / "3").exists()


def test_a_changed_data_position_is_found(tmp_path):
    _save_steps(tmp_path, [1, 2])
    data_file = tmp_path / "2" / "data" / "process_0-of-1.json"
    position = json.loads(data_file.read_text())
    position["last_seen_indices"]["0"] += 4  # what one flipped bit in the digit 7 gives
    data_file.write_text(json.dumps(position))
    checkpointer = Checkpointer(tmp_path, keep=2)
    with pytest.raises(DamagedCheckpointError, match=r"step 2 .* the checksum of .*process_0-of-1"):
        checkpointer.restore(2, _state(0), _iterator())
    checkpointer.close()


def test_a_checkpoint_without_checksums_is_damaged(tmp_path):
    _save_steps(tmp_path, [1, 2])
    shutil.rmtree(tmp_path / "2" / "checksums")
    checkpointer = Checkpointer(tmp_path, keep=2)
    with pytest.raises(DamagedCheckpointError, match="step 2 .* has no checksums"):
        checkpointer.restore(2, _state(0), _iterator())
    checkpointer.close()


def test_directories_that_are_not_checkpoints_do_not_block(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [1, 2])
    (directory / "999").mkdir()
    (directory / "notes").mkdir()
    checkpointer = Checkpointer(directory, keep=2)
    assert checkpointer.all_steps() == [1, 2]
    step, _ = checkpointer.restore_latest_intact(_state(0), _iterator())
    assert step == 2
    checkpointer.close()
    assert (tmp_path / DAMAGED_DIR / "999").is_dir() and (directory / "notes").is_dir()
    assert "999 is named like a step but holds no checkpoint" in caplog.text
    assert "Skipping" in caplog.text and "notes: not a step directory" in caplog.text


def test_a_state_of_another_structure_is_refused_not_set_aside(tmp_path):
    _save_steps(tmp_path, [1])
    checkpointer = Checkpointer(tmp_path, keep=2)
    template = {"step": np.array(0, np.int32), "params": {"kernel": np.zeros((4, 2), np.float32)}}
    with pytest.raises(CheckpointError, match=r"params/kernel: checkpoint float32\[3,2\], "
                                              r"config float32\[4,2\]") as error:
        checkpointer.restore(1, template, _iterator())
    assert not isinstance(error.value, DamagedCheckpointError)
    checkpointer.close()
    assert (tmp_path / "1").is_dir()


def test_a_non_finite_state_is_never_saved(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=2, async_saves=False)
    state = _state(1)
    state["params"]["kernel"][0, 1] = np.nan
    with pytest.raises(NonFiniteError, match="Not saving step 1: non-finite values in "
                                             "params/kernel"):
        checkpointer.save(1, state, _iterator(), RUN)
    checkpointer.close()
    assert checkpointer.latest_step() is None and not (tmp_path / "1").exists()


def test_the_best_checkpoint_is_kept_after_a_restart(tmp_path):
    _save_steps(tmp_path, [1, 2], metrics=[0.9, 0.1], keep=1)
    checkpointer = Checkpointer(tmp_path, keep=1)
    iterator = _iterator()
    checkpointer.save(3, _state(3), iterator, RUN)  # a stop between evaluations: no metrics
    checkpointer.save(4, _state(4), iterator, RUN, metrics={"eval_top1": 0.2})
    checkpointer.close()
    assert sorted(int(name) for name in os.listdir(tmp_path) if name.isdigit()) == [1, 4]


def test_weights_for_fine_tuning_are_read_from_a_workdir_or_a_step(tmp_path):
    _save_steps(tmp_path / "checkpoints", [1, 2])
    template = {"params": {"kernel": np.zeros((3, 2), np.float32)}}
    np.testing.assert_array_equal(read_weights(tmp_path, template)["params"]["kernel"], 2)
    step_one = read_weights(tmp_path / "checkpoints" / "1", template)
    np.testing.assert_array_equal(step_one["params"]["kernel"], 1)
    with pytest.raises(CheckpointError, match="init_from=.*params/bias"):
        read_weights(tmp_path, {"params": {**template["params"], "bias": np.zeros(2)}})
