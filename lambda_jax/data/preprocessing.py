"""Image preprocessing on the host: one function per step, numpy and PIL only.

Every function returns one image, `uint8 [height, width, channels]`. The cropping steps
also take the encoded bytes of a JPEG or PNG (TFDS's `Image` features read with their
decoding skipped): they read the image size from the header, choose the crop box, then
decode and crop in one step, with a reduced-size JPEG decode (1/2, 1/4 or 1/8 of the
size, done in the DCT) whenever the crop still has at least `size` pixels a side at
that scale. Random steps take a `np.random.Generator` (grain hands one per record,
derived from the loader's seed), so a pipeline is deterministic given its seed.
Normalisation happens on the accelerator, inside the jitted step
(`lambda_jax.train.steps.normalize_images`): the host sends uint8, a quarter of the
bytes of float32.
"""

import io
import math

import numpy as np
from PIL import Image

# The evaluation crop of ImageNet-style pipelines keeps image_size / (image_size + 32) of
# the shorter side (224 of 256), as in the Inception and ResNet recipes.
CROP_PADDING = 32
# Inception-style random crop: a fraction of the area and an aspect ratio, sampled
# until the crop fits in the image (Szegedy et al. 2015; the ResNet and LambdaNetworks
# ImageNet recipes).
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
MAX_CROP_ATTEMPTS = 10
CIFAR_PADDING = 4
PIL_MODES = {1: "L", 3: "RGB"}
# The evaluation resampling filters by name (timm's `interpolation`).
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def is_encoded(image) -> bool:
    """Whether `image` holds encoded bytes (a JPEG, a PNG, ...) rather than pixels."""
    return isinstance(image, (bytes, np.bytes_)) or (
        isinstance(image, np.ndarray) and image.dtype.kind in "SO")


def _open(encoded) -> Image.Image:
    """A lazily decoded PIL image: only the header is read until pixels are needed."""
    data = encoded.item() if isinstance(encoded, np.ndarray) else encoded
    return Image.open(io.BytesIO(bytes(data)))


def image_shape(image) -> tuple[int, int]:
    """(height, width) of pixels uint8 [height, width, channels] or of encoded bytes
    (read from the header, nothing decoded)."""
    if is_encoded(image):
        width, height = _open(image).size
        return height, width
    return image.shape[:2]


def decode(encoded, channels: int) -> np.ndarray:
    """Decodes a whole image.

    Args:
      encoded: the bytes of a JPEG, PNG or any format PIL reads.
      channels: 1 (grey) or 3 (RGB); other modes are converted.

    Returns:
      uint8 [height, width, channels].
    """
    image = np.asarray(_open(encoded).convert(_pil_mode(channels)))
    return image[..., None] if image.ndim == 2 else image


def _pil_mode(channels: int) -> str:
    if channels not in PIL_MODES:
        raise ValueError(f"Encoded images decode to 1 or 3 channels, not {channels}; store "
                         f"images of other channel counts as uint8 arrays.")
    return PIL_MODES[channels]


def _decode_crop_and_resize(encoded, box, size: int, channels: int, resample) -> np.ndarray:
    """`crop_and_resize` of encoded bytes, decoding at the smallest JPEG scale that keeps
    at least `size` pixels across the crop."""
    top, left, crop_height, crop_width = box
    image = _open(encoded)
    width, height = image.size
    if image.format == "JPEG":
        # draft picks the largest reduction (1/8, 1/4, 1/2) whose decode is at least this size.
        image.draft(_pil_mode(channels), (math.ceil(width * size / crop_width),
                                          math.ceil(height * size / crop_height)))
    if image.mode != _pil_mode(channels):
        image = image.convert(_pil_mode(channels))
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    pil_box = (left * scale_x, top * scale_y, (left + crop_width) * scale_x,
               (top + crop_height) * scale_y)
    resized = np.asarray(image.resize((size, size), resample, pil_box))
    return resized[..., None] if resized.ndim == 2 else resized


