"""Reading a PyTorch ``state_dict`` into Flax variables, with every mismatch reported.

PyTorch and Flax lay weights out differently; the helpers here take one PyTorch tensor,
check its shape against the shape the Flax variable implies, and return it in Flax layout:

* 1x1 convolution or linear weight ``[out, in(, 1, 1)]`` -> dense kernel ``[in, out]``;
* 2-D convolution weight ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``;
* batch norm ``weight, bias, running_mean, running_var`` -> ``scale, bias`` (params) and
  ``mean, var`` (batch_stats).

Torch is never imported: tensors are read through their ``detach().cpu().numpy()``, and
NumPy arrays are taken as they are.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

# Batch-norm bookkeeping with no Flax counterpart (the momentum update does not use it).
IGNORED_SUFFIXES = ("num_batches_tracked",)


class StateDictMismatchError(ValueError):
    """A state_dict does not fit the module: missing or unexpected keys, wrong shapes."""


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device, any float dtype, with or without grad) or array as NumPy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if not hasattr(np, str(value.dtype).removeprefix("torch.")):
            value = value.float()  # bfloat16 has no NumPy counterpart
        value = value.numpy()
    return np.asarray(value)


class StateDictReader:
    """Takes tensors out of a state_dict by key and collects every problem on the way.

    Args:
      state_dict: ``{key: tensor or array}``.
      target: what the weights are loaded into, for the messages.
    """

    def __init__(self, state_dict: Mapping[str, Any], target: str):
        self._state_dict = state_dict
        self._target = target
        self._used: set[str] = set()
        self._problems: list[str] = []

    def shape(self, key: str) -> Optional[tuple[int, ...]]:
        """The shape stored under ``key``, or None if the key is absent."""
        if key not in self._state_dict:
            return None
        return tuple(to_numpy(self._state_dict[key]).shape)

    def take(self, key: str, shape: Sequence[int]) -> np.ndarray:
        """The array under ``key``, which must have ``shape`` (zeros if it is absent or wrong)."""
        shape = tuple(int(size) for size in shape)
        self._used.add(key)
        if key not in self._state_dict:
            self._problems.append(
                f"missing key {key!r}: {self._target} expects shape {shape}"
            )
            return np.zeros(shape, np.float32)
        array = to_numpy(self._state_dict[key])
        if array.shape != shape:
            self._problems.append(
                f"key {key!r} has shape {tuple(array.shape)} in the state_dict, "
                f"{self._target} expects {shape}"
            )
            return np.zeros(shape, np.float32)
        return array

    def finish(self) -> None:
        """Raises StateDictMismatchError listing every problem, unused keys included."""
        for key in self._state_dict:
            if key not in self._used and not key.endswith(IGNORED_SUFFIXES):
                self._problems.append(
                    f"unexpected key {key!r} with shape {self.shape(key)}: "
                    f"{self._target} has no variable for it"
                )
        if self._problems:
            raise StateDictMismatchError(
                f"The state_dict does not fit {self._target}:\n  "
                + "\n  ".join(self._problems)
            )


def dense_kernel(reader: StateDictReader, key: str, kernel_shape: Sequence[int],
                 conv: bool) -> np.ndarray:
    """A 1x1 convolution (``conv``) or linear weight as a dense kernel ``[in, out]``."""
    fan_in, fan_out = kernel_shape
    weight = reader.take(key, (fan_out, fan_in, 1, 1) if conv else (fan_out, fan_in))
    return weight.reshape(fan_out, fan_in).T


def conv_kernel(reader: StateDictReader, key: str, kernel_shape: Sequence[int]) -> np.ndarray:
    """A 2-D convolution weight ``[out, in, kh, kw]`` as a Flax kernel ``[kh, kw, in, out]``."""
    kh, kw, fan_in, fan_out = kernel_shape
    return reader.take(key, (fan_out, fan_in, kh, kw)).transpose(2, 3, 1, 0)


def batch_norm(reader: StateDictReader, prefix: str, features: int
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A ``BatchNorm2d`` at ``prefix`` as Flax ``(params, batch_stats)``."""
    params = {"scale": reader.take(prefix + "weight", (features,)),
              "bias": reader.take(prefix + "bias", (features,))}
    stats = {"mean": reader.take(prefix + "running_mean", (features,)),
             "var": reader.take(prefix + "running_var", (features,))}
    return params, stats


def cast_like(converted: Any, expected: Any) -> Any:
    """``converted`` as jax arrays with the dtypes of ``expected`` (a tree of shape structs).

    Raises:
      StateDictMismatchError: if the trees differ in structure or shape, which means the
        conversion and the module disagree.
    """
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_converted = dict(jax.tree_util.tree_flatten_with_path(converted)[0])
    if flat_expected.keys() != flat_converted.keys():
        names = sorted(jax.tree_util.keystr(path)
                       for path in flat_expected.keys() ^ flat_converted.keys())
        raise StateDictMismatchError(
            f"The converted variables and the module's differ at {', '.join(names)}."
        )
    for path, struct in flat_expected.items():
        if flat_converted[path].shape != struct.shape:
            raise StateDictMismatchError(
                f"Converted {jax.tree_util.keystr(path)} has shape "
                f"{flat_converted[path].shape}, the module expects {struct.shape}."
            )
    # A copy: a jax array could otherwise alias the state_dict's memory, which PyTorch
    # keeps updating in place (running statistics during training).
    return jax.tree.map(lambda value, struct: jax.numpy.array(value, struct.dtype, copy=True),
                        converted, expected)
