"""The data sets the pipelines know: their defaults, and what a data set tells the model."""

import dataclasses

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


def base_name(dataset: str) -> str:
    """'imagenette' for 'imagenette/320px-v2' or 'imagenette:1.0.0'."""
    return dataset.split("/")[0].split(":")[0]


def defaults_for(name: str, splits, channels: int) -> DatasetDefaults:
    """The defaults of data set ``name``; for a name not in `DATASET_DEFAULTS`, those of an
    ImageNet-like data set with the prepared ``splits`` and ``channels``."""
    base = base_name(name)
    if base in DATASET_DEFAULTS:
        return DATASET_DEFAULTS[base]
    eval_split = "validation" if splits and "test" not in splits and "validation" in splits \
        else "test"
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    return DatasetDefaults("train", eval_split, "imagenet", mean, std)
