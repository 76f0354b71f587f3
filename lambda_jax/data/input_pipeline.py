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

import numbers

from absl import flags
import grain.python as grain

from lambda_jax.data.catalog import (
    AUGMENTATIONS,
    DATASET_DEFAULTS,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetDefaults,
    DatasetInfo,
    defaults_for,
)
from lambda_jax.data.eval_batches import EvalBatches, PaddedShard, create_eval_batches, shard_bounds
from lambda_jax.data.tfds_source import data_source, image_classification_builder
from lambda_jax.data.transforms import EvalPreprocess, TrainPreprocess

__all__ = [
    "AUGMENTATIONS",
    "DATASET_DEFAULTS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "DatasetDefaults",
    "DatasetInfo",
    "EvalBatches",
    "EvalPreprocess",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PaddedShard",
    "TrainPreprocess",
    "create_datasets",
    "shard_bounds",
]


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
    builder = image_classification_builder(name, config.get("data_dir"))
    channels = builder.info.features["image"].shape[-1] or 3
    defaults = defaults_for(name, builder.info.splits, channels)
    train_source = data_source(name, builder, config.get("train_split") or defaults.train_split)
    eval_source = data_source(name, builder, config.get("eval_split") or defaults.eval_split)
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
    eval_fn = create_eval_batches(
        eval_source,
        EvalPreprocess(**steps, crop_fraction=config.get("eval_crop_fraction"),
                       interpolation=config.get("eval_interpolation")),
        config.eval_batch_size // process_count, shard_options, num_workers)

    info = DatasetInfo(
        num_classes=builder.info.features["label"].num_classes,
        image_size=config.image_size,
        channels=channels,
        num_train_examples=len(train_source),
        num_eval_examples=len(eval_source),
        mean=defaults.mean,
        std=defaults.std,
    )
    return train_loader, eval_fn, info
