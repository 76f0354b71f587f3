"""The entry points: the source that ``weights`` names (a file, a workdir, ``"hf-hub:..."``)."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

import flax.linen as nn

from lambda_jax.layers.lambda_layer import LambdaLayer
from lambda_jax.weights import export, pytorch, workdir
from lambda_jax.weights.base import WEIGHTS_KINDS, ModelWeights, PathLike
from lambda_jax.weights.hub import HUB_PREFIX, hub_file


def _resolve(weights: PathLike, name: Optional[str]) -> pathlib.Path:
    """The file or directory that ``weights`` (a path or ``"hf-hub:..."``) names."""
    if isinstance(weights, str) and weights.startswith(HUB_PREFIX):
        return hub_file(weights[len(HUB_PREFIX):], name)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights is the path of {WEIGHTS_KINDS}, got "
                        f"{type(weights).__name__}.")
    path = pathlib.Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No weights file or workdir at {path}: give the path of "
                                f"{WEIGHTS_KINDS}.")
    return path


def open_weights(name: Optional[str], weights: PathLike, **overrides: Any) -> ModelWeights:
    """:func:`load_model` with what the variables were built for: a :class:`ModelWeights`.

    Arguments and errors are those of :func:`load_model`.
    """
    path = _resolve(weights, name)
    if path.is_dir():
        return workdir.load_workdir(path, name, overrides)
    arrays, record = export.read(path)
    if record is None:
        return pytorch.load_timm(path, arrays, name, overrides)
    return export.load_export(path, arrays, record, name, overrides)


def load_model(name: Optional[str], weights: PathLike,
               **overrides: Any) -> tuple[nn.Module, dict]:
    """The model registered as ``name`` with the variables of ``weights``.

    Args:
      name: one of :func:`lambda_jax.list_models`; None for the model that an export or a
        workdir holds (a timm file needs the name).
      weights: where the variables are:

        * the path of a timm ``.safetensors`` file, ``timm.create_model(name).state_dict()``
          of ``lambda_resnet26t``, ``lambda_resnet50ts`` or ``lambda_resnet26rpt_256``; read
          with ``safetensors.numpy``, torch is not needed;
        * ``"hf-hub:<repo_id>"`` (``"@<revision>"`` optional), e.g.
          ``"hf-hub:timm/lambda_resnet26t.c1_in1k"``: that repository's ``model.safetensors``
          in the local Hugging Face cache (``HF_HUB_CACHE`` or ``HF_HOME``); needs
          ``huggingface_hub``, and never downloads;
        * the path of a file written by :func:`save_model`: the model is rebuilt with the
          settings it records;
        * a ``train.py`` workdir, its ``checkpoints`` folder, or one step folder
          ``<workdir>/checkpoints/<step>``: the weights evaluated by the run (its EMA
          parameters and batch statistics) of the newest checkpoint that passes its checksums
          (damaged ones are skipped with a warning and left in place), or of that step; the
          model is rebuilt with the run's model, ``model_overrides``, class count and
          ``dtype``. Nothing in the workdir is written or moved, so a run may still be
          training there. Needs orbax-checkpoint (the training extra).
      **overrides: settings passed to :func:`lambda_jax.create_model` (``num_classes``,
        ``dtype``, ...). For an export or a workdir they go on top of the recorded ones, and
        only ``dtype``, ``param_dtype``, ``axis_name``, ``drop_path_rate``,
        ``dropout_rate`` and ``lambda_implementation`` (every formulation computes the same
        layer, e.g. ``"autotune"``) may differ from them.

    Returns:
      ``(model, variables)``: ``model.apply(variables, images)`` with ``images
      [batch, height, width, channels]`` gives logits ``[batch, num_classes]``;
      ``variables`` is ``{"params": ..., "batch_stats": ...}`` in the model's
      ``param_dtype``. :func:`open_weights` also says the image size and channels they are
      built for.

    Raises:
      StateDictMismatchError: if the weights do not fit the model, naming every missing,
        unexpected or misshapen key with both shapes.
      FileNotFoundError: no such file or workdir, a workdir without checkpoints, or the
        repository is not in the Hugging Face cache (the message says where it looked).
      IsADirectoryError: ``weights`` is a directory that is not a workdir.
      ValueError: for a file that is not safetensors (a PyTorch pickle needs converting: the
        message says how), weights of another model, or conflicting settings.
      CheckpointError: every checkpoint of a workdir is damaged, or the given step is.
      ImportError: ``"hf-hub:..."`` without ``huggingface_hub`` installed.
    """
    loaded = open_weights(name, weights, **overrides)
    return loaded.model, loaded.variables


def load_layer(layer: LambdaLayer, weights: PathLike, *, prefix: str = "") -> dict:
    """Variables for ``layer`` from a file holding a timm or a lambda-networks lambda layer.

    The file is safetensors (a path or ``"hf-hub:<repo_id>"``, as for :func:`load_model`),
    with a ``timm.layers.LambdaLayer``'s state_dict (key ``qkv.weight``; converted by
    :func:`lambda_jax.convert.from_timm`) or a ``lambda_networks.LambdaLayer``'s (key
    ``to_q.weight``; :func:`lambda_jax.convert.from_lambda_networks`). ``layer`` is set like
    the PyTorch layer, as those functions describe.

    Args:
      layer: the ``LambdaLayer`` to load into; its input is ``[batch, height, width, dim]``.
      weights: the file.
      prefix: the layer's key prefix inside a bigger model's state_dict, e.g.
        ``"stages.3.0.self_attn."`` of a timm LambdaResNet; the final ``"."`` may be left off.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``layer.apply``.

    Raises:
      StateDictMismatchError: if the tensors do not fit ``layer`` (every key named), or the file
        holds no lambda layer under ``prefix``.
    """
    path = _resolve(weights, None)
    arrays, record = export.read(path)
    if record is not None:
        raise ValueError(f"{path} is an export of the model {record['model']!r}; load it with "
                         f"lambda_jax.load_model({record['model']!r}, weights=...).")
    return pytorch.layer_variables(path, arrays, layer, prefix)