def crop_and_resize(image, box: tuple[int, int, int, int], size: int,
                    resample: Image.Resampling = Image.Resampling.BICUBIC, *,
                    channels: int = 3) -> np.ndarray:
    """Crops `box` out of `image` and resizes it to `size` x `size` in one step.

    Args:
      image: uint8 [height, width, channels], or encoded bytes, decoded here with the
        crop (a reduced-size JPEG decode where the crop allows).
      box: (top, left, crop_height, crop_width) in pixels, inside the image.
      size: output height and width.
      resample: PIL filter.
      channels: channels to decode encoded bytes to (1 or 3); unused for pixels.

    Returns:
      uint8 [size, size, channels].
    """
    if is_encoded(image):
        return _decode_crop_and_resize(image, box, size, channels, resample)
    top, left, crop_height, crop_width = box
    height, width, channels = image.shape
    if box == (0, 0, height, width) and (height, width) == (size, size):
        return image
    pil_box = (left, top, left + crop_width, top + crop_height)
    if channels == 3:
        resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), resample, pil_box)
        return np.asarray(resized)
    # PIL has no uint8 mode for other channel counts: resize each channel alone.
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]))
                   .resize((size, size), resample, pil_box))
        for c in range(channels)
    ]
    return np.stack(planes, axis=-1)


def resize(image, size: int, resample: Image.Resampling = Image.Resampling.BILINEAR, *,
           channels: int = 3) -> np.ndarray:
    """Resizes the whole image to `size` x `size` (no-op when it already is).

    Args:
      image: uint8 [height, width, channels], or encoded bytes (see `crop_and_resize`).
      channels: channels to decode encoded bytes to.

    Returns:
      uint8 [size, size, channels].
    """
    height, width = image_shape(image)
    return crop_and_resize(image, (0, 0, height, width), size, resample, channels=channels)


def random_crop_box(height: int, width: int, rng: np.random.Generator):
    """The Inception-style crop box of an image, or None when no attempt fit.

    Samples an area in AREA_RANGE of the image and a log-uniform aspect ratio in
    ASPECT_RATIO_RANGE, up to MAX_CROP_ATTEMPTS times until the crop fits.

    Returns:
      (top, left, crop_height, crop_width), or None.
    """
    area = height * width
    log_ratio = (math.log(ASPECT_RATIO_RANGE[0]), math.log(ASPECT_RATIO_RANGE[1]))
    for _ in range(MAX_CROP_ATTEMPTS):
        target_area = area * rng.uniform(*AREA_RANGE)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    return None


def central_crop_box(height: int, width: int, size: int,
                     crop_fraction: float | None = None) -> tuple[int, int, int, int]:
    """The evaluation crop: a centred square of the shorter side.

    Args:
      height, width: the image's size.
      size: the output side the crop is resized to.
      crop_fraction: None keeps size/(size+CROP_PADDING) of the shorter side. A number in
        (0, 1] is timm's `crop_pct`: timm resizes the shorter side to floor(size /
        crop_fraction) and takes the central size x size, so the crop keeps
        size / floor(size / crop_fraction) of the shorter side.

    Returns:
      (top, left, crop, crop).
    """
    if crop_fraction is None:
        kept = size / (size + CROP_PADDING)
    else:
        check_eval_options(crop_fraction, None)
        kept = size / math.floor(size / crop_fraction)
    crop = max(1, int(round(kept * min(height, width))))
    return (height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop


def check_eval_options(crop_fraction: float | None, interpolation: str | None) -> None:
    """Raises ValueError for a crop fraction outside (0, 1] or an unknown filter name."""
    if crop_fraction is not None and (isinstance(crop_fraction, bool)
                                      or not isinstance(crop_fraction, (int, float))
                                      or not 0 < crop_fraction <= 1):
        raise ValueError(f"The evaluation crop fraction must be a number in (0, 1] (timm's "
                         f"crop_pct, e.g. 0.95), got {crop_fraction!r}.")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"The evaluation interpolation must be one of "
                         f"{sorted(INTERPOLATIONS)}, got {interpolation!r}.")


