"""Evaluating saved weights on a data set split, at any image size: :func:`evaluate`.

The weights are anything :func:`lambda_jax.load_model` reads: a ``train.py`` workdir (or one
of its step folders), a :func:`lambda_jax.save_model` export, a timm ``.safetensors`` file or
``"hf-hub:<repo_id>"``. At an image size other than the one the weights are built for, every
global relative position table is resized with
:func:`lambda_jax.resize_relative_embeddings` (local lambda convolutions and convolutions work
at any size unchanged). The split is read by :func:`lambda_jax.data.create_datasets` and
scored by the training program's own evaluation (:func:`lambda_jax.train.steps.eval_step`
over every device), so a workdir evaluated at its own size reproduces the run's evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from lambda_jax.data.input_pipeline import DATASET_DEFAULTS
from lambda_jax.layers.resize import resize_relative_embeddings
from lambda_jax.weights import ModelWeights, PathLike, open_weights

DEFAULT_BATCH_SIZE = 256
_SEED = 0  # create_datasets needs one; evaluation itself draws nothing at random


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate on; None takes a workdir's run config, else the data set's default.

    Attributes:
      dataset: a name ``lambda_jax.data.create_datasets`` reads ('digits', 'imagenet2012',
        any TFDS image-classification name); required unless the weights are a workdir.
      split: the TFDS split; None: the run's ``eval_split``, else the data set's evaluation
        split.
      image_size: the side of the evaluated images; None: the side the weights are built for
        (the run's ``image_size``; 256 for timm's models).
      crop_fraction: timm's ``crop_pct`` (the central crop keeps
        ``image_size / floor(image_size / crop_fraction)`` of the shorter side); None: the
        augmentation's own evaluation transform.
      interpolation: 'bicubic', 'bilinear', 'nearest' or 'lanczos'; None: bicubic for a
        crop, bilinear for a plain resize.
      augment: 'imagenet' (central crop), 'cifar' or 'none' (resize); None: the run's, else
        the data set's default.
      data_dir: the TFDS data directory; None: the run's, else TFDS's default.
      batch_size: global evaluation batch, rounded up to a multiple of the device count; the
        last batches are padded and the padding is not counted.
      num_workers: grain worker processes per host (0: decode in this process).
    """

    dataset: Optional[str] = None
    split: Optional[str] = None
    image_size: Optional[int] = None
    crop_fraction: Optional[float] = None
    interpolation: Optional[str] = None
    augment: Optional[str] = None
    data_dir: Optional[str] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = 0


def _pick(given: Any, run_config: dict, field: str) -> Any:
    return given if given is not None else run_config.get(field)


def _data_config(options: EvalOptions, loaded: ModelWeights,
                 num_devices: int) -> ml_collections.ConfigDict:
    """The ``create_datasets`` config: the evaluation split stands in for the training one
    too, so only the split evaluated needs to be prepared."""
    run = loaded.run_config or {}
    dataset = _pick(options.dataset, run, "dataset")
    if dataset is None:
        raise ValueError(f"{loaded.source} does not say which data set to evaluate on: pass "
                         "the dataset (--dataset=imagenet2012, ...).")
    if dataset != run.get("dataset"):
        run = {}  # the run's splits, transform and directory are those of another data set
    image_size = options.image_size or loaded.image_size[0]
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    if not isinstance(options.batch_size, int) or options.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {options.batch_size!r}.")
    multiple = num_devices * jax.process_count()
    batch_size = math.ceil(options.batch_size / multiple) * multiple
    split = _pick(options.split, run, "eval_split")
    if split is None and dataset.split("/")[0] in DATASET_DEFAULTS:
        split = DATASET_DEFAULTS[dataset.split("/")[0]].eval_split
    return ml_collections.ConfigDict({
        "dataset": dataset,
        "data_dir": _pick(options.data_dir, run, "data_dir"),
        "image_size": image_size,
        "augment": _pick(options.augment, run, "augment"),
        "num_workers": options.num_workers,
        "train_split": split,
        "eval_split": split,
        "batch_size": batch_size,
        "eval_batch_size": batch_size,
        "eval_crop_fraction": _pick(options.crop_fraction, run, "eval_crop_fraction"),
        "eval_interpolation": _pick(options.interpolation, run, "eval_interpolation"),
    })


