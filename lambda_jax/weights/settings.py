"""The settings a model was created with: recorded as JSON, and checked against overrides."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lambda_jax.models.registry import create_model

# Settings that change how a model computes or trains, not what its variables are or mean:
# load_model may give them other values than an export records.
RUNTIME_SETTINGS = frozenset({"dtype", "param_dtype", "axis_name", "drop_path_rate",
                              "dropout_rate", "lambda_implementation"})


def encode(value: Any, setting: str) -> Any:
    """``value`` of ``setting`` as JSON: dtypes and lambda_jax's frozen dataclasses tagged."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [encode(item, setting) for item in value]
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return {key: encode(item, setting) for key, item in value.items()}
    if (dataclasses.is_dataclass(value) and not isinstance(value, (type, nn.Module))
            and type(value).__dataclass_params__.frozen
            and type(value).__module__.startswith("lambda_jax.")):
        fields = {field.name: encode(getattr(value, field.name), setting)
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


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`, with lists as tuples."""
    if isinstance(value, list):
        return tuple(decode(item) for item in value)
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
        return cls(**{key: decode(item) for key, item in value["fields"].items()})
    return {key: decode(item) for key, item in value.items()}


def _same_setting(given: Any, recorded: Any) -> bool:
    try:
        return given == recorded or encode(given, "") == encode(recorded, "")
    except TypeError:
        return False


def check_name(source: str, holds: str, name: Optional[str]) -> str:
    """``holds``, the model a source was saved from, if ``name`` is None or names it."""
    if name is not None and name != holds:
        raise ValueError(f"{source} holds weights of {holds!r}, not {name!r}: call "
                         f"load_model({holds!r}, weights=...), or name=None for the model it "
                         "holds.")
    return holds


def fixed_settings(source: str, noun: str, name: str, recorded: Mapping[str, Any],
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
