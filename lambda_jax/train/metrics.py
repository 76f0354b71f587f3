"""Training metrics: TensorBoard event files, a console progress line, final_metrics.json,
and the training throughput.

Every file goes through ``etils.epath``, so the workdir may be local or remote (``gs://...``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import jax
from absl import logging
from etils import epath


def is_remote(path: Any) -> bool:
    """True for a URL such as ``gs://bucket/run``; False for a local path."""
    return "://" in str(path)


class MetricWriter:
    """Writes scalars to TensorBoard event files in ``workdir`` and logs a progress line.

    tensorboardX writes a local workdir directly. For a remote one it writes to a local
    temporary directory and each ``write`` copies the event files there through ``epath``:
    tensorboardX's own ``gs://`` writer needs ``google-cloud-storage`` and its own
    credentials, and knows no other remote file system, while ``epath`` is what the
    checkpoints already use (one file system layer, one set of credentials, any backend).
    Only process 0 writes; other hosts' calls are no-ops.
    """

    def __init__(self, workdir: Any):
        self._writer = None
        self._remote: Optional[epath.Path] = None
        self._local: Optional[str] = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            logdir = str(workdir)
            if is_remote(workdir):
                self._remote = epath.Path(workdir)
                self._local = logdir = tempfile.mkdtemp(prefix="lambda_jax_events_")
            self._writer = SummaryWriter(logdir=logdir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self._remote is None:
            return
        self._remote.mkdir(parents=True, exist_ok=True)
        for event_file in epath.Path(self._local).iterdir():
            (self._remote / event_file.name).write_bytes(event_file.read_bytes())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._upload()
            self._writer = None
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None


class Throughput:
    """Training examples per second over an interval, without the time spent in ``paused()``
    blocks (evaluation, checkpoint saves), so the figure measures training alone.

    Args:
      step: the step the first interval starts at.
      clock: seconds as a float (default ``time.perf_counter``).
    """

    def __init__(self, step: int, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._start, self._step, self._paused = clock(), step, 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside this block is not counted."""
        start = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - start

    def examples_per_second(self, step: int, batch_size: int) -> float:
        """``batch_size`` examples per step from the interval's start to ``step``; starts the
        next interval."""
        now = self._clock()
        elapsed = now - self._start - self._paused
        rate = (step - self._step) * batch_size / max(elapsed, 1e-9)
        self._start, self._step, self._paused = now, step, 0.0
        return rate


def progress_line(step: int, num_steps: int, scalars: dict[str, float]) -> str:
    """``step 120/800 | train_loss 0.532 | ...`` with four significant digits."""
    fields = " | ".join(f"{name} {value:.4g}" for name, value in scalars.items())
    return f"step {step}/{num_steps} | {fields}"


def log_progress(step: int, num_steps: int, scalars: dict[str, float]) -> None:
    if jax.process_index() == 0:
        logging.info("%s", progress_line(step, num_steps, scalars))


def write_json(workdir: Any, name: str, text: str) -> Optional[epath.Path]:
    """Writes ``text`` to ``<workdir>/<name>`` on process 0 (through ``epath``), its path."""
    if jax.process_index() != 0:
        return None
    path = epath.Path(workdir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_final_metrics(workdir: Any, metrics: dict[str, Any]) -> Optional[epath.Path]:
    """Writes ``<workdir>/final_metrics.json`` on process 0 and returns its path."""
    return write_json(workdir, "final_metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
