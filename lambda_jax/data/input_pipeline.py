"""Input pipelines: TFDS array_record sources read by grain, sharded per host.

`create_datasets(config, seed=...)` builds the training loader and the evaluation
iterator of one data set. Config fields it reads (an `ml_collections.ConfigDict`):

| field | meaning |
|---|---|
| `dataset` | 'digits' (built in, prepared offline on first use), 'cifar10', 'cifar100', 'imagenet2012', 'imagenette', or any TFDS image-classification name with 'image' and 'label' features (a config may follow: 'imagenette/320px-v2') |
| `data_dir` | TFDS data directory; None = TFDS's default (`TFDS_DATA_DIR` or ~/tensorflow_datasets) |
| `image_size` | height and width of the model's input, >= 1 |
| `batch_size` | global training batch, divisible by the number of hosts |
| `eval_batch_size` | global evaluation batch, divisible by the number of hosts |
| `augment` | optional. 'imagenet': Inception-style random resized crop and flip for training, central crop for evaluation; 'cifar': pad 4, random crop, flip; 'none': resize only. Default per data set (below) |
| `num_workers` | optional, default 0. grain worker processes per host; 0 preprocesses in the training process |
| `train_split`, `eval_split` | optional TFDS split names. Default per data set (below) |

Defaults per data set (split names, augmentation, per-channel mean and std of the
[0, 1] pixels): 'digits' train/test, 'none'; 'cifar10' and 'cifar100' train/test,
'cifar', their own statistics; 'imagenet2012' and 'imagenette' train/validation,
'imagenet', ImageNet's statistics. Any other name: train/test (validation when the
prepared data set has no test split), 'imagenet', ImageNet's statistics for three
channels and 0.5/0.5 otherwise.

TFDS data sets are read with `tfds.data_source`, so they must be prepared as
array_record files (`tfds build NAME --file_format=array_record --data_dir=DIR`); no
TensorFlow is needed to train. TFDS's image decoding is skipped: the JPEGs are decoded
in the transforms, together with the crop (`preprocessing.crop_and_resize`). Batches
hold uint8 images; the jitted steps normalise them on the devices with
`DatasetInfo.mean` and `DatasetInfo.std`.

Training reads one shuffled order of the whole split, the same for any number of hosts:
host `i` of `n` takes its positions `i, i + n, i + 2n, ...`, and each example's augmentation
is seeded by its position. So the examples of a global step do not depend on the host count,
and a run resumed on another number of hosts continues at the same global example
(`lambda_jax.train.data_position`).
"""

import dataclasses
import math
import numbers
from typing import Iterator

import chex
from absl import flags
import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds

from lambda_jax.data import builtin, preprocessing

