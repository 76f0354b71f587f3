"""Fitting flat arrays onto a model's variables: keys, expected shapes, the image size built for.

A variable's key is its path in the linen variables tree joined by ``/``:
``"params/stages_0_0/conv1/kernel"``, ``"batch_stats/..."``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.convert import state_dict as sd
from lambda_jax.models import ARCHITECTURES

# Image side for a registered model that ARCHITECTURES does not describe.
_DEFAULT_SIDE = 224
# Image channels tried, in order, when a file does not record them: RGB, then grey.
_CHANNELS = (3, 1)


def _key(path: tuple) -> str:
    return "/".join(str(getattr(entry, "key", entry)) for entry in path)


def flat(tree: Any) -> dict[str, Any]:
    """``{"params/stage/module/kernel": leaf}`` for a variables tree."""
    return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected(model: nn.Module, side: tuple[int, int], channels: int = 3) -> Any:
    """The variables tree of ``model`` for ``[1, *side, channels]`` images, as shapes only."""
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


def fit_variables(name: str, model: nn.Module, arrays: Mapping[str, Any], side: tuple[int, int],
                  channels: int) -> Any:
    """``model``'s variables for ``[batch, *side, channels]`` images, from ``arrays``.

    Returns:
      The variables tree with each leaf taken from ``arrays`` under its key, as a jax array in
      the model's dtype.

    Raises:
      StateDictMismatchError: naming every missing, unexpected or misshapen key.
    """
    expected = _expected(model, side, channels)
    return sd.cast_like(_take(arrays, expected, _target(name, side, channels)), expected)


def first_fit(fit: Callable[[int], Any]) -> tuple[Any, int]:
    """``(fit(channels), channels)`` for the first of _CHANNELS that fits; else RGB's error."""
    first_error = None
    for channels in _CHANNELS:
        try:
            return fit(channels), channels
        except sd.StateDictMismatchError as error:
            first_error = first_error or error
    raise first_error


def built_side(name: str, model: nn.Module, arrays: Mapping[str, Any],
               channels: int) -> tuple[int, int]:
    """The image size whose variables ``arrays`` are (checked), by default the model's own.

    Relative position tables span ``2S - 1`` offsets of a layer input of side ``S``, which
    scales with the image side, so a table of another length gives the side it was built for.
    """
    side = getattr(model, "image_size", None) or ARCHITECTURES.get(name, {}).get(
        "resolution", _DEFAULT_SIDE)
    default = (side, side)
    expected = _expected(model, default, channels)
    for key, struct in flat(expected).items():
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
