"""TFDS builders and random-access sources, with errors that say how to fix them.

TFDS data sets are read with `tfds.data_source`, so they must be prepared as array_record
files; no TensorFlow is needed to read them. Image features come undecoded (their encoded
bytes): the transforms decode them together with the crop.
"""

import tensorflow_datasets as tfds

from lambda_jax.data import builtin
from lambda_jax.data.catalog import DATASET_DEFAULTS, base_name


def _not_prepared_error(name: str, builder) -> FileNotFoundError:
    manual = (" imagenet2012 cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and "
              "ILSVRC2012_img_val.tar in DIR/downloads/manual first."
              if base_name(name) == "imagenet2012" else "")
    return FileNotFoundError(
        f"The data set {name!r} is not prepared: no array_record files in "
        f"{builder.data_dir}. Prepare it once (tfds build needs TensorFlow; training "
        f"does not):\n"
        f"  pip install tensorflow && tfds build {name} --file_format=array_record "
        f"--data_dir=DIR\n"
        f"then pass --config.data_dir=DIR (or set TFDS_DATA_DIR=DIR).{manual}")


def image_classification_builder(name: str, data_dir):
    """The TFDS builder for `name`; the built-in digits are prepared on first use.

    Raises:
      ValueError: if TFDS has no data set `name`, or it has no 'image' and class 'label'.
    """
    if base_name(name) == "digits":
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


def data_source(name: str, builder, split: str):
    """The random-access source of one split of data set `name`.

    Raises:
      FileNotFoundError: if the data set is not prepared, or not as array_record files.
      ValueError: if it has no split `split`.
    """
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
