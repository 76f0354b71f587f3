"""Weights named ``"hf-hub:<repo_id>[@<revision>]"``: a file in the local Hugging Face cache.

Nothing is downloaded; the lookup needs ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

from lambda_jax.weights.files import torch_conversion

HUB_PREFIX = "hf-hub:"
# The weights files of a timm repository on the Hub, in the order they are tried.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_file(spec: str, name: Optional[str]) -> pathlib.Path:
    """The cached weights file of ``spec``, ``<repo_id>[@<revision>]``, in the HF cache.

    Args:
      spec: what follows :data:`HUB_PREFIX`.
      name: the model the caller loads, checked against the repository's ``config.json``
        where the cache holds one; None skips the check.

    Raises:
      FileNotFoundError: the repository (at that revision) is not in the cache; the message
        says where it looked and how to download it.
      ValueError: no repository id, another model's repository, or a PyTorch pickle only.
      ImportError: ``huggingface_hub`` is not installed.
    """
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
                         + torch_conversion(cached[HUB_FILES[1]]))
    folder = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    at = f" at revision {revision!r}" if revision else ""
    raise FileNotFoundError(
        f"{repo_id}{at} is not in the Hugging Face cache: looked for {' and '.join(HUB_FILES)} "
        f"in {folder} (the cache is {constants.HF_HUB_CACHE}, set by HF_HUB_CACHE or "
        "HF_HOME). Nothing is downloaded here: fetch the file once with `python -c \"from "
        f"huggingface_hub import hf_hub_download; hf_hub_download('{repo_id}', "
        f"'{HUB_FILES[0]}')\"` or pass the path of a downloaded .safetensors file."
    )
