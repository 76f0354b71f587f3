"""Model weights in one call: timm's files, the Hugging Face cache and lambda_jax's exports.

``load_model(name, weights)`` returns ``lambda_jax.create_model(name)`` and its variables, with
``weights`` one of

* the path of a timm ``.safetensors`` file (``timm.create_model(name).state_dict()``), read with
  ``safetensors.numpy`` and converted by :func:`lambda_jax.convert.from_timm`: torch is never
  imported;
* ``"hf-hub:<repo_id>"`` or ``"hf-hub:<repo_id>@<revision>"``, a Hugging Face Hub repository
  found in the local Hugging Face cache (needs ``huggingface_hub``; nothing is downloaded);
* the path of a file written by :func:`save_model`;
* a training workdir of ``train.py`` (or its ``checkpoints`` folder, or one step folder
  ``<workdir>/checkpoints/<step>``): the EMA weights of its newest intact checkpoint, rebuilt
  with the model settings the run recorded.

:func:`save_model` writes a portable export: one safetensors file whose tensors are keyed by the
linen variable paths (``"params/stages_0_0/conv1/kernel"``, ``"batch_stats/..."``) and whose
metadata holds, as JSON under the key ``"lambda_jax"``, the model name, the settings it was
created with, and the image size and channels its variables are built for. Any safetensors
reader reads it.

:func:`load_layer` loads one :class:`~lambda_jax.LambdaLayer` from a file holding a timm or a
lambda-networks layer, alone or inside a bigger model.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import pathlib
import uuid
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lambda_jax.convert import from_lambda_networks, from_timm
from lambda_jax.convert import state_dict as sd
from lambda_jax.layers.lambda_layer import LambdaLayer
from lambda_jax.models import ARCHITECTURES, byoanet
from lambda_jax.models.registry import create_model

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

METADATA_KEY = "lambda_jax"
FORMAT_VERSION = 1
HUB_PREFIX = "hf-hub:"
# The weights files of a timm repository on the Hub, in the order they are tried.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
# Settings that change how a model computes or trains, not what its variables are or mean:
# load_model may give them other values than an export records.
RUNTIME_SETTINGS = frozenset({"dtype", "param_dtype", "axis_name", "drop_path_rate",
                              "dropout_rate"})
# Image side for a registered model that ARCHITECTURES does not describe.
_DEFAULT_SIDE = 224
# Image channels tried, in order, when a file does not record them: RGB, then grey.
_CHANNELS = (3, 1)
_WEIGHTS_KINDS = ("a timm .safetensors file, a file written by lambda_jax.save_model, a "
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


def _torch_conversion(path: Any) -> str:
    return ("Reading it needs torch; convert it once where torch is installed: `import torch, "
            f"safetensors.torch; safetensors.torch.save_file(torch.load({str(path)!r}, "
            "map_location='cpu'), 'model.safetensors')`, and pass the .safetensors file.")


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as error:
        raise ImportError("Reading and writing weight files needs safetensors: "
                          "pip install safetensors") from error
    return safetensors


def _hub_file(spec: str, name: Optional[str]) -> pathlib.Path:
    """The cached weights file of ``spec``, ``<repo_id>[@<revision>]``, in the HF cache."""
    repo_id, _, revision = spec.partition("@")
    if not repo_id:
        raise ValueError(f"{HUB_PREFIX!r} needs a repository id, e.g. "
                         "'hf-hub:timm/lambda_resnet26t.c1_in1k' or '...@<revision>'.")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as error:
        raise ImportError(
            f"Weights {HUB_PREFIX}{spec} are looked up in the Hugging Face cache, which needs "
            "huggingface_hub: pip install huggingface_hub (or pass the path of a downloaded "
            ".safetensors file)."
        ) from error
    cached = {}
    for filename in (*HUB_FILES, "config.json"):
        found = huggingface_hub.try_to_load_from_cache(repo_id, filename,
                                                       revision=revision or None)
        if isinstance(found, str):
            cached[filename] = found
    if name is not None and "config.json" in cached:
        with open(cached["config.json"]) as f:
            try:
                config = json.load(f)
            except ValueError:  # the check is a courtesy; from_timm still checks every key
                config = {}
        architecture = config.get("architecture") if isinstance(config, dict) else None
        if architecture is not None and architecture != name:
            raise ValueError(f"{repo_id} holds timm's {architecture!r} (its config.json), not "
                             f"{name!r}: call load_model({architecture!r}, "
                             f"weights={HUB_PREFIX + spec!r}).")
    if HUB_FILES[0] in cached:
        return pathlib.Path(cached[HUB_FILES[0]])
    if HUB_FILES[1] in cached:
        raise ValueError(f"The Hugging Face cache holds {repo_id}'s {HUB_FILES[1]} only, at "
                         f"{cached[HUB_FILES[1]]}: a PyTorch pickle. "
                         + _torch_conversion(cached[HUB_FILES[1]]))
    folder = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    at = f" at revision {revision!r}" if revision else ""
    raise FileNotFoundError(
        f"{repo_id}{at} is not in the Hugging Face cache: looked for {' and '.join(HUB_FILES)} "
        f"in {folder} (the cache is {constants.HF_HUB_CACHE}, set by HF_HUB_CACHE or "
        "HF_HOME). Nothing is downloaded here: fetch the file once with `python -c \"from "
        f"huggingface_hub import hf_hub_download; hf_hub_download('{repo_id}', "
        f"'{HUB_FILES[0]}')\"` or pass the path of a downloaded .safetensors file."
    )


def _resolve(weights: PathLike, name: Optional[str]) -> pathlib.Path:
    """The file or directory that ``weights`` (a path or ``"hf-hub:..."``) names."""
    if isinstance(weights, str) and weights.startswith(HUB_PREFIX):
        return _hub_file(weights[len(HUB_PREFIX):], name)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights is the path of {_WEIGHTS_KINDS}, got "
                        f"{type(weights).__name__}.")
    path = pathlib.Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No weights file or workdir at {path}: give the path of "
                                f"{_WEIGHTS_KINDS}.")
    return path


def _checkpoint_location(path: pathlib.Path) -> tuple[pathlib.Path, Optional[int]]:
    """``(checkpoints folder, step or None)`` of a workdir, its checkpoints or a step folder."""
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name == "checkpoints":
        return path, None
    raise IsADirectoryError(
        f"{path} is a directory but not a training workdir: it has no checkpoints/ folder "
        "(train.py --workdir writes one). weights is "
        f"{_WEIGHTS_KINDS}; a workdir's step folder is <workdir>/checkpoints/<step>."
    )


def _unreadable(path: pathlib.Path, error: Exception) -> ValueError:
    with open(path, "rb") as f:
        start = f.read(4)
    if start == b"PK\x03\x04" or start[:1] == b"\x80":
        return ValueError(f"{path} is a PyTorch pickle (torch.save), not a safetensors file. "
                          + _torch_conversion(path))
    return ValueError(f"{path} is not a readable safetensors file ({error}). load_model reads "
                      "timm's .safetensors files and files written by lambda_jax.save_model; "
                      "if this one was cut short, write or download it again.")


def _read(path: pathlib.Path) -> tuple[dict[str, np.ndarray], Optional[dict[str, Any]]]:
    """The tensors of a safetensors file and its lambda_jax record (None for other files)."""
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except safetensors.SafetensorError as error:
        raise _unreadable(path, error) from error
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


def _encode(value: Any, setting: str) -> Any:
    """``value`` of ``setting`` as JSON: dtypes and lambda_jax's frozen dataclasses tagged."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(item, setting) for item in value]
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return {key: _encode(item, setting) for key, item in value.items()}
    if (dataclasses.is_dataclass(value) and not isinstance(value, (type, nn.Module))
            and type(value).__dataclass_params__.frozen
            and type(value).__module__.startswith("lambda_jax.")):
        fields = {field.name: _encode(getattr(value, field.name), setting)
                  for field in dataclasses.fields(value)}
        return {"__dataclass__": f"{type(value).__module__}:{type(value).__qualname__}",
                "fields": fields}
    if isinstance(value, (type, np.dtype)):
        try:
            return {"__dtype__": np.dtype(value).name}
        except TypeError:
            pass
    raise TypeError(
        f"The setting {setting}={value!r} cannot be recorded in an export: settings are None, "
        "booleans, numbers, strings, dtypes, lambda_jax's slot dataclasses (LambdaSlot, ...) "
        "and lists or dicts of them."
    )


