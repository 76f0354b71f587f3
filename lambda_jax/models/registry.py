"""Models created by name: ``create_model("lambda_resnet50")``.

A factory is a function ``fn(*, num_classes, dtype, **overrides) -> flax.linen.Module``
registered under a name with :func:`register_model`; any module can add its own. A model
known by a second name (e.g. a row of two of the paper's tables) has one name and aliases
(:func:`register_alias`): :func:`list_models` lists each model once, :func:`model_aliases`
maps every alias to its model's name, and :func:`create_model` takes both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

ModelFactory = Callable[..., nn.Module]

_FACTORIES: dict[str, ModelFactory] = {}
_ALIASES: dict[str, str] = {}  # alias -> the model's name


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``fn(*, num_classes, dtype, **overrides) -> nn.Module`` as ``name``.

    Raises:
      ValueError: if ``name`` is already registered.
    """

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _FACTORIES or name in _ALIASES:
            raise ValueError(f"A model named {name!r} is already registered.")
        _FACTORIES[name] = factory
        return factory

    return decorate


def build_model(
    name: str,
    model_class: type[nn.Module],
    settings: Mapping[str, Any],
    overrides: Mapping[str, Any],
    **fixed: Any,
) -> nn.Module:
    """``model_class(**settings, **overrides, **fixed)``: the model registered as ``name``.

    ``settings`` are the registered model's fields, ``overrides`` the caller's changes to them
    and ``fixed`` the fields every factory takes (``num_classes``, ``dtype``).

    Raises:
      ValueError: if ``overrides`` holds a name that is not a field of ``model_class``; the
        message lists the fields.
    """
    fields = {field.name for field in dataclasses.fields(model_class)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"Unknown settings {unknown} for model {name!r}; the settings are "
            f"{sorted(fields - set(fixed))}."
        )
    return model_class(**{**settings, **overrides, **fixed})


def register_alias(alias: str, name: str) -> None:
    """Makes ``alias`` a second name of the registered model ``name``.

    Raises:
      ValueError: if ``alias`` is already a name or an alias, or ``name`` is not a model.
    """
    if alias in _FACTORIES or alias in _ALIASES:
        raise ValueError(f"A model named {alias!r} is already registered.")
    if name not in _FACTORIES:
        raise ValueError(f"Cannot alias {alias!r} to {name!r}: no model is registered as {name!r}.")
    _ALIASES[alias] = name


def _json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = getattr(type(value), "kind", type(value).__name__)
        return {"kind": kind, **{field.name: _json_value(getattr(value, field.name))
                                 for field in dataclasses.fields(value)}}
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return np.dtype(value).name
    except TypeError:
        return repr(value)


def model_settings(model: nn.Module) -> dict[str, Any]:
    """Every field of ``model`` as JSON-ready values, to record with what it was trained.

    Slots become ``{"kind": ..., **their fields}``, sequences lists and dtypes their names
    (``"bfloat16"``). Models with equal settings are the same model (an alias gives its
    model's), so a training run can store them with its checkpoints and refuse to resume
    with a model that computes something else, e.g. a ``ResNet`` of another ``stride_pool``.
    """
    return {field.name: _json_value(getattr(model, field.name))
            for field in dataclasses.fields(model) if field.name not in ("parent", "name")}


def list_models(include_aliases: bool = False) -> list[str]:
    """The models' names, each model once, sorted; with ``include_aliases`` every name
    :func:`create_model` accepts, aliases included."""
    return sorted({**_FACTORIES, **_ALIASES} if include_aliases else _FACTORIES)


def model_aliases() -> dict[str, str]:
    """``{alias: name}`` for every alias, sorted by alias."""
    return dict(sorted(_ALIASES.items()))


def canonical_name(name: str) -> str:
    """The model's name for ``name``, a name or an alias.

    Raises:
      ValueError: for an unknown name; the message lists the known ones.
    """
    if name in _FACTORIES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise ValueError(
        f"Unknown model {name!r}. Known models: {', '.join(list_models())}; aliases: "
        f"{', '.join(f'{alias} ({model})' for alias, model in model_aliases().items())}."
    )


def create_model(
    name: str, *, num_classes: int = 1000, dtype: Any = jnp.float32, **overrides: Any
) -> nn.Module:
    """Builds the model registered as ``name``.

    Args:
      name: one of :func:`list_models`, or an alias (:func:`model_aliases`).
      num_classes: size of the classifier output.
      dtype: compute dtype (parameters stay in ``param_dtype``, float32 by default); the
        logits are always float32.
      **overrides: fields of the model to change, e.g. ``axis_name="batch"`` for cross-device
        batch norm, ``param_dtype``, ``drop_path_rate``, ``dropout_rate``, ``stage_depths``,
        ``stage_slots``, ``lambda_implementation``, ``stride_pool``.

    Returns:
      An unbound flax.linen module: ``model.init(rng, images, train=False)`` with images
      ``[batch, height, width, 3]``; ``model.apply(variables, images, train=...)`` gives
      logits ``[batch, num_classes]``.

    Raises:
      ValueError: for an unknown name (the message lists the known ones) or an override
        that is not a field of the model.
    """
    return _FACTORIES[canonical_name(name)](num_classes=num_classes, dtype=dtype, **overrides)
