"""What every source of weights gives back: :class:`ModelWeights`, and the paths it reads."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import flax.linen as nn

PathLike = Union[str, os.PathLike]

WEIGHTS_KINDS = ("a timm .safetensors file, a file written by lambda_jax.save_model, a "
                 "train.py workdir, or 'hf-hub:<repo_id>'")


@dataclasses.dataclass(frozen=True)
class ModelWeights:
    """A model and its variables, with what they were built for.

    Attributes:
      model: the ``flax.linen`` module.
      variables: ``{"params": ..., "batch_stats": ...}``.
      name: the registered model name.
      image_size: ``(height, width)`` the variables are built for (global position tables
        cover exactly that size; :func:`lambda_jax.resize_relative_embeddings` moves them).
      channels: image channels of the first layer.
      source: where the variables came from, e.g. ``"/runs/a/checkpoints/200 (EMA)"``.
      run_config: the training config of a workdir's run (a dict), else None.
    """

    model: nn.Module
    variables: dict
    name: str
    image_size: tuple[int, int]
    channels: int
    source: str
    run_config: Optional[dict] = None
