"""The built-in data set: scikit-learn's handwritten digits as a TFDS builder.

scikit-learn ships the 1797 8x8 grey-scale digits of the UCI "Optical Recognition of
Handwritten Digits" test set inside its wheel, so this builder prepares array_record
files with no network. Its features are `tfds.features.Tensor`, which TFDS encodes
without TensorFlow (an `Image` feature would need TensorFlow to encode PNGs). The input
pipeline then reads it with `as_data_source`, like every other TFDS data set, and
upsamples the 8x8 images to `config.image_size`.

`prepare_digits` is safe to call from several processes at once on a fresh machine:
one prepares under a lock file in the data directory while the others wait, and TFDS
writes the set into a temporary directory renamed into place only when complete, so no
process reads a half-written set.
"""

import contextlib
import os

import numpy as np
import tensorflow_datasets as tfds

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; TFDS's atomic rename still applies.
    fcntl = None

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


@contextlib.contextmanager
def _exclusive_lock(path: str):
    """Holds an advisory lock on `path` (created if missing) until the block ends."""
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def prepare_digits(data_dir: str | None) -> tuple[Digits, bool]:
    """The prepared digits builder in `data_dir` (TFDS's default when None).

    Several processes may call this at once: the first to take the lock file
    `<data_dir>/digits.lock` prepares the array_record files, the others wait for it and
    then read what it wrote. Remote directories (gs://...) are not locked: there every
    process prepares into its own temporary directory and TFDS's rename into place keeps
    readers from seeing a partial set.

    Returns:
      (builder, prepared_here): prepared_here is True when this call wrote the files.
    """
    builder = Digits(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder, False
    root = os.fspath(builder.data_dir_root)
    if fcntl is None or "://" in root:
        builder.download_and_prepare()
        return builder, True
    os.makedirs(root, exist_ok=True)
    with _exclusive_lock(os.path.join(root, "digits.lock")):
        # A new builder: another process may have prepared the set while this one waited.
        builder = Digits(data_dir=data_dir, file_format="array_record")
        prepared_here = not builder.is_prepared()
        if prepared_here:
            builder.download_and_prepare()
    return Digits(data_dir=data_dir, file_format="array_record"), prepared_here
