"""lambda_jax's own export: one safetensors file that any safetensors reader reads, with a
record of the model, settings and image size that rebuild it (:func:`save_model` describes it).
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Any, Mapping, Optional

import jax
import numpy as np

from lambda_jax.convert import state_dict as sd
from lambda_jax.models.registry import create_model
from lambda_jax.weights import files, fitting, settings
from lambda_jax.weights.base import ModelWeights, PathLike
from lambda_jax.weights.files import METADATA_KEY

FORMAT_VERSION = 1


def read(path: pathlib.Path) -> tuple[dict[str, np.ndarray], Optional[dict[str, Any]]]:
    """The tensors of a safetensors file and its lambda_jax record (None for other files).

    Raises:
      ValueError: the file is not safetensors, its record is damaged, or it is of a newer
        format than this lambda_jax reads.
    """
    tensors, metadata = files.read(path)
    if METADATA_KEY not in metadata:
        return tensors, None
    try:
        record = json.loads(metadata[METADATA_KEY])
        version = record["format_version"]
        fields = (record["model"], record["settings"], record["image_size"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: its {METADATA_KEY!r} metadata is damaged ({error!r}); "
                         "export the weights again with lambda_jax.save_model.") from error
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} is an export of format {version!r}; this lambda_jax reads "
                         f"format {FORMAT_VERSION}: upgrade lambda_jax.")
    if not (isinstance(fields[0], str) and isinstance(fields[1], dict)
            and isinstance(fields[2], list) and len(fields[2]) == 2):
        raise ValueError(f"{path}: its {METADATA_KEY!r} metadata is damaged ({record!r}); "
                         "export the weights again with lambda_jax.save_model.")
    return tensors, record


def load_export(path: pathlib.Path, arrays: Mapping[str, np.ndarray], record: Mapping[str, Any],
                name: Optional[str], overrides: Mapping[str, Any]) -> ModelWeights:
    """The model an export's ``record`` names, rebuilt with its settings, and its ``arrays``.

    ``overrides`` go on top of the recorded settings and may change runtime settings only.

    Raises:
      ValueError: ``name`` is another model, or ``overrides`` conflict with the record.
      StateDictMismatchError: ``arrays`` do not fit the model, naming every key.
    """
    name = settings.check_name(str(path), record["model"], name)
    model_settings = settings.fixed_settings(str(path), "the export", name,
                                             settings.decode(record["settings"]), overrides)
    model = create_model(name, **model_settings)
    side, channels = tuple(record["image_size"]), record.get("channels", 3)
    try:
        variables = fitting.fit_variables(name, model, arrays, side, channels)
    except sd.StateDictMismatchError as error:
        raise sd.StateDictMismatchError(
            f"{path} (an export of {name!r} with settings {record['settings']}): {error}"
        ) from None
    return ModelWeights(model, variables, name, side, channels, str(path))


def _fsync_folder(folder: pathlib.Path) -> None:
    # A rename survives a crash only once the folder that holds it is synced.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_model(path: PathLike, name: str, variables: Mapping[str, Any],
               **overrides: Any) -> pathlib.Path:
    """Writes ``variables`` of ``create_model(name, **overrides)`` as a portable export.

    The file is safetensors: a tensor per variable, keyed by its path
    (``"params/stages_0_0/conv1/kernel"``, ``"batch_stats/..."``), and, as JSON under the
    metadata key ``"lambda_jax"``, ``{"format_version", "model", "settings", "image_size",
    "channels"}`` (files without ``channels`` are read as RGB).
    :func:`load_model` reads it back into the same model and the same arrays. The variables
    are checked against the model before anything is written, and the file is written beside
    ``path`` and then renamed onto it, so a failed or interrupted save leaves an existing file
    as it was.

    Args:
      path: the file to write (``.safetensors`` by convention); its folder is created.
      name: one of :func:`lambda_jax.list_models`.
      variables: ``{"params": ..., "batch_stats": ...}`` of that model, arrays on this host
        (``jax.device_get`` reads them).
      **overrides: the settings the model was created with (``num_classes``, ``stage_slots``,
        ...): None, booleans, numbers, strings, dtypes, lambda_jax's slot dataclasses, and
        lists or dicts of them.

    Returns:
      The path written.

    Raises:
      StateDictMismatchError: if ``variables`` do not fit the model, naming every key.
      TypeError: for a setting that cannot be recorded.
      ValueError: for an unknown model name or setting.
    """
    from lambda_jax import __version__

    safetensors = files.safetensors_module()
    recorded = {key: settings.encode(value, key) for key, value in overrides.items()}
    model = create_model(name, **overrides)
    arrays = {key: np.ascontiguousarray(jax.device_get(leaf))
              for key, leaf in fitting.flat(variables).items()}
    side, channels = fitting.first_fit(
        lambda channels: fitting.built_side(name, model, arrays, channels))
    record = {"format_version": FORMAT_VERSION, "model": name, "settings": recorded,
              "image_size": list(side), "channels": channels,
              "lambda_jax_version": __version__}
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; save_model writes one file, e.g. "
                                f"{path / 'model.safetensors'}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        safetensors.numpy.save_file(
            arrays, str(temporary), metadata={"format": "flax", METADATA_KEY: json.dumps(record)})
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_folder(path.parent)
    return path
