"""A synthetic ImageNet-like TFDS data set: JPEGs of about 500x375, for benchmarks and tests.

Importing this module registers the builder with TFDS as 'synthetic_imagenet_jpegs', so
`create_datasets` reads a prepared copy like any TFDS data set:

    builder = SyntheticImagenetJpegs(data_dir=DIR, file_format="array_record",
                                     num_examples={"train": 256, "validation": 32})
    builder.download_and_prepare()   # seconds, no network
    create_datasets(config)          # config.dataset = "synthetic_imagenet_jpegs"
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "synthetic_imagenet_jpegs"


def synthetic_jpeg(rng: np.random.Generator, long_side: int = 500, short_side: int = 375,
                   quality: int = 90) -> bytes:
    """One JPEG of about long_side x short_side (each side within 20%, landscape three
    times in four): smooth random colours with pixel noise, for photo-like file sizes."""
    sides = [max(1, int(side * rng.uniform(0.8, 1.2))) for side in (long_side, short_side)]
    height, width = sides if rng.random() < 0.25 else sides[::-1]
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noisy).save(encoded, "JPEG", quality=quality)
    return encoded.getvalue()


class SyntheticImagenetJpegs(tfds.core.GeneratorBasedBuilder):
    """Features: 'image' a JPEG (TFDS `Image`, 3 channels), 'label' one of 1000 classes.

    Args (besides TFDS's):
      num_examples: examples per split, {'train': n, 'validation': m}; used only when
        preparing (a prepared copy is read with whatever it holds).
      long_side, short_side: the typical image size (each drawn within 20% of it).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Synthetic JPEGs of about 500x375."}
    url_infos = None

    def __init__(self, *, num_examples: dict[str, int] | None = None, long_side: int = 500,
                 short_side: int = 375, **kwargs):
        self._num_examples = num_examples or {"train": 256, "validation": 32}
        self._sides = (long_side, short_side)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Synthetic ImageNet-like JPEGs for input-pipeline benchmarks.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated here: nothing to download
        return {split: self._generate_examples(seed, count)
                for seed, (split, count) in enumerate(sorted(self._num_examples.items()))}

    def _generate_examples(self, seed: int, count: int):
        rng = np.random.default_rng(seed)
        for key in range(count):
            yield key, {"image": synthetic_jpeg(rng, *self._sides),
                        "label": int(rng.integers(1000))}
