"""Training metrics: TensorBoard event files, a console progress line, final_metrics.json."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
from absl import logging


class MetricWriter:
    """Writes scalars to TensorBoard event files in ``workdir`` and logs a progress line.

    Only process 0 writes; other hosts' calls are no-ops.
    """

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=workdir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def progress_line(step: int, num_steps: int, scalars: dict[str, float]) -> str:
    """``step 120/800 | train_loss 0.532 | ...`` with four significant digits."""
    fields = " | ".join(f"{name} {value:.4g}" for name, value in scalars.items())
    return f"step {step}/{num_steps} | {fields}"


def log_progress(step: int, num_steps: int, scalars: dict[str, float]) -> None:
    if jax.process_index() == 0:
        logging.info("%s", progress_line(step, num_steps, scalars))


def write_final_metrics(workdir: str, metrics: dict[str, Any]) -> Optional[str]:
    """Writes ``<workdir>/final_metrics.json`` on process 0 and returns its path."""
    if jax.process_index() != 0:
        return None
    path = os.path.join(workdir, "final_metrics.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    return path
