"""Resuming the data position on another number of processes and data workers."""

import json

import grain.python as grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from lambda_jax.data import create_datasets
from lambda_jax.train import data_position

NUM_RECORDS, GLOBAL_BATCH = 40, 8


def _loader(shard_index, shard_count):
    """The training loader of process ``shard_index`` of ``shard_count`` on mock data."""
    config = default.get_config()
    config.update(dict(dataset="mnist", image_size=4, batch_size=GLOBAL_BATCH,
                       eval_batch_size=GLOBAL_BATCH, augment="cifar"))
    with tfds.testing.mock_data(num_examples=NUM_RECORDS):
        loader, eval_fn, _ = create_datasets(
            config, seed=3,
            shard_options=grain.ShardOptions(shard_index, shard_count, drop_remainder=False))
    eval_fn.close()
    return loader


def _examples(batches):
    """One global batch as a sorted list of its examples' bytes (order within it aside)."""
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    return sorted(image.tobytes() + bytes([label]) for image, label in zip(images, labels))


def _run(shard_count, steps):
    """Each process's iterator after ``steps`` steps, and the examples of each global batch."""
    iterators = [iter(_loader(i, shard_count)) for i in range(shard_count)]
    batches = [_examples([next(it) for it in iterators]) for _ in range(steps)]
    return iterators, batches


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 4), (4, 2)])
def test_a_position_saved_by_some_processes_continues_on_others(saved, resumed):
    """The training loaders (random crops and flips): P processes read 3 steps; Q processes
    restored from their states read the global batches, augmented alike, that an
    uninterrupted P-process run reads next (past an epoch)."""
    iterators, _ = _run(saved, 3)
    states = [json.loads(it.get_state()) for it in iterators]
    assert data_position.examples_read(states) == 3 * GLOBAL_BATCH
    _, reference = _run(saved, 12)
    moved = []
    for i in range(resumed):
        iterator = iter(_loader(i, resumed))
        fresh = json.loads(iterator.get_state())
        state = data_position.state_at(fresh, 3 * GLOBAL_BATCH, GLOBAL_BATCH, i, resumed)
        iterator.set_state(json.dumps(state).encode())
        moved.append(iterator)
    for step in range(3, 12):
        assert _examples([next(it) for it in moved]) == reference[step], f"step {step}"


@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("steps", [0, 1, 5, 7])
def test_examples_read_inverts_state_at(workers, steps):
    """With any worker count, the state built for a step count reads back as its examples."""
    for count in (1, 2, 4):
        states = []
        for i in range(count):
            template = {"last_seen_indices": {str(j): -1 for j in range(max(workers, 1))},
                        "last_worker_index": -1, "worker_count": workers}
            states.append(data_position.state_at(template, steps * GLOBAL_BATCH, GLOBAL_BATCH,
                                                 i, count))
        assert data_position.examples_read(states) == steps * GLOBAL_BATCH


def test_a_position_that_is_not_whole_steps_is_refused():
    template = {"last_seen_indices": {"0": -1}, "last_worker_index": -1, "worker_count": 0}
    with pytest.raises(ValueError, match=r"\(12 examples\) is not a whole number of steps of "
                                         r"config.batch_size=8"):
        data_position.state_at(template, 12, GLOBAL_BATCH, 0, 2)
