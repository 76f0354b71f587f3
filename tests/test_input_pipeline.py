"""The accelerator-facing input pipeline: decode with the crop, uint8 batches normalised on
the devices, device prefetching, evaluation workers kept, concurrent preparation."""

import io
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from lambda_jax.data import DevicePrefetcher, EvalBatches, create_datasets
from lambda_jax.data import builtin, input_pipeline, preprocessing
from lambda_jax.train.parallel import DataParallel
from lambda_jax.train.steps import normalize_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(data_dir, **overrides):
    fields = dict(dataset="digits", data_dir=data_dir, image_size=8, batch_size=16,
                  eval_batch_size=120, num_workers=0)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builtin.prepare_digits(data_dir)
    return data_dir


def jpeg(height, width, mode="RGB", quality=95):
    """A smooth JPEG (gradients), so reduced-size decodes stay close to full ones."""
    y, x = np.mgrid[:height, :width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (height + width)],
                      -1).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(encoded, "JPEG", quality=quality)
    return encoded.getvalue()


def test_encoded_crops_equal_the_crops_of_decoded_pixels_at_full_scale():
    # 60x80 to 32: no crop keeps 2 * 32 pixels a side, so no reduced decode happens.
    encoded = jpeg(60, 80)
    pixels = preprocessing.decode(encoded, 3)
    assert preprocessing.image_shape(encoded) == preprocessing.image_shape(pixels) == (60, 80)
    for seed in range(5):
        np.testing.assert_array_equal(
            preprocessing.random_resized_crop(encoded, np.random.default_rng(seed), 32),
            preprocessing.random_resized_crop(pixels, np.random.default_rng(seed), 32))
    np.testing.assert_array_equal(preprocessing.central_crop_and_resize(encoded, 32),
                                  preprocessing.central_crop_and_resize(pixels, 32))


def test_small_crops_of_large_jpegs_decode_at_a_reduced_size(monkeypatch):
    opened = []
    open_lazily = preprocessing._open
    monkeypatch.setattr(preprocessing, "_open",
                        lambda encoded: opened.append(open_lazily(encoded)) or opened[-1])
    encoded = jpeg(384, 512)
    crop = preprocessing.central_crop_and_resize(encoded, 40)
    # The centred crop is 40/72 of 384 = 213 pixels: a 1/4-scale decode keeps 53 >= 40.
    assert opened[-1].size == (128, 96)
    full = preprocessing.central_crop_and_resize(preprocessing.decode(encoded, 3), 40)
    assert crop.shape == full.shape == (40, 40, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(int) - full).mean() < 2.0
    # The whole image to 256 a side: 1/2 scale is 256x192, too small, so none.
    preprocessing.resize(encoded, 256)
    assert opened[-1].size == (512, 384)


def test_encoded_images_decode_to_the_requested_channels():
    grey, colour = jpeg(30, 40, mode="L"), jpeg(30, 40)
    assert preprocessing.random_resized_crop(grey, np.random.default_rng(0), 16).shape == \
        (16, 16, 3)
    assert preprocessing.preprocess_for_eval(colour, augment="imagenet", image_size=16,
                                             channels=1).shape == (16, 16, 1)
    with pytest.raises(ValueError, match="1 or 3 channels, not 2"):
        preprocessing.resize(colour, 16, channels=2)


def test_device_normalisation_equals_the_host_float32_normalisation():
    images = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    mean, std = input_pipeline.IMAGENET_MEAN, input_pipeline.IMAGENET_STD
    # The host transform this replaces: float32 [0, 1], then per-channel statistics.
    host = (images.astype(np.float32) / np.float32(255) - np.asarray(mean, np.float32)) \
        / np.asarray(std, np.float32)
    device = jax.jit(normalize_images, static_argnums=(1, 2, 3))(images, mean, std,
                                                                  jnp.float32)
    np.testing.assert_allclose(device, host, rtol=1e-6, atol=1e-6)
    half = normalize_images(jnp.asarray(images), mean, std, jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), host, rtol=1e-2, atol=1e-2)
    # Floating-point images are taken as already normalised.
    np.testing.assert_array_equal(normalize_images(host, None, None), host)
    with pytest.raises(ValueError, match="pass mean=info.mean, std=info.std"):
        normalize_images(images, None, None)
    with pytest.raises(TypeError, match="uint8 pixels or floating point"):
        normalize_images(images.astype(np.int32), mean, std)


class CountingIterator:
    """Numbers 0, 1, ... with grain's get_state / set_state; counts what it handed out."""

    def __init__(self, limit=None):
        self.position, self.limit = 0, limit

    def __iter__(self):
        return self

    def __next__(self):
        if self.limit is not None and self.position >= self.limit:
            raise StopIteration
        self.position += 1
        return {"x": np.full((2,), self.position - 1)}

    def get_state(self):
        return str(self.position).encode()

    def set_state(self, state):
        self.position = int(state)


def test_prefetcher_places_two_batches_ahead_and_checkpoints_what_it_handed_out():
    placed = []
    source = CountingIterator()

    def put(batch):
        placed.append(int(batch["x"][0]))
        return jax.device_put(batch)

    with DevicePrefetcher(source, put, size=2) as batches:
        first = next(batches)
        assert isinstance(first["x"], jax.Array) and int(first["x"][0]) == 0
        next(batches)
        # Two handed out, two placed ahead and no more.
        wait_until(lambda: len(placed) >= 4)
        time.sleep(0.2)
        assert placed == [0, 1, 2, 3]
        # The checkpointed position is that of the batches handed out, not the thread's.
        assert batches.get_state() == b"2"
        batches.set_state(b"7")
        assert int(next(batches)["x"][0]) == 7 and batches.get_state() == b"8"
    assert [int(b["x"][0]) for b in DevicePrefetcher(CountingIterator(3), jax.device_put)] \
        == [0, 1, 2]