def resize_to(loaded: ModelWeights, image_size: int) -> tuple[Any, dict]:
    """``(model, variables)`` for ``image_size`` x ``image_size`` images.

    Global relative position tables are interpolated from the size the weights are built for
    (:func:`lambda_jax.resize_relative_embeddings`); a model that fixes its input size (timm's
    ``lambda_resnet26rpt_256``) is rebuilt for the new one.

    Raises:
      ValueError: if a table's layer input would not be a whole number of positions at
        ``image_size`` (choose a size that keeps every stride exact).
    """
    target = (image_size, image_size)
    if target == tuple(loaded.image_size):
        return loaded.model, loaded.variables
    variables = resize_relative_embeddings(loaded.variables, loaded.image_size, target)
    model = loaded.model
    if getattr(model, "image_size", None) is not None:
        model = model.clone(image_size=image_size)
    return model, variables


def evaluate(weights: PathLike, options: EvalOptions = EvalOptions(), *,
             model: Optional[str] = None, devices: Optional[Sequence[jax.Device]] = None,
             **overrides: Any) -> dict[str, Any]:
    """Evaluates ``weights`` on one split and returns the metrics.

    Args:
      weights: a workdir, a step folder, an export, a timm ``.safetensors`` file or
        ``"hf-hub:<repo_id>"`` (see :func:`lambda_jax.load_model`).
      options: the data and the transform (:class:`EvalOptions`).
      model: the registered model name; None for the one an export or a workdir holds.
      devices: the devices to evaluate on (default: all).
      **overrides: runtime settings for :func:`lambda_jax.load_model` (``dtype``, ...).

    Returns:
      ``{"top1", "top5", "loss", "num_examples", "image_size", "weights", "weights_source",
      "model", "weights_image_size", "dataset", "split", "augment", "crop_fraction",
      "interpolation"}``: top-1 and top-5 as fractions, ``loss`` the mean cross entropy.

    Raises:
      ValueError: weights of another class count or channel count than the data set, a size
        the global tables cannot be resized to, or a bad option.
    """
    from lambda_jax.data import create_datasets
    from lambda_jax.train.loop import evaluate as evaluate_batches
    from lambda_jax.train.parallel import AXIS, DataParallel
    from lambda_jax.train.steps import TrainState, eval_step

    loaded = open_weights(model, weights, **overrides)
    parallel = DataParallel((loaded.run_config or {}).get("parallelism", "shard_map"), devices)
    config = _data_config(options, loaded, parallel.num_devices)
    _, eval_fn, info = create_datasets(config, seed=_SEED)
    try:
        if info.num_classes != loaded.model.num_classes:
            raise ValueError(
                f"{loaded.source} has {loaded.model.num_classes} classes; {config.dataset!r} "
                f"has {info.num_classes}. Evaluate on the data set the weights were trained on.")
        if info.channels != loaded.channels:
            raise ValueError(f"{loaded.source} takes {loaded.channels}-channel images; "
                             f"{config.dataset!r} has {info.channels} channels.")
        eval_model, variables = resize_to(loaded, config.image_size)
        # eval_step evaluates a TrainState's EMA fields: the weights go there, nothing else.
        state = parallel.replicate(TrainState(
            step=np.zeros((), np.int32), params={}, batch_stats={}, opt_state=(),
            ema_params=variables["params"], ema_batch_stats=variables.get("batch_stats", {})))
        p_eval_step = parallel.map_eval_step(functools.partial(
            eval_step, model=eval_model, num_classes=info.num_classes, axis_name=AXIS,
            mean=info.mean, std=info.std))
        metrics = evaluate_batches(p_eval_step, state, eval_fn, parallel)
    finally:
        eval_fn.close()
    return {
        "top1": metrics["eval_top1"],
        "top5": metrics["eval_top5"],
        "loss": metrics["eval_loss"],
        "num_examples": info.num_eval_examples,
        "image_size": config.image_size,
        "weights": str(weights),
        "weights_source": loaded.source,
        "model": loaded.name,
        "weights_image_size": list(loaded.image_size),
        "dataset": config.dataset,
        "split": config.eval_split,
        "augment": config.augment,
        "crop_fraction": config.eval_crop_fraction,
        "interpolation": config.eval_interpolation,
    }


def write_metrics(path: PathLike, metrics: dict[str, Any]) -> None:
    """Writes ``metrics`` as JSON to ``path`` (folder created), replacing it only when whole."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)
    logging.info("Wrote %s.", path)