AUGMENTATIONS = ("imagenet", "cifar", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Statistics of the grey-scale digits (the 1437 training images, pixels in [0, 1]).
DIGITS_MEAN = (0.3056,)
DIGITS_STD = (0.3761,)


@dataclasses.dataclass(frozen=True)
class DatasetDefaults:
    """What a data set uses when the config leaves a field out."""

    train_split: str
    eval_split: str
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_DEFAULTS = {
    "digits": DatasetDefaults("train", "test", "none", DIGITS_MEAN, DIGITS_STD),
    "cifar10": DatasetDefaults("train", "test", "cifar", (0.4914, 0.4822, 0.4465),
                               (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetDefaults("train", "test", "cifar", (0.5071, 0.4865, 0.4409),
                                (0.2673, 0.2564, 0.2762)),
    "imagenet2012": DatasetDefaults("train", "validation", "imagenet", IMAGENET_MEAN,
                                    IMAGENET_STD),
    "imagenette": DatasetDefaults("train", "validation", "imagenet", IMAGENET_MEAN,
                                  IMAGENET_STD),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the training loop need to know about a data set."""

    num_classes: int
    image_size: int
    channels: int
    num_train_examples: int
    num_eval_examples: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _image(example):
    """The example's image: uint8 [height, width, channels], or its encoded bytes."""
    image = example["image"]
    if preprocessing.is_encoded(image):
        return image
    image = np.asarray(image)
    return image[..., None] if image.ndim == 2 else image


@dataclasses.dataclass(frozen=True)
class TrainPreprocess(grain.RandomMapTransform):
    """A TFDS example -> {'image': uint8 [size, size, channels], 'label': int32 []}."""

    augment: str
    image_size: int
    channels: int

    def random_map(self, example, rng: np.random.Generator):
        image = preprocessing.preprocess_for_train(
            _image(example), rng, augment=self.augment, image_size=self.image_size,
            channels=self.channels)
        chex.assert_shape(image, (self.image_size, self.image_size, self.channels))
        return {"image": image, "label": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.MapTransform):
    """A padded example -> {'image': uint8 [size, size, channels], 'label': int32 [],
    'mask': float32 []}.

    `crop_fraction` and `interpolation` (config.eval_crop_fraction and
    config.eval_interpolation) are those of `preprocessing.preprocess_for_eval`; None keeps
    the augmentation's own evaluation transform."""

    augment: str
    image_size: int
    channels: int
    crop_fraction: float | None = None
    interpolation: str | None = None

    def __post_init__(self):
        preprocessing.check_eval_options(self.crop_fraction, self.interpolation)

    def map(self, example):
        image = preprocessing.preprocess_for_eval(
            _image(example), augment=self.augment, image_size=self.image_size,
            channels=self.channels, crop_fraction=self.crop_fraction,
            interpolation=self.interpolation)
        chex.assert_shape(image, (self.image_size, self.image_size, self.channels))
        return {"image": image, "label": np.int32(example["label"]),
                "mask": np.float32(example["mask"])}


def shard_bounds(num_examples: int, shard_options: grain.ShardOptions) -> tuple[int, int]:
    """[start, end) of this host's contiguous shard; the first num_examples % count
    shards hold one example more, so the shards cover every example once."""
    count, index = shard_options.shard_count, shard_options.shard_index
    base, remainder = divmod(num_examples, count)
    start = index * base + min(index, remainder)
    return start, start + base + (index < remainder)


class PaddedShard:
    """Records [start, end) of `source`, then copies of one record up to `length`.

    Every record gains 'mask': 1.0 for the shard's own records, 0.0 for the padding,
    so each host yields the same number of full evaluation batches and metrics
    weighted by the mask count every example of the split exactly once.
    """

    def __init__(self, source, start: int, end: int, length: int):
        self._source, self._start, self._end, self._length = source, start, end, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} records")
        real = self._start + index < self._end
        position = self._start + index if real else min(self._start, len(self._source) - 1)
        return {**self._source[position], "mask": np.float32(real)}

    def __repr__(self) -> str:
        return (f"PaddedShard({self._source!r}, start={self._start}, end={self._end}, "
                f"length={self._length})")


class EvalBatches:
    """Calling it gives one pass over this host's evaluation batches.

    One iterator over the batches repeated without end serves every pass, so grain's
    worker processes start at the first evaluation and serve all later ones (and
    prepare the first batches of the next pass while training runs). A pass left
    unfinished is completed, unseen, at the start of the next, so each pass starts at
    the first batch. One pass at a time.

    Args:
      dataset: a `grain.MapDataset` of `num_batches` batches, one pass.
      num_batches: batches per pass.
      num_workers: grain worker processes; 0 preprocesses in this process.
    """

    def __init__(self, dataset: grain.MapDataset, num_batches: int, num_workers: int):
        self.num_batches = num_batches
        self._dataset = dataset.repeat(None)
        self._num_workers = num_workers
        self._iterator = None
        self._taken = 0

    def __len__(self) -> int:
        return self.num_batches

    def __call__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._iterator is None:
            dataset = self._dataset.to_iter_dataset()
            if self._num_workers:
                dataset = dataset.mp_prefetch(
                    grain.MultiprocessingOptions(num_workers=self._num_workers))
            self._iterator = iter(dataset)
        return self._one_pass(self._iterator)

    def first_batch(self) -> dict[str, np.ndarray]:
        """The first batch of a pass, read in this process without starting one: the
        shapes and dtypes every batch has."""
        return self._dataset[0]

    def _one_pass(self, iterator):
        for _ in range(-self._taken % self.num_batches):
            next(iterator)
            self._taken += 1
        for _ in range(self.num_batches):
            batch = next(iterator)
            self._taken += 1
            yield batch

    def close(self) -> None:
        """Stops the worker processes; a later call starts new ones."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator, self._taken = None, 0


def _base_name(dataset: str) -> str:
    return dataset.split("/")[0].split(":")[0]


def _not_prepared_error(name: str, builder) -> FileNotFoundError:
    manual = (" imagenet2012 cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and "
              "ILSVRC2012_img_val.tar in DIR/downloads/manual first."
              if _base_name(name) == "imagenet2012" else "")
    return FileNotFoundError(
        f"The data set {name!r} is not prepared: no array_record files in "
        f"{builder.data_dir}. Prepare it once (tfds build needs TensorFlow; training "
        f"does not):\n"
        f"  pip install tensorflow && tfds build {name} --file_format=array_record "
        f"--data_dir=DIR\n"
        f"then pass --config.data_dir=DIR (or set TFDS_DATA_DIR=DIR).{manual}")


def _builder(name: str, data_dir):
    """The TFDS builder for `name`; the built-in digits are prepared on first use."""
    if _base_name(name) == "digits":
        return builtin.prepare_digits(data_dir)[0]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"Unknown data set {name!r}: config.dataset must be 'digits' (built in), "
            f"one of {sorted(set(DATASET_DEFAULTS) - {'digits'})}, or another TFDS "
            f"image-classification name.") from error
    features = builder.info.features
    if ("image" not in features or "label" not in features
            or not isinstance(features["label"], tfds.features.ClassLabel)):
        raise ValueError(
            f"The data set {name!r} has features {dict(features)}; an image "
            f"classification data set needs an 'image' and a class 'label'.")
    return builder


def _skip_image_decoding(builder) -> dict | None:
    """TFDS decoders that leave every Image feature as its encoded bytes."""
    decoders = {key: tfds.decode.SkipDecoding()
                for key, feature in builder.info.features.items()
                if isinstance(feature, tfds.features.Image)}
    return decoders or None


def _undecoded_source(builder, split: str):
    """`builder.as_data_source`, with Image features left encoded where possible."""
    decoders = _skip_image_decoding(builder)
    source = builder.as_data_source(split=split, decoders=decoders)
    if decoders and len(source):
        try:
            source[0]
        except ImportError:
            # tfds.testing.mock_data encodes its random images with TensorFlow when
            # decoding is skipped: read them decoded instead.
            return builder.as_data_source(split=split)
    return source


def _data_source(name: str, builder, split: str):
    """The random-access source of one split, with errors that say how to fix them.

    Image features come undecoded (their encoded bytes): the transforms decode them
    together with the crop."""
    try:
        return _undecoded_source(builder, split)
    except (NotImplementedError, ValueError, AssertionError) as error:
        if not builder.is_prepared():
            raise _not_prepared_error(name, builder) from error
        known = sorted(builder.info.splits)
        if split not in known:
            raise ValueError(f"The data set {name!r} has no split {split!r}; its splits "
                             f"are {known} (set config.train_split / "
                             f"config.eval_split).") from error
        raise FileNotFoundError(
            f"The data set {name!r} in {builder.data_dir} is not in the array_record "
            f"format this pipeline reads. Rebuild it with: tfds build {name} "
            f"--file_format=array_record --data_dir=DIR") from error


def _defaults(name: str, builder, channels: int) -> DatasetDefaults:
    base = _base_name(name)
    if base in DATASET_DEFAULTS:
        return DATASET_DEFAULTS[base]
    splits = builder.info.splits
    eval_split = "validation" if splits and "test" not in splits and "validation" in splits \
        else "test"
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    return DatasetDefaults("train", eval_split, "imagenet", mean, std)


def _check_config(config, process_count: int, seed: int):
    if not isinstance(config.image_size, int) or config.image_size < 1:
        raise ValueError(f"config.image_size must be a positive integer, got "
                         f"{config.image_size!r}.")
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if not isinstance(value, int) or value < process_count or value % process_count:
            raise ValueError(
                f"config.{field}={value!r} must be a positive multiple of the number of "
                f"hosts ({process_count}): each host loads {field} // {process_count} "
                f"examples per step.")
    augment = config.get("augment")
    if augment is not None and augment not in AUGMENTATIONS:
        raise ValueError(f"config.augment must be one of {AUGMENTATIONS} (or unset for the "
                         f"data set's default), got {augment!r}.")
    if config.get("num_workers", 0) < 0:
        raise ValueError(f"config.num_workers must be >= 0, got {config.num_workers}.")
    if not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")


def create_datasets(config, *, seed: int, shard_options: grain.ShardOptions | None = None):
    """The training loader, the evaluation iterator factory and the data set's info.

    Args:
      config: ConfigDict with the fields of the module docstring.
      seed: shuffling and augmentation seed, an integer in [0, 2**32).
      shard_options: this host's shard; default `grain.ShardByJaxProcess()`, one shard
        per JAX process.

    Returns:
      (train_loader, eval_fn, info).
      train_loader: a checkpointable `grain.DataLoader` over this host's positions of the
        training split's order shuffled with `seed` (every shard count-th), repeating forever. Its batches are
        {'image': uint8 [host_batch, image_size, image_size, channels],
         'label': int32 [host_batch]}, host_batch = batch_size // shard count.
      eval_fn: an `EvalBatches`; eval_fn() -> an iterator over this host's shard of the
        whole evaluation split, once: {'image': uint8 [host_eval_batch, image_size,
        image_size, channels], 'label': int32 [host_eval_batch], 'mask': float32
        [host_eval_batch]} (mask 0 for the padding that fills the last batches;
        every host yields the same number of batches). Its worker processes last
        across calls; `eval_fn.close()` stops them.
      info: DatasetInfo; `info.mean` and `info.std` (per channel, of the [0, 1] pixels)
        are what the steps normalise the uint8 images with.
    """
    shard_options = shard_options or grain.ShardByJaxProcess(drop_remainder=False)
    process_count = shard_options.shard_count
    _check_config(config, process_count, seed)
    name = config.dataset
    builder = _builder(name, config.get("data_dir"))
    channels = builder.info.features["image"].shape[-1] or 3
    defaults = _defaults(name, builder, channels)
    train_source = _data_source(name, builder, config.get("train_split") or defaults.train_split)
    eval_source = _data_source(name, builder, config.get("eval_split") or defaults.eval_split)
    steps = dict(augment=config.get("augment") or defaults.augment,
                 image_size=config.image_size, channels=channels)
    num_workers = config.get("num_workers", 0)
    if num_workers and not flags.FLAGS.is_parsed():
        # grain 0.2.18's worker processes read one of its absl flags and fail when no
        # absl program parsed them (a notebook, a test): use the flags' defaults.
        flags.FLAGS.mark_as_parsed()

    train_loader = grain.DataLoader(
        data_source=train_source,
        # Unsharded: the loader's shard_options pick this host's positions of the one order.
        sampler=grain.IndexSampler(len(train_source), shard_options=grain.NoSharding(),
                                   shuffle=True, num_epochs=None, seed=int(seed)),
        operations=[TrainPreprocess(**steps),
                    grain.Batch(config.batch_size // process_count, drop_remainder=True)],
        worker_count=num_workers,
        shard_options=shard_options,
    )

    host_eval_batch = config.eval_batch_size // process_count
    num_eval = len(eval_source)
    num_eval_batches = math.ceil(math.ceil(num_eval / process_count) / host_eval_batch)
    start, end = shard_bounds(num_eval, shard_options)
    eval_dataset = (
        grain.MapDataset.source(
            PaddedShard(eval_source, start, end, num_eval_batches * host_eval_batch))
        .map(EvalPreprocess(**steps, crop_fraction=config.get("eval_crop_fraction"),
                            interpolation=config.get("eval_interpolation")))
        .batch(host_eval_batch))
    eval_fn = EvalBatches(eval_dataset, num_eval_batches, num_workers)

    info = DatasetInfo(
        num_classes=builder.info.features["label"].num_classes,
        image_size=config.image_size,
        channels=channels,
        num_train_examples=len(train_source),
        num_eval_examples=num_eval,
        mean=defaults.mean,
        std=defaults.std,
    )
    return train_loader, eval_fn, info