def _decode(value: Any) -> Any:
    """The inverse of :func:`_encode`, with lists as tuples."""
    if isinstance(value, list):
        return tuple(_decode(item) for item in value)
    if not isinstance(value, dict):
        return value
    if set(value) == {"__dtype__"}:
        return getattr(jnp, value["__dtype__"], None) or jnp.dtype(value["__dtype__"])
    if set(value) == {"__dataclass__", "fields"}:
        module_name, _, qualname = value["__dataclass__"].partition(":")
        if not module_name.startswith("lambda_jax."):
            raise ValueError(f"An export names the class {value['__dataclass__']!r}; only "
                             "lambda_jax's own classes are rebuilt.")
        cls = getattr(importlib.import_module(module_name), qualname)
        return cls(**{key: _decode(item) for key, item in value["fields"].items()})
    return {key: _decode(item) for key, item in value.items()}


def _same_setting(given: Any, recorded: Any) -> bool:
    try:
        return given == recorded or _encode(given, "") == _encode(recorded, "")
    except TypeError:
        return False


def _name_check(source: str, holds: str, name: Optional[str]) -> str:
    """``holds``, the model a source was saved from, if ``name`` is None or names it."""
    if name is not None and name != holds:
        raise ValueError(f"{source} holds weights of {holds!r}, not {name!r}: call "
                         f"load_model({holds!r}, weights=...), or name=None for the model it "
                         "holds.")
    return holds


