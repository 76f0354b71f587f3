"""Weights from the PyTorch implementations: timm and lucidrains' lambda-networks.

``from_timm(state_dict, module)`` and ``from_lambda_networks(state_dict, layer)`` return
Flax variables (``{"params": ..., "batch_stats": ...}``) that make a lambda_jax module
compute what the PyTorch module with that ``state_dict`` computes. Torch is not needed:
tensors or NumPy arrays are accepted.
"""

from lambda_jax.convert.lambda_networks import from_lambda_networks
from lambda_jax.convert.state_dict import StateDictMismatchError
from lambda_jax.convert.timm import from_timm

__all__ = ["StateDictMismatchError", "from_lambda_networks", "from_timm"]
