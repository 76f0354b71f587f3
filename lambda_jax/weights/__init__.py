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

Each source has its module: ``pytorch`` (timm and lambda-networks state_dicts), ``hub`` (the
Hugging Face cache), ``export`` (:func:`save_model`'s files) and ``workdir`` (a run's
checkpoints); ``load`` tells which one ``weights`` names. Below them, ``files`` reads
safetensors, ``fitting`` fits arrays onto a model's variables and ``settings`` records and
checks the settings a model was created with.
"""

from lambda_jax.weights.base import ModelWeights, PathLike
from lambda_jax.weights.export import save_model
from lambda_jax.weights.load import load_layer, load_model, open_weights

__all__ = [
    "ModelWeights",
    "PathLike",
    "load_layer",
    "load_model",
    "open_weights",
    "save_model",
]
