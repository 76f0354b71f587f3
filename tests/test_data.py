"""Input pipelines: the built-in digits, TFDS mock data, sharding, resume, errors."""

import collections
import io
import itertools
import math

import grain.python as grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from lambda_jax.data import DatasetInfo, create_datasets
from lambda_jax.data import builtin, input_pipeline, preprocessing


def make_config(**overrides):
    fields = dict(dataset="digits", data_dir=None, image_size=16, batch_size=32,
                  eval_batch_size=64, num_workers=0)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A data dir holding the prepared digits (prepared once for the module)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    create_datasets(make_config(data_dir=str(data_dir)), seed=0)
    return str(data_dir)


def image_key(image: np.ndarray) -> bytes:
    return np.ascontiguousarray(image).tobytes()


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def eval_keys_of_split(config, data_dir) -> collections.Counter:
    """Every example of the digits test split, preprocessed for evaluation directly."""
    source = builtin.Digits(data_dir=data_dir).as_data_source(split="test")
    return collections.Counter(
        image_key(preprocessing.preprocess_for_eval(
            source[i]["image"], augment="none", image_size=config.image_size, channels=1))
        for i in range(len(source)))


def test_digits_prepare_offline_into_data_dir(digits_dir):
    train_loader, eval_fn, info = create_datasets(make_config(data_dir=digits_dir), seed=0)

    assert info == DatasetInfo(num_classes=10, image_size=16, channels=1,
                               num_train_examples=1437, num_eval_examples=360,
                               mean=input_pipeline.DIGITS_MEAN, std=input_pipeline.DIGITS_STD)
    batch = next(iter(train_loader))
    # uint8 pixels: the steps normalise on the devices with info.mean and info.std.
    assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert set(batch["label"]) <= set(range(10))
    # Normalised with the digits' statistics the batch is roughly zero-mean.
    normalized = (batch["image"] / 255 - info.mean[0]) / info.std[0]
    assert abs(float(normalized.mean())) < 0.3


def test_digits_split_is_fixed_and_matches_sklearn(digits_dir):
    builder = builtin.Digits(data_dir=digits_dir)
    digits = load_digits()
    split_indices = builtin.digits_split_indices()
    assert np.array_equal(split_indices["test"], builtin.digits_split_indices()["test"])
    assert len(np.intersect1d(split_indices["train"], split_indices["test"])) == 0
    for split, expected in split_indices.items():
        source = builder.as_data_source(split=split)
        examples = [source[i] for i in range(len(source))]
        indices = np.array([example["index"] for example in examples])
        assert np.array_equal(np.sort(indices), expected)
        for example in examples[:50]:
            index = example["index"]
            assert example["label"] == digits.target[index]
            assert np.array_equal(example["image"][..., 0],
                                  np.round(digits.images[index] * 255 / 16).astype(np.uint8))
    # Every class is in the test split.
    assert set(digits.target[split_indices["test"]]) == set(range(10))


@pytest.mark.parametrize("num_hosts,eval_batch_size", [(1, 64), (3, 48)])
def test_eval_counts_every_example_once(digits_dir, num_hosts, eval_batch_size):
    config = make_config(data_dir=digits_dir, batch_size=48, eval_batch_size=eval_batch_size)
    host_batch = eval_batch_size // num_hosts
    counted = collections.Counter()
    batches_per_host = []
    for host in range(num_hosts):
        _, eval_fn, _ = create_datasets(
            config, seed=0, shard_options=grain.ShardOptions(host, num_hosts))
        batches = list(eval_fn())
        batches_per_host.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (host_batch, 16, 16, 1)
            assert batch["mask"].shape == (host_batch,) and batch["mask"].dtype == np.float32
            assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
            counted.update(image_key(image) for image, mask in zip(batch["image"], batch["mask"])
                           if mask == 1)
        # A fresh iterator starts again from the first batch.
        assert np.array_equal(next(eval_fn())["image"], batches[0]["image"])
    assert sum(counted.values()) == 360
    assert counted == eval_keys_of_split(config, digits_dir)
    # Every host runs the same number of evaluation steps (collectives stay in step).
    assert len(set(batches_per_host)) == 1
    assert batches_per_host[0] == math.ceil(math.ceil(360 / num_hosts) / host_batch)


