"""What makes a saved step usable: its checksums, the checks against them, damaged steps.

A step's ``checksums`` item holds a CRC-32 with dtype and shape of every state array and a
CRC-32 of each host's iterator position. A step that fails them, or cannot be read, is
*damaged*: it is moved, never deleted, to ``<workdir>/checkpoints_damaged/<step>``.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from lambda_jax.train.parallel import barrier

DAMAGED_DIR = "checkpoints_damaged"
# Written by Orbax into every finished step directory.
_STEP_MARKER = "_CHECKPOINT_METADATA"
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or from a different run."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files fail verification or cannot be read."""

    def __init__(self, step: int, path: str, reason: str):
        super().__init__(f"The checkpoint of step {step} at {path} is damaged: {reason}")
        self.step, self.path = step, path


class NonFiniteError(FloatingPointError):
    """A NaN or infinity in the training metrics or in a state about to be saved."""


def unreadable(step: int, path: str, error: Exception) -> DamagedCheckpointError:
    """The error for a step whose files could not be read, naming the cause."""
    return DamagedCheckpointError(step, path,
                                  f"{type(error).__name__}: {str(error).rstrip('.')}.")


def _path_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten(tree: Any) -> dict[str, Any]:
    """``{"params/conv/kernel": leaf}``: the same names for a TrainState and its dict form."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_path_name(k) for k in path): leaf for path, leaf in leaves}


def array_spec(array: Any) -> str:
    """``"float32[3,3,16,16]"``: the dtype and shape of ``array``."""
    array = np.asarray(array)
    return f"{array.dtype}[{','.join(map(str, array.shape))}]"


def state_checksums(state: Any, check_finite: bool = True) -> dict[str, str]:
    """``{array path: "float32[3,3,16,16]:1a2b3c4d"}``: dtype, shape and CRC-32 of each array.

    Raises:
      NonFiniteError: naming the arrays, if ``check_finite`` and a floating-point array holds
        a NaN or infinity.
    """
    checksums, non_finite = {}, []
    for name, leaf in flatten(state).items():
        array = np.asarray(leaf)
        if (check_finite and np.issubdtype(array.dtype, np.floating)
                and not np.isfinite(array).all()):
            non_finite.append(name)
        checksums[name] = (f"{array_spec(array)}:"
                           f"{zlib.crc32(np.ascontiguousarray(array).tobytes()):08x}")
    if non_finite:
        raise NonFiniteError(f"non-finite values in {', '.join(non_finite[:5])}"
                             + (f" and {len(non_finite) - 5} more arrays" if len(non_finite) > 5
                                else ""))
    return checksums


def data_checksum(text: str) -> str:
    """CRC-32 of an iterator position, insensitive to how its JSON is laid out."""
    try:
        text = json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        pass
    return f"{zlib.crc32(text.encode()):08x}"


def _some_names(names: list[str]) -> str:
    return f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def check_fits(path: str, saved: dict[str, str], template: Any) -> None:
    """Refuses a step whose arrays (``saved``: its state checksums) are not ``template``'s.

    Raises:
      CheckpointError: listing the arrays of another dtype or shape, or missing on one side.
    """
    wanted = {name: array_spec(leaf) for name, leaf in flatten(template).items()}
    specs = {name: value.rsplit(":", 1)[0] for name, value in saved.items()}
    if wanted != specs:
        differ = sorted(k for k in set(wanted) | set(specs) if wanted.get(k) != specs.get(k))
        raise CheckpointError(
            f"{path} holds a train state that does not fit this config: "
            + "; ".join(f"{k}: checkpoint {specs.get(k)}, config {wanted.get(k)}"
                        for k in differ[:5])
            + ". Resume with the config it was saved with, or start a new --workdir with "
            "--config.init_from to take its weights.")


def verify_state(step: int, path: str, saved: dict[str, str], state: Any) -> None:
    """Checks a restored ``state`` against the state checksums ``saved`` with it.

    Raises:
      DamagedCheckpointError: naming the arrays that do not match.
    """
    restored = state_checksums(state, check_finite=False)
    wrong = [name for name, value in restored.items() if saved.get(name) != value]
    if wrong or set(saved) != set(restored):
        names = wrong or sorted(set(saved) ^ set(restored))
        raise DamagedCheckpointError(
            step, path, f"the checksums of {len(names)} arrays do not match "
            f"({_some_names(names)}).")


def check_weights_fit(source: Any, saved: dict[str, Any], template: Any) -> None:
    """Refuses weights (``saved``: flattened arrays) that do not cover ``template``'s.

    Raises:
      CheckpointError: listing the arrays missing from ``saved`` or of another dtype or shape.
    """
    differ = [name for name, leaf in flatten(template).items()
              if name not in saved or array_spec(saved[name]) != array_spec(leaf)]
    if differ:
        raise CheckpointError(
            f"config.init_from={source}: {len(differ)} arrays of this model are missing there or "
            f"have another dtype or shape ({_some_names(differ)}).")


def move_aside(path: epath.Path, damaged_directory: epath.Path) -> epath.Path:
    """Moves ``path`` into ``damaged_directory`` under a name no earlier move took."""
    damaged_directory.mkdir(parents=True, exist_ok=True)
    destination, n = damaged_directory / path.name, 0
    while destination.exists():
        n += 1
        destination = damaged_directory / f"{path.name}.{n}"
    path.rename(destination)
    return destination


def set_aside_strays(directory: epath.Path, damaged_directory: epath.Path) -> None:
    """Moves step-named directories without a checkpoint aside; warns about the rest."""
    if jax.process_index() == 0 and directory.exists():
        for child in sorted(directory.iterdir()):
            if not child.is_dir() or _TMP_MARKER in child.name:
                continue
            if not child.name.isdigit():
                logging.warning("Skipping %s: not a step directory.", child)
            elif not (child / _STEP_MARKER).exists():
                destination = move_aside(child, damaged_directory)
                logging.warning("%s is named like a step but holds no checkpoint; moved it "
                                "to %s.", child, destination)
    barrier("lambda_jax_checkpoint_strays")
