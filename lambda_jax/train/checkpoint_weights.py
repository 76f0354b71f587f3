"""Weights out of another run's checkpoint, for fine-tuning (``config.init_from``)."""

from __future__ import annotations

from typing import Any

import jax
from etils import epath

from lambda_jax.train.checkpoint_integrity import check_weights_fit, flatten
from lambda_jax.train.checkpoint_manager import Checkpointer


def read_weights(source: Any, template: dict[str, Any]) -> dict[str, Any]:
    """The arrays of another run's checkpoint that ``template`` names, in its structure.

    For fine-tuning (``config.init_from``): the optimizer state and step start afresh.

    Args:
      source: a workdir (its newest checkpoint), its ``checkpoints`` directory, or one step
        directory ``<workdir>/checkpoints/<step>``.
      template: ``{"params": ..., "batch_stats": ..., ...}`` of host arrays; each saved array
        must have the same path, dtype and shape.

    Raises:
      CheckpointError: if nothing there verifies, or the arrays do not fit ``template``.
    """
    path, step = epath.Path(source), None
    if path.name.isdigit() and (path / "state").exists():
        path, step = path.parent, int(path.name)
    elif (path / "checkpoints").exists():
        path = path / "checkpoints"
    reader = Checkpointer(path, keep=1, async_saves=False, read_only=True)
    try:
        saved = flatten(reader.read_state(step))
    finally:
        reader.close()
    check_weights_fit(source, saved, template)
    return jax.tree.unflatten(jax.tree.structure(template),
                              [saved[name] for name in flatten(template)])