def wait_until(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_peeked_batch_is_handed_out_next_and_counted_only_then():
    with DevicePrefetcher(CountingIterator(limit=2), jax.device_put) as batches:
        assert int(batches.peek()["x"][0]) == 0 and int(batches.peek()["x"][0]) == 0
        assert batches.get_state() == b"0"
        assert int(next(batches)["x"][0]) == 0 and batches.get_state() == b"1"
        assert int(batches.peek()["x"][0]) == 1
        batches.set_state(b"0")  # drops the peeked batch
        assert [int(b["x"][0]) for b in batches] == [0, 1]
        with pytest.raises(StopIteration):
            batches.peek()


def test_prefetcher_reraises_the_errors_of_its_thread():
    def put(batch):
        raise RuntimeError("placement failed")

    batches = DevicePrefetcher(CountingIterator(), put)
    with pytest.raises(RuntimeError, match="placement failed"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)
    with pytest.raises(ValueError, match="size must be at least 1"):
        DevicePrefetcher(CountingIterator(), put, size=0)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_prefetched_training_batches_resume_where_the_loop_stopped(digits_dir, mode):
    parallel = DataParallel(mode, jax.devices()[:2])
    config = make_config(digits_dir, augment="cifar")
    loader = create_datasets(config, seed=1)[0]
    with DevicePrefetcher(iter(loader), parallel.shard_batch) as batches:
        for _ in range(3):
            batch = next(batches)
        state = batches.get_state()
        expected = [np.asarray(next(batches)["image"]) for _ in range(2)]
    # The loop's layout: [devices, per_device, ...] under pmap, a global array otherwise.
    shape = (2, 8, 8, 8, 1) if mode == "pmap" else (16, 8, 8, 1)
    assert batch["image"].shape == shape and batch["image"].dtype == jnp.uint8
    resumed = iter(create_datasets(config, seed=1)[0])
    resumed.set_state(state)
    for host_batch, device_batch in zip(take(resumed, 2), expected):
        np.testing.assert_array_equal(host_batch["image"], device_batch.reshape(16, 8, 8, 1))


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_evaluation_passes_restart_at_the_first_batch(digits_dir):
    # 360 test digits, 120 a batch: 3 batches a pass.
    eval_fn = create_datasets(make_config(digits_dir), seed=0)[1]
    assert isinstance(eval_fn, EvalBatches) and len(eval_fn) == 3
    first = list(eval_fn())
    iterator = eval_fn._iterator
    partial = eval_fn()
    next(partial)  # a pass left unfinished
    second = list(eval_fn())
    assert eval_fn._iterator is iterator  # the same iterator serves every pass
    assert len(first) == len(second) == 3
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    # Read apart from the passes, which it does not move.
    alone = eval_fn.first_batch()
    for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(alone[key], first[0][key])
    assert [batch["label"].tolist() for batch in eval_fn()] == \
        [batch["label"].tolist() for batch in first]


@pytest.mark.slow
def test_evaluation_keeps_its_worker_processes(digits_dir):
    in_process = list(create_datasets(make_config(digits_dir), seed=0)[1]())
    eval_fn = create_datasets(make_config(digits_dir, num_workers=1), seed=0)[1]
    before = {p.pid for p in multiprocessing.active_children()}
    try:
        passes, workers = [], []
        for _ in range(3):
            passes.append(list(eval_fn()))
            workers.append({p.pid for p in multiprocessing.active_children()} - before)
        assert len(workers[0]) == 1 and workers[0] == workers[1] == workers[2]
        for batches in passes:
            for batch, expected in zip(batches, in_process, strict=True):
                np.testing.assert_array_equal(batch["image"], expected["image"])
    finally:
        eval_fn.close()
    assert not {p.pid for p in multiprocessing.active_children()} - before


PREPARE = textwrap.dedent("""
    import os, sys, time
    from lambda_jax.data import builtin
    data_dir, barrier, index, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # Imports take seconds: all processes start preparing once every one has imported.
    open(os.path.join(barrier, index), "w").close()
    while len(os.listdir(barrier)) < count:
        time.sleep(0.01)
    builder, prepared_here = builtin.prepare_digits(data_dir)
    source = builder.as_data_source(split="train")
    labels = [source[i]["label"] for i in range(len(source))]
    print("RESULT", int(prepared_here), len(source), len(builder.as_data_source(split="test")),
          sum(labels))
""")


def test_concurrent_processes_prepare_the_digits_once(tmp_path):
    data_dir, barrier = str(tmp_path / "fresh"), tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    processes = [subprocess.Popen(
        [sys.executable, "-c", PREPARE, data_dir, str(barrier), str(index), "2"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(2)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        results.append([line.split()[1:] for line in stdout.splitlines()
                        if line.startswith("RESULT")][0])
    prepared_here = sorted(int(r[0]) for r in results)
    assert prepared_here == [0, 1]
    # Every process read the whole set: 1437 train and 360 test examples.
    assert len({tuple(r[1:]) for r in results}) == 1 and results[0][1:3] == ["1437", "360"]
    assert not [name for name in os.listdir(os.path.join(data_dir, "digits"))
                if name.startswith("incomplete")]
