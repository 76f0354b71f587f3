"""The built-in data set: scikit-learn's handwritten digits as a TFDS builder.

scikit-learn ships the 1797 8x8 grey-scale digits of the UCI "Optical Recognition of
Handwritten Digits" test set inside its wheel, so this builder prepares array_record
files with no network. Its features are `tfds.features.Tensor`, which TFDS encodes
without TensorFlow (an `Image` feature would need TensorFlow to encode PNGs). The input
pipeline then reads it with `as_data_source`, like every other TFDS data set, and
upsamples the 8x8 images to `config.image_size`.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST_EXAMPLES = 360
_SPLIT_SEED = 0
# sklearn stores the digits as counts of set pixels in 4x4 blocks: integers in [0, 16].
_MAX_PIXEL_VALUE = 16


def digits_split_indices() -> dict[str, np.ndarray]:
    """The fixed train/test split of the 1797 digits.

    Returns:
      {'train': int64 [1437], 'test': int64 [360]}: sorted indices into
      `sklearn.datasets.load_digits()`. A seeded permutation, the same on every
      machine (numpy's legacy `RandomState` stream is frozen).
    """
    permutation = np.random.RandomState(_SPLIT_SEED).permutation(1797)
    return {
        "train": np.sort(permutation[NUM_TEST_EXAMPLES:]),
        "test": np.sort(permutation[:NUM_TEST_EXAMPLES]),
    }


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's 8x8 handwritten digits, 10 classes, a fixed 1437/360 split.

    Features: 'image' uint8 [8, 8, 1] (0..255), 'label' int64 in [0, 10), 'index'
    int64 (the example's index in `sklearn.datasets.load_digits()`).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The 1797 digits of scikit-learn, split 1437 train / 360 test."}
    # Nothing to download, so no checksums file to look up beside this module (the
    # look-up needs `importlib_resources`, which TFDS does not install on Python 3.9+).
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn's bundled 8x8 handwritten digits (UCI optdigits).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships inside scikit-learn: nothing to download.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / _MAX_PIXEL_VALUE)).astype(np.uint8)
        return {
            split: self._generate_examples(images, digits.target, indices)
            for split, indices in digits_split_indices().items()
        }

    def _generate_examples(self, images, labels, indices):
        for index in indices:
            yield int(index), {
                "image": images[index][..., None],
                "label": int(labels[index]),
                "index": int(index),
            }