def test_train_repeats_forever_in_a_new_order_each_epoch(digits_dir):
    # 1437 = 3 * 479: three batches per epoch, none dropped at the epoch boundary.
    loader, _, _ = create_datasets(
        make_config(data_dir=digits_dir, image_size=8, batch_size=479), seed=0)
    labels = np.concatenate([batch["label"] for batch in take(iter(loader), 9)])
    epochs = labels.reshape(3, 1437)
    counts = np.bincount(load_digits().target[builtin.digits_split_indices()["train"]])
    for epoch in epochs:
        np.testing.assert_array_equal(np.bincount(epoch, minlength=10), counts)
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_train_shards_are_disjoint_and_cover_the_split(digits_dir):
    num_hosts, host_batch = 3, 16
    config = make_config(data_dir=digits_dir, batch_size=num_hosts * host_batch, eval_batch_size=48)
    everything = collections.Counter()
    for host in range(num_hosts):
        options = grain.ShardOptions(host, num_hosts)
        loader, _, _ = create_datasets(config, seed=7, shard_options=options)
        start, end = input_pipeline.shard_bounds(1437, options)
        batches = itertools.islice(iter(loader), math.ceil((end - start) / host_batch))
        images = np.concatenate([batch["image"] for batch in batches])[:end - start]
        # The first epoch of a host is its whole shard, each example once.
        everything.update(image_key(image) for image in images)
    source = builtin.Digits(data_dir=digits_dir).as_data_source(split="train")
    expected = collections.Counter(
        image_key(preprocessing.preprocess_for_train(
            source[i]["image"], np.random.default_rng(0), augment="none", image_size=16,
            channels=1))
        for i in range(len(source)))
    assert everything == expected


def test_same_seed_same_batches_and_resume(digits_dir, tmp_path):
    # 'cifar' augmentation is random: the batches depend on the per-record generators.
    config = make_config(data_dir=digits_dir, augment="cifar", batch_size=16)
    first = take(iter(create_datasets(config, seed=3)[0]), 3)
    assert_same_batches(first, take(iter(create_datasets(config, seed=3)[0]), 3))
    other = take(iter(create_datasets(config, seed=4)[0]), 1)
    assert not np.array_equal(first[0]["image"], other[0]["image"])

    iterator = iter(create_datasets(config, seed=3)[0])
    take(iterator, 2)
    state = iterator.get_state()
    checkpointer = ocp.Checkpointer(grain.PyGrainCheckpointHandler())
    checkpointer.save(tmp_path / "data", args=grain.PyGrainCheckpointSave(iterator))
    expected = take(iterator, 2)

    resumed = iter(create_datasets(config, seed=3)[0])
    resumed.set_state(state)
    assert_same_batches(take(resumed, 2), expected)

    restored = iter(create_datasets(config, seed=3)[0])
    checkpointer.restore(tmp_path / "data", args=grain.PyGrainCheckpointRestore(restored))
    assert_same_batches(take(restored, 2), expected)


@pytest.mark.slow
def test_worker_processes_give_the_in_process_batches_and_resume(digits_dir):
    config = make_config(data_dir=digits_dir, augment="cifar", batch_size=16, eval_batch_size=96)
    in_process_loader, in_process_eval_fn, _ = create_datasets(config, seed=3)
    in_process = take(iter(in_process_loader), 4)
    config.num_workers = 1
    loader, eval_fn, _ = create_datasets(config, seed=3)
    iterator = iter(loader)
    assert_same_batches(take(iterator, 2), in_process[:2])
    state = iterator.get_state()
    resumed = iter(create_datasets(config, seed=3)[0])
    resumed.set_state(state)
    assert_same_batches(take(resumed, 2), in_process[2:])
    for batch, expected in zip(eval_fn(), in_process_eval_fn(), strict=True):
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["mask"], expected["mask"])


@pytest.mark.parametrize("dataset,image_size,channels,num_classes", [
    ("cifar10", 32, 3, 10),
    ("cifar100", 24, 3, 100),
    ("imagenet2012", 40, 3, 1000),
    ("imagenette", 40, 3, 10),
])
def test_tfds_mock_data_batches(dataset, image_size, channels, num_classes):
    config = make_config(dataset=dataset, image_size=image_size, batch_size=8,
                         eval_batch_size=6)
    with tfds.testing.mock_data(num_examples=20):
        train_loader, eval_fn, info = create_datasets(config, seed=0)
        batches = take(iter(train_loader), 3)
        eval_batches = list(eval_fn())
    defaults = input_pipeline.DATASET_DEFAULTS[dataset]
    assert info == DatasetInfo(num_classes=num_classes, image_size=image_size,
                               channels=channels, num_train_examples=20,
                               num_eval_examples=20, mean=defaults.mean, std=defaults.std)
    for batch in batches:
        assert batch["image"].shape == (8, image_size, image_size, channels)
        assert batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
        assert ((0 <= batch["label"]) & (batch["label"] < num_classes)).all()
    assert len(eval_batches) == 4
    assert all(b["image"].shape == (6, image_size, image_size, channels) for b in eval_batches)
    assert sum(float(b["mask"].sum()) for b in eval_batches) == 20