def _fixed_settings(source: str, noun: str, name: str, recorded: Mapping[str, Any],
                    overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded settings with ``overrides`` on top, which may change runtime settings only.

    ``noun`` says what recorded them ("the export", "the run") in the messages.
    """
    saved = create_model(name, **recorded)
    conflicts = [
        f"{key}={value!r} ({noun} has {getattr(saved, key)!r})"
        for key, value in overrides.items()
        if key not in RUNTIME_SETTINGS and hasattr(saved, key)
        and not _same_setting(value, getattr(saved, key))
    ]
    if conflicts:
        raise ValueError(
            f"{source} was saved from {name!r} with other settings: {'; '.join(conflicts)}. "
            f"Saved weights fix the architecture: drop these overrides (only "
            f"{', '.join(sorted(RUNTIME_SETTINGS))} may differ), or build the other model with "
            "lambda_jax.create_model and copy into it the variables you want."
        )
    return {**recorded, **overrides}


def _key(path: tuple) -> str:
    return "/".join(str(getattr(entry, "key", entry)) for entry in path)


def _flat(tree: Any) -> dict[str, Any]:
    """``{"params/stage/module/kernel": leaf}`` for a variables tree."""
    return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected(model: nn.Module, side: tuple[int, int], channels: int = 3) -> Any:
    images = jax.ShapeDtypeStruct((1, *side, channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def _take(arrays: Mapping[str, Any], expected: Any, target: str) -> Any:
    """``expected``'s tree filled from ``arrays``; StateDictMismatchError names each misfit."""
    reader = sd.StateDictReader(arrays, target)
    taken = jax.tree_util.tree_map_with_path(
        lambda path, struct: reader.take(_key(path), struct.shape), expected)
    reader.finish()
    return taken


def _target(name: str, side: tuple[int, int], channels: int = 3) -> str:
    return f"lambda_jax's {name!r} for {side[0]}x{side[1]}x{channels} images"


def _first_fit(fit: Callable[[int], Any]) -> tuple[Any, int]:
    """``(fit(channels), channels)`` for the first of _CHANNELS that fits; else RGB's error."""
    first_error = None
    for channels in _CHANNELS:
        try:
            return fit(channels), channels
        except sd.StateDictMismatchError as error:
            first_error = first_error or error
    raise first_error


def _built_side(name: str, model: nn.Module, arrays: Mapping[str, Any],
                channels: int) -> tuple[int, int]:
    """The image size whose variables ``arrays`` are (checked), by default the model's own.

    Relative position tables span ``2S - 1`` offsets of a layer input of side ``S``, which
    scales with the image side, so a table of another length gives the side it was built for.
    """
    side = getattr(model, "image_size", None) or ARCHITECTURES.get(name, {}).get(
        "resolution", _DEFAULT_SIDE)
    default = (side, side)
    expected = _expected(model, default, channels)
    for key, struct in _flat(expected).items():
        stored = getattr(arrays.get(key), "shape", struct.shape)
        if tuple(stored) != struct.shape and len(stored) == len(struct.shape):
            built, length = next((b, s) for b, s in zip(struct.shape, stored) if b != s)
            guess, remainder = divmod(side * (length + 1), built + 1)
            if remainder == 0 and guess > 0:
                try:
                    _take(arrays, _expected(model, (guess, guess), channels), "")
                    return (guess, guess)
                except sd.StateDictMismatchError:
                    pass
            break
    _take(arrays, expected, _target(name, default, channels))
    return default


def open_weights(name: Optional[str], weights: PathLike, **overrides: Any) -> ModelWeights:
    """:func:`load_model` with what the variables were built for: a :class:`ModelWeights`.

    Arguments and errors are those of :func:`load_model`.
    """
    path = _resolve(weights, name)
    if path.is_dir():
        return _load_workdir(path, name, overrides)
    arrays, record = _read(path)
    if record is None:
        return _load_timm(path, arrays, name, overrides)
    name = _name_check(str(path), record["model"], name)
    settings = _fixed_settings(str(path), "the export", name, _decode(record["settings"]),
                               overrides)
    model = create_model(name, **settings)
    side, channels = tuple(record["image_size"]), record.get("channels", 3)
    expected = _expected(model, side, channels)
    try:
        taken = _take(arrays, expected, _target(name, side, channels))
    except sd.StateDictMismatchError as error:
        raise sd.StateDictMismatchError(
            f"{path} (an export of {name!r} with settings {record['settings']}): {error}"
        ) from None
    return ModelWeights(model, sd.cast_like(taken, expected), name, side, channels, str(path))


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
        only ``dtype``, ``param_dtype``, ``axis_name``, ``drop_path_rate`` and
        ``dropout_rate`` may differ from them.

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


def _load_timm(path: pathlib.Path, arrays: Mapping[str, np.ndarray], name: Optional[str],
               overrides: Mapping[str, Any]) -> ModelWeights:
    if any(key.startswith(("params/", "batch_stats/")) for key in arrays):
        raise ValueError(f"{path} holds lambda_jax variables but no {METADATA_KEY!r} metadata "
                         "(the model name and settings); write it with lambda_jax.save_model.")
    if name is None:
        raise ValueError(f"{path} is a timm state_dict, which does not name its model: pass "
                         f"the name, one of {', '.join(sorted(byoanet.CONFIGS))}.")
    model = create_model(name, **overrides)
    if not isinstance(model, byoanet.TimmLambdaResNet):
        raise ValueError(
            f"{path} is not a lambda_jax export (it has no {METADATA_KEY!r} metadata), so it is "
            f"read as a timm state_dict, which loads into timm's models only: "
            f"{', '.join(sorted(byoanet.CONFIGS))}; {name!r} is not one of them."
        )
    try:
        variables = from_timm(arrays, model)
    except sd.StateDictMismatchError as error:
        raise sd.StateDictMismatchError(f"{path} (read as a timm state_dict): {error}") from None
    return ModelWeights(model, variables, name, (model.image_size,) * 2, 3, str(path))


def _read_checkpoint(directory: pathlib.Path, step: Optional[int]) -> tuple[int, dict, dict]:
    """``(step, run, state)`` of ``step`` or of the newest checkpoint that verifies."""
    from lambda_jax.train import checkpoint

    if not directory.is_dir():
        raise FileNotFoundError(f"{directory.parent} has no checkpoints yet ({directory} does "
                                "not exist): train with train.py --workdir first.")
    reader = checkpoint.Checkpointer(directory, keep=1, async_saves=False, read_only=True)
    try:
        steps = reader.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {directory}: the run has not saved one "
                                    "yet (train.py saves at each evaluation and at the end).")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"No checkpoint of step {step} in {directory}; its steps "
                                    f"are {steps}.")
        damaged = []
        for candidate in [step] if step is not None else reversed(steps):
            try:
                return candidate, reader.read_run(candidate), reader.read_state(candidate)
            except checkpoint.DamagedCheckpointError as error:
                if step is not None:
                    raise
                logger.warning("%s Trying the previous checkpoint.", error)
                damaged.append(str(candidate))
        raise checkpoint.CheckpointError(
            f"Every checkpoint in {directory} is damaged (steps {', '.join(damaged)}; the "
            "warnings say why). Nothing was moved.")
    finally:
        reader.close()


