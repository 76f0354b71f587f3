"""The grain iterator position in a checkpoint: one file per host, checked on restore.

Each step's ``data`` item holds ``process_<i>-of-<n>.json`` for every host ``i`` of ``n``. A
checkpoint saved by another number of processes or data workers resumes at the same global
example index (:mod:`lambda_jax.train.data_position`), from every host's file.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from lambda_jax.train import data_position
from lambda_jax.train.checkpoint_integrity import (
    CheckpointError,
    DamagedCheckpointError,
    data_checksum,
    unreadable,
)


def _file_name(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


def _own_file() -> str:
    return _file_name(jax.process_index(), jax.process_count())


def _state_text(data_iterator: Iterator) -> str:
    state = data_iterator.get_state()
    return state.decode() if isinstance(state, bytes) else json.dumps(state)


def move_to(data_iterator: Iterator, state: dict[str, Any]) -> None:
    """Moves ``data_iterator`` to ``state``, one of :func:`saved_position`'s."""
    as_bytes = isinstance(data_iterator.get_state(), bytes)
    data_iterator.set_state(json.dumps(state).encode() if as_bytes else state)


def position_checksums(data_iterator: Iterator) -> dict[str, str]:
    """``{"process_0-of-2.json": "1a2b3c4d", ...}``: every host's position, gathered."""
    # uint32: without jax_enable_x64, int64 would be gathered as int32 and wrap.
    data = np.array([int(data_checksum(_state_text(data_iterator)), 16)], np.uint32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        data = multihost_utils.process_allgather(data).reshape(-1)
    return {_file_name(i, jax.process_count()): f"{int(crc):08x}"
            for i, crc in enumerate(data)}


def _read_position(step: int, step_dir: epath.Path, name: str,
                   expected: Optional[str]) -> dict[str, Any]:
    path = step_dir / "data" / name
    try:
        text = path.read_text()
        state = json.loads(text)
    except Exception as error:
        raise unreadable(step, str(step_dir), error) from error
    if expected is not None and data_checksum(text) != expected:
        raise DamagedCheckpointError(step, str(step_dir),
                                     f"the checksum of {path} does not match.")
    return state


def saved_position(step: int, step_dir: epath.Path, expected: dict[str, str],
                   data_iterator: Iterator, global_batch_size: Optional[int]) -> dict[str, Any]:
    """This process's iterator state at ``step``, verified against ``expected`` (the data
    checksums); converted through the global example index when the checkpoint was saved by
    another process or worker count.

    Raises:
      DamagedCheckpointError: if a file fails its checksum, cannot be read, or none is there.
      CheckpointError: if the position cannot be carried over to this host layout.
    """
    names = sorted((p.name for p in (step_dir / "data").glob("process_*-of-*.json")),
                   key=lambda n: int(n[len("process_"):].split("-", 1)[0]))
    fresh = json.loads(_state_text(data_iterator))
    if _own_file() in names:
        own = _read_position(step, step_dir, _own_file(), expected.get(_own_file()))
        if data_position.layout(own) == data_position.layout(fresh):
            return own
    if not names:
        raise DamagedCheckpointError(step, str(step_dir), "it holds no data iterator position.")
    saved = [_read_position(step, step_dir, name, expected.get(name)) for name in names]
    num_examples = data_position.examples_read(saved)
    if global_batch_size is None:
        raise CheckpointError(
            f"{step_dir} was saved by {len(names)} processes (data workers "
            f"{data_position.layout(saved[0])}); pass global_batch_size to resume it on "
            f"{jax.process_count()} (data workers {data_position.layout(fresh)}).")
    try:
        state = data_position.state_at(fresh, num_examples, global_batch_size,
                                       jax.process_index(), jax.process_count())
    except ValueError as error:
        raise CheckpointError(f"{step_dir}: {error}") from None
    logging.warning(
        "Step %d was saved by %d processes with %d data workers each; continuing on %d "
        "processes with %d: the data resumes at global example %d.", step, len(names),
        data_position.layout(saved[0]), jax.process_count(), data_position.layout(fresh),
        num_examples)
    return state