class VariableSizeJpegs(tfds.core.GeneratorBasedBuilder):
    """A prepared TFDS data set like ImageNet's: JPEGs of many sizes, encoded with PIL."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=5),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 12), "test": self._generate_examples(1, 7)}

    def _generate_examples(self, seed, count):
        rng = np.random.default_rng(seed)
        for key in range(count):
            shape = (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3)
            encoded = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(encoded, "JPEG")
            yield key, {"image": encoded.getvalue(), "label": key % 5}


def test_prepared_tfds_data_set_with_jpegs_of_any_size(tmp_path):
    builder = VariableSizeJpegs(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    config = make_config(dataset="variable_size_jpegs", data_dir=str(tmp_path), image_size=24,
                         batch_size=4, eval_batch_size=4)
    train_loader, eval_fn, info = create_datasets(config, seed=0)

    assert info == DatasetInfo(num_classes=5, image_size=24, channels=3, num_train_examples=12,
                               num_eval_examples=7, mean=input_pipeline.IMAGENET_MEAN,
                               std=input_pipeline.IMAGENET_STD)
    batch = next(iter(train_loader))
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
    eval_batches = list(eval_fn())
    assert [float(b["mask"].sum()) for b in eval_batches] == [4.0, 3.0]
    # Unknown names default to ImageNet-style evaluation: the central crop of the decoded
    # image (TFDS's own decoding here, skipped by the pipeline).
    source = builder.as_data_source(split="test")
    first = preprocessing.preprocess_for_eval(
        source[0]["image"], augment="imagenet", image_size=24, channels=3)
    np.testing.assert_array_equal(eval_batches[0]["image"][0], first)


def test_missing_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        create_datasets(make_config(dataset="cifar10", data_dir=str(tmp_path)), seed=0)
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert "tfds build cifar10 --file_format=array_record" in message
    assert "--config.data_dir" in message and "downloads/manual" not in message
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
        create_datasets(make_config(dataset="imagenet2012", data_dir=str(tmp_path)), seed=0)


@pytest.mark.parametrize("overrides,shards,match", [
    (dict(dataset="no_such_dataset"), 1, "Unknown data set 'no_such_dataset'"),
    (dict(batch_size=10), 4, "batch_size=10 must be a positive multiple of the number of hosts"),
    (dict(eval_batch_size=2), 4, "eval_batch_size=2 must be a positive multiple"),
    (dict(image_size=0), 1, "image_size must be a positive integer"),
    (dict(augment="autoaugment"), 1, "augment must be one of"),
    (dict(num_workers=-1), 1, "num_workers must be >= 0"),
])
def test_bad_config_errors(digits_dir, overrides, shards, match):
    config = make_config(data_dir=digits_dir, **overrides)
    with pytest.raises(ValueError, match=match):
        create_datasets(config, seed=0, shard_options=grain.ShardOptions(0, shards))


def test_not_a_classification_data_set():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match="needs an 'image' and a class 'label'"):
            create_datasets(make_config(dataset="lfw"), seed=0)


@pytest.mark.parametrize("seed", [-1, 2**32, 0.5])
def test_bad_seed(digits_dir, seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        create_datasets(make_config(data_dir=digits_dir), seed=seed)


def test_unknown_split_error(digits_dir):
    with pytest.raises(ValueError, match="no split 'validation'.*'test', 'train'"):
        create_datasets(make_config(data_dir=digits_dir, eval_split="validation"), seed=0)


@pytest.mark.parametrize("shape", [(300, 200, 3), (17, 47, 3), (5, 5, 3), (8, 8, 1), (9, 6, 2)])
def test_preprocessing_steps_give_the_requested_size(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    channels = shape[-1]
    for augment in input_pipeline.AUGMENTATIONS:
        train = preprocessing.preprocess_for_train(image, rng, augment=augment, image_size=24,
                                                   channels=channels)
        evaluated = preprocessing.preprocess_for_eval(image, augment=augment, image_size=24,
                                                      channels=channels)
        for output in (train, evaluated):
            assert output.shape == (24, 24, channels) and output.dtype == np.uint8


def test_random_steps_are_deterministic_given_the_generator():
    image = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    crops = [preprocessing.random_resized_crop(image, np.random.default_rng(5), 32)
             for _ in range(2)]
    np.testing.assert_array_equal(*crops)
    different = preprocessing.random_resized_crop(image, np.random.default_rng(6), 32)
    assert not np.array_equal(crops[0], different)
    flips = {preprocessing.random_flip(image, np.random.default_rng(seed))[0, 0].tobytes()
             for seed in range(20)}
    assert flips == {image[0, 0].tobytes(), image[0, -1].tobytes()}


def test_central_crop_keeps_the_centre():
    # A bright square in the centre of a dark image stays centred after the crop.
    image = np.zeros((256, 320, 3), np.uint8)
    image[108:148, 140:180] = 255
    crop = preprocessing.central_crop_and_resize(image, 224)
    assert crop.shape == (224, 224, 3)
    ys, xs = np.nonzero(crop[..., 0] > 128)
    assert abs(ys.mean() - 111.5) < 1.5 and abs(xs.mean() - 111.5) < 1.5


def test_pad_and_random_crop_shifts_by_at_most_the_padding():
    image = np.arange(1, 65, dtype=np.uint8).reshape(8, 8, 1)
    for seed in range(10):
        shifted = preprocessing.pad_and_random_crop(image, np.random.default_rng(seed), 4)
        assert shifted.shape == image.shape
        kept = shifted[shifted > 0]
        assert len(kept) >= 16  # at least a 4x4 block of the original remains
        assert np.all(np.diff(kept.reshape(-1)) > 0)  # in order, no wrap-around