def _load_workdir(path: pathlib.Path, name: Optional[str],
                  overrides: Mapping[str, Any]) -> ModelWeights:
    directory, step = _checkpoint_location(path)
    step, run, state = _read_checkpoint(directory, step)
    source = f"{directory / str(step)}"
    config = run.get("config") or {}
    name = _name_check(source, run["model"], name)
    recorded = {"num_classes": run["num_classes"], **_decode(run.get("model_overrides") or {})}
    if "dtype" in config:
        recorded["dtype"] = getattr(jnp, config["dtype"])
    settings = _fixed_settings(source, "the run", name, recorded, overrides)
    model = create_model(name, **settings)
    # The run evaluates its exponential moving average; a state without one, its parameters.
    ema = bool(state.get("ema_params"))
    arrays = _flat({"params": state["ema_params" if ema else "params"],
                    "batch_stats": state.get("ema_batch_stats" if ema else "batch_stats", {})})
    side = (config["image_size"],) * 2 if "image_size" in config else None
    try:
        if side is None:
            side, channels = _first_fit(lambda c: _built_side(name, model, arrays, c))
        taken, channels = _first_fit(
            lambda c: _take(arrays, _expected(model, side, c), _target(name, side, c)))
    except sd.StateDictMismatchError as error:
        raise sd.StateDictMismatchError(
            f"{source} (a run of {name!r} with overrides {run.get('model_overrides')}): {error}"
        ) from None
    expected = _expected(model, side, channels)
    return ModelWeights(model, sd.cast_like(taken, expected), name, side, channels,
                        f"{source} ({'EMA' if ema else 'parameters'})", config or None)


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

    safetensors = _safetensors()
    settings = {key: _encode(value, key) for key, value in overrides.items()}
    model = create_model(name, **overrides)
    arrays = {key: np.ascontiguousarray(jax.device_get(leaf))
              for key, leaf in _flat(variables).items()}
    side, channels = _first_fit(lambda channels: _built_side(name, model, arrays, channels))
    record = {"format_version": FORMAT_VERSION, "model": name, "settings": settings,
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
    if os.name == "posix":  # the rename itself survives a crash once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


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
    arrays, record = _read(path)
    if record is not None:
        raise ValueError(f"{path} is an export of the model {record['model']!r}; load it with "
                         f"lambda_jax.load_model({record['model']!r}, weights=...).")
    if prefix and not prefix.endswith("."):
        prefix += "."
    arrays = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
    if "qkv.weight" in arrays:
        return from_timm(arrays, layer)
    if "to_q.weight" in arrays:
        return from_lambda_networks(arrays, layer)
    raise sd.StateDictMismatchError(
        f"{path} holds no lambda layer under the prefix {prefix!r}: neither timm's "
        f"'{prefix}qkv.weight' nor lambda-networks' '{prefix}to_q.weight'. For a layer inside "
        "a bigger model pass its prefix, e.g. prefix='stages.3.0.self_attn'."
    )
