"""State_dicts of the PyTorch implementations, read from safetensors without torch.

A timm LambdaResNet's becomes a model and its variables; a timm or lambda-networks
``LambdaLayer``'s, alone or inside a bigger model, becomes one layer's variables.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional

import numpy as np

from lambda_jax.convert import from_lambda_networks, from_timm
from lambda_jax.convert import state_dict as sd
from lambda_jax.layers.lambda_layer import LambdaLayer
from lambda_jax.models import byoanet
from lambda_jax.models.registry import create_model
from lambda_jax.weights.base import ModelWeights
from lambda_jax.weights.files import METADATA_KEY


def load_timm(path: pathlib.Path, arrays: Mapping[str, np.ndarray], name: Optional[str],
              overrides: Mapping[str, Any]) -> ModelWeights:
    """``create_model(name, **overrides)`` with the timm state_dict ``arrays`` of ``path``.

    Raises:
      ValueError: ``arrays`` are lambda_jax variables without an export's record, ``name``
        is None, or it is not one of timm's models.
      StateDictMismatchError: the state_dict does not fit the model, naming every key.
    """
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


def layer_variables(path: pathlib.Path, arrays: Mapping[str, np.ndarray], layer: LambdaLayer,
                    prefix: str) -> dict:
    """Variables for ``layer`` from the lambda layer under ``prefix`` in ``arrays``.

    The layer's state_dict keys are timm's (``qkv.weight``) or lambda-networks'
    (``to_q.weight``); ``prefix`` may leave off its final ``"."``.

    Raises:
      StateDictMismatchError: no lambda layer under ``prefix``, or one that does not fit
        ``layer``.
    """
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
