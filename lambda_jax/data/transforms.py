"""The grain transforms of one example: TFDS record in, model-sized uint8 image out."""

import dataclasses

import chex
import grain.python as grain
import numpy as np

from lambda_jax.data import preprocessing


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
