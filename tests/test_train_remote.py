"""A gs:// workdir end to end, and the throughput figure without evaluation and saves.

No bucket is reachable here. The small files (config.json, final_metrics.json, TensorBoard
events, the checkpoint bookkeeping) go through ``etils.epath``, mocked to map ``gs://bucket``
onto a local directory. Orbax writes arrays through tensorstore's own GCS driver, which the
mock does not see: the test checks that Orbax's manager receives the gs:// URL unchanged and
that tensorstore would be given a GCS spec for it, then lets that one manager write to the
local mirror so the run can finish.
"""

import functools
import json
import os

import jax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.serialization import tensorstore_utils

from configs import default
from lambda_jax.data import DevicePrefetcher
from lambda_jax.train import Checkpointer, metrics as metrics_lib
from lambda_jax.train import loop

WORKDIR = "gs://bucket/run"
BATCH = 8
STEPS = 2


class FakeClock:
    """Seconds that pass only when the test says: one per batch drawn, 500 per save."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory):
    """A 2-step run with --workdir=gs://bucket/run: its result, the local mirror of the
    bucket, the gs:// paths epath saw and the directories Orbax's managers received."""
    mirror = tmp_path_factory.mktemp("mirror")
    seen, managers = [], []

    def local(path):
        path = str(path)
        if path.startswith("gs://"):
            seen.append(path)
            return str(mirror / path[len("gs://"):])
        return path

    def one_path(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two_paths(original, src, dst, *args, **kwargs):
        return original(local(src), local(dst), *args, **kwargs)

    real_manager = ocp.CheckpointManager

    def recording_manager(directory, *args, **kwargs):
        managers.append(str(directory))
        return real_manager(local(directory), *args, **kwargs)

    clock = FakeClock()
    real_next, real_save = DevicePrefetcher.__next__, Checkpointer.save

    def next_batch(self):
        clock.now += 1.0
        return real_next(self)

    def save(self, *args, **kwargs):
        clock.now += 500.0
        return real_save(self, *args, **kwargs)

    config = default.get_config()
    config.update(dict(image_size=8, batch_size=BATCH, eval_batch_size=8, num_train_steps=STEPS,
                       log_every_steps=1, eval_every_steps=1, checkpoint_every_steps=1,
                       async_checkpoints=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ocp, "CheckpointManager", recording_manager)
        patch.setattr(DevicePrefetcher, "__next__", next_batch)
        patch.setattr(Checkpointer, "save", save)
        patch.setattr(metrics_lib, "Throughput",
                      functools.partial(metrics_lib.Throughput, clock=clock))
        with epath_testing.mock_epath(
                **{name: one_path for name in ("exists", "glob", "isdir", "listdir", "makedirs",
                                               "mkdir", "open", "remove", "rmtree", "stat",
                                               "walk")},
                **{name: two_paths for name in ("copy", "rename", "replace")}):
            with tfds.testing.mock_data(num_examples=16):
                result = loop.train_and_evaluate(config, WORKDIR, devices=jax.devices()[:1])
    return result, mirror / "bucket" / "run", seen, managers


def test_a_gs_workdir_gets_every_file_through_epath(remote_run):
    result, mirror, seen, _ = remote_run
    assert result["step"] == STEPS
    assert json.loads((mirror / "final_metrics.json").read_text())["step"] == STEPS
    assert json.loads((mirror / "config.json").read_text())["batch_size"] == BATCH
    assert any(p.name.startswith("events.out.tfevents") for p in mirror.iterdir())
    for name in ("config.json", "final_metrics.json", "checkpoints"):
        assert f"{WORKDIR}/{name}" in seen
    assert sorted(int(p.name) for p in (mirror / "checkpoints").iterdir()) == [1, 2]
    # No local path was made from the URL (os.path.abspath would give <cwd>/gs:/bucket).
    assert not os.path.exists("gs:")


def test_orbax_receives_the_gs_url_unchanged(remote_run):
    _, _, _, managers = remote_run
    assert managers == [f"{WORKDIR}/checkpoints"]
    spec = tensorstore_utils.build_kvstore_tspec(f"{managers[0]}/2/state")
    assert spec["base"] == {"driver": "gcs", "bucket": "bucket", "path": "run/checkpoints/2/state"}


def test_examples_per_second_leaves_out_evaluation_and_saves(remote_run):
    """Each step draws one batch (1 s on the fake clock); each evaluation draws eval batches
    and each save takes 500 s: only the training batch counts."""
    result, mirror, _, _ = remote_run
    assert result["examples_per_second"] == pytest.approx(BATCH / 1.0)
    final = json.loads((mirror / "final_metrics.json").read_text())
    assert final["examples_per_second"] == pytest.approx(BATCH / 1.0)


def test_throughput_counts_only_time_outside_paused_blocks():
    clock = FakeClock()
    throughput = metrics_lib.Throughput(10, clock=clock)
    clock.now = 4.0
    with throughput.paused():
        clock.now = 100.0
    clock.now = 104.0
    assert throughput.examples_per_second(12, batch_size=16) == pytest.approx(2 * 16 / 8.0)
    clock.now = 106.0  # the next interval starts where the last one ended, nothing paused
    assert throughput.examples_per_second(13, batch_size=16) == pytest.approx(16 / 2.0)
