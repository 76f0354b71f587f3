"""Orbax checkpoints of the train state and the data iterator, verified on restore.

Each step directory holds four items: ``state`` (the :class:`TrainState` as numpy arrays),
``data`` (the grain iterator position, one file per host), ``run`` (JSON: the model and the
config that defines the run) and ``checksums`` (JSON: a CRC-32 with dtype and shape of every
state array, and a CRC-32 of each host's iterator position). Orbax writes all items of a step
to a temporary directory and renames it when complete, so a step is never present without its
checksums, and a save cut short by a crash leaves the previous checkpoints intact; leftovers
are removed when the manager opens.

A checkpoint saved by another number of processes or data workers resumes at the same
global example index (:mod:`lambda_jax.train.data_position`), from every host's file.

A checkpoint that fails verification, or cannot be read, is *damaged*: it is moved, never
deleted, to ``<workdir>/checkpoints_damaged/<step>`` and the run resumes from the newest
intact one. A directory in ``checkpoints/`` named like a step but holding no checkpoint is
moved there too; other directories are left alone with a warning.

The pieces, bottom to top: :mod:`~lambda_jax.train.checkpoint_integrity` (errors, checksums,
damaged steps), :mod:`~lambda_jax.train.checkpoint_data` (the iterator position per host),
:mod:`~lambda_jax.train.checkpoint_manager` (:class:`Checkpointer`) and
:mod:`~lambda_jax.train.checkpoint_weights` (:func:`read_weights`).
"""

from lambda_jax.train.checkpoint_integrity import (
    DAMAGED_DIR,
    CheckpointError,
    DamagedCheckpointError,
    NonFiniteError,
    state_checksums,
)
from lambda_jax.train.checkpoint_manager import BEST_METRIC, ITEMS, Checkpointer
from lambda_jax.train.checkpoint_weights import read_weights

__all__ = [
    "BEST_METRIC",
    "CheckpointError",
    "Checkpointer",
    "DAMAGED_DIR",
    "DamagedCheckpointError",
    "ITEMS",
    "NonFiniteError",
    "read_weights",
    "state_checksums",
]