def random_resized_crop(image, rng: np.random.Generator, size: int, *,
                        channels: int = 3) -> np.ndarray:
    """Inception-style crop (`random_crop_box`) resized to `size`; the evaluation's
    central crop when no sampled box fits.

    Args:
      image: uint8 [height, width, channels], or encoded bytes: the box is sampled from
        the header's size and only then decoded, with the crop (see `crop_and_resize`).
      rng: the record's generator.
      size: output height and width.
      channels: channels to decode encoded bytes to.

    Returns:
      uint8 [size, size, channels].
    """
    height, width = image_shape(image)
    box = random_crop_box(height, width, rng) or central_crop_box(height, width, size)
    return crop_and_resize(image, box, size, channels=channels)


def central_crop_and_resize(image, size: int, *, channels: int = 3,
                            crop_fraction: float | None = None,
                            resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """`central_crop_box` resized to `size` x `size`.

    Args:
      image: uint8 [height, width, channels], or encoded bytes (see `crop_and_resize`).
      size: output height and width.
      channels: channels to decode encoded bytes to.
      crop_fraction: see `central_crop_box`.
      resample: PIL filter.

    Returns:
      uint8 [size, size, channels].
    """
    height, width = image_shape(image)
    return crop_and_resize(image, central_crop_box(height, width, size, crop_fraction), size,
                           resample, channels=channels)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips left-right with probability 1/2.

    Args:
      image: [height, width, channels].

    Returns:
      [height, width, channels], same dtype.
    """
    return image[:, ::-1] if rng.random() < 0.5 else image


def pad_and_random_crop(image: np.ndarray, rng: np.random.Generator,
                        padding: int = CIFAR_PADDING) -> np.ndarray:
    """CIFAR augmentation: zero-pad each side by `padding`, crop back to the input size.

    Args:
      image: [height, width, channels].

    Returns:
      [height, width, channels], same dtype.
    """
    height, width, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = int(rng.integers(0, 2 * padding + 1))
    left = int(rng.integers(0, 2 * padding + 1))
    return padded[top:top + height, left:left + width]


def preprocess_for_train(image, rng: np.random.Generator, *, augment: str, image_size: int,
                         channels: int) -> np.ndarray:
    """The training steps for one image.

    'imagenet': random_resized_crop, random_flip; 'cifar': resize, pad_and_random_crop,
    random_flip; 'none': resize.

    Args:
      image: uint8 [height, width, channels], or encoded bytes.
      channels: the output's channels (encoded bytes are decoded to them).

    Returns:
      uint8 [image_size, image_size, channels].
    """
    if augment == "imagenet":
        return random_flip(random_resized_crop(image, rng, image_size, channels=channels), rng)
    image = resize(image, image_size, channels=channels)
    if augment == "cifar":
        return random_flip(pad_and_random_crop(image, rng), rng)
    return image


def preprocess_for_eval(image, *, augment: str, image_size: int, channels: int,
                        crop_fraction: float | None = None,
                        interpolation: str | None = None) -> np.ndarray:
    """The evaluation steps for one image, matching `preprocess_for_train`'s `augment`.

    'imagenet': central_crop_and_resize; 'cifar' and 'none': resize. A `crop_fraction`
    takes the central crop for every `augment` (timm's evaluation transform, with
    `interpolation`).

    Args:
      image: uint8 [height, width, channels], or encoded bytes.
      channels: the output's channels (encoded bytes are decoded to them).
      crop_fraction: None: the augmentation's own crop (size/(size+32) for 'imagenet', none
        otherwise); else timm's `crop_pct` (see `central_crop_box`).
      interpolation: a name in INTERPOLATIONS; None: bicubic for a crop, bilinear for a
        resize.

    Returns:
      uint8 [image_size, image_size, channels].
    """
    check_eval_options(crop_fraction, interpolation)
    if augment == "imagenet" or crop_fraction is not None:
        resample = INTERPOLATIONS[interpolation or "bicubic"]
        return central_crop_and_resize(image, image_size, channels=channels,
                                       crop_fraction=crop_fraction, resample=resample)
    return resize(image, image_size, INTERPOLATIONS[interpolation or "bilinear"],
                  channels=channels)
