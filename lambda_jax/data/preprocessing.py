"""Image preprocessing on the host: one function per step, numpy and PIL only.

Every function takes and returns one image, `uint8 [height, width, channels]` until
`normalize`, which returns `float32 [height, width, channels]`. Random steps take a
`np.random.Generator` (grain hands one per record, derived from the loader's seed), so
a pipeline is deterministic given its seed. No TensorFlow: the images come decoded
from TFDS array_record files and ImageNet's are of every size, so cropping and resizing
happen here, inside grain's transforms, on the host.
"""

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


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int,
                    resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """Crops `box` out of `image` and resizes it to `size` x `size` in one step.

    Args:
      image: uint8 [height, width, channels].
      box: (top, left, crop_height, crop_width) in pixels, inside the image.
      size: output height and width.
      resample: PIL filter.

    Returns:
      uint8 [size, size, channels].
    """
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


def resize(image: np.ndarray, size: int,
           resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resizes the whole image to `size` x `size` (no-op when it already is).

    Args:
      image: uint8 [height, width, channels].

    Returns:
      uint8 [size, size, channels].
    """
    height, width, _ = image.shape
    return crop_and_resize(image, (0, 0, height, width), size, resample)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Inception-style crop: a random area fraction and aspect ratio, resized to `size`.

    Samples an area in AREA_RANGE of the image and a log-uniform aspect ratio in
    ASPECT_RATIO_RANGE, up to MAX_CROP_ATTEMPTS times until the crop fits; otherwise
    falls back to the evaluation's central crop.

    Args:
      image: uint8 [height, width, channels].
      rng: the record's generator.
      size: output height and width.

    Returns:
      uint8 [size, size, channels].
    """
    height, width, _ = image.shape
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
            return crop_and_resize(image, (top, left, crop_height, crop_width), size)
    return central_crop_and_resize(image, size)


def central_crop_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The evaluation crop: a centred square of size/(size+CROP_PADDING) of the shorter side.

    Args:
      image: uint8 [height, width, channels].
      size: output height and width.

    Returns:
      uint8 [size, size, channels].
    """
    height, width, _ = image.shape
    crop = max(1, int(round(size / (size + CROP_PADDING) * min(height, width))))
    top = (height - crop + 1) // 2
    left = (width - crop + 1) // 2
    return crop_and_resize(image, (top, left, crop, crop), size)


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


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Scales to [0, 1], then subtracts the per-channel mean and divides by the std.

    Args:
      image: uint8 [height, width, channels].
      mean, std: per-channel statistics of the [0, 1] pixels, length 1 or channels.

    Returns:
      float32 [height, width, channels].
    """
    scaled = image.astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_for_train(image: np.ndarray, rng: np.random.Generator, *, augment: str,
                         image_size: int, mean, std) -> np.ndarray:
    """The training steps for one image.

    'imagenet': random_resized_crop, random_flip; 'cifar': resize, pad_and_random_crop,
    random_flip; 'none': resize. Then normalize.

    Args:
      image: uint8 [height, width, channels].

    Returns:
      float32 [image_size, image_size, channels].
    """
    if augment == "imagenet":
        image = random_flip(random_resized_crop(image, rng, image_size), rng)
    elif augment == "cifar":
        image = random_flip(pad_and_random_crop(resize(image, image_size), rng), rng)
    else:
        image = resize(image, image_size)
    return normalize(image, mean, std)


def preprocess_for_eval(image: np.ndarray, *, augment: str, image_size: int, mean,
                        std) -> np.ndarray:
    """The evaluation steps for one image, matching `preprocess_for_train`'s `augment`.

    'imagenet': central_crop_and_resize; 'cifar' and 'none': resize. Then normalize.

    Args:
      image: uint8 [height, width, channels].

    Returns:
      float32 [image_size, image_size, channels].
    """
    if augment == "imagenet":
        image = central_crop_and_resize(image, image_size)
    else:
        image = resize(image, image_size)
    return normalize(image, mean, std)
