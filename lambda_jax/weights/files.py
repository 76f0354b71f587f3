"""Reading safetensors files with ``safetensors.numpy``, and saying why one cannot be read."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

# The safetensors metadata key under which lambda_jax records what an export holds.
METADATA_KEY = "lambda_jax"


def safetensors_module():
    """The ``safetensors`` package with ``safetensors.numpy`` imported, or an ImportError."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as error:
        raise ImportError("Reading and writing weight files needs safetensors: "
                          "pip install safetensors") from error
    return safetensors


def torch_conversion(path: Any) -> str:
    """How to turn the PyTorch pickle at ``path`` into a safetensors file, once, with torch."""
    return ("Reading it needs torch; convert it once where torch is installed: `import torch, "
            f"safetensors.torch; safetensors.torch.save_file(torch.load({str(path)!r}, "
            "map_location='cpu'), 'model.safetensors')`, and pass the .safetensors file.")


def _unreadable(path: pathlib.Path, error: Exception) -> ValueError:
    with open(path, "rb") as f:
        start = f.read(4)
    # torch.save writes a zip archive, or a bare pickle in its legacy format.
    if start == b"PK\x03\x04" or start[:1] == b"\x80":
        return ValueError(f"{path} is a PyTorch pickle (torch.save), not a safetensors file. "
                          + torch_conversion(path))
    return ValueError(f"{path} is not a readable safetensors file ({error}). load_model reads "
                      "timm's .safetensors files and files written by lambda_jax.save_model; "
                      "if this one was cut short, write or download it again.")


def read(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file at ``path``.

    Returns:
      ``tensors`` maps each key to its array, of the shape and dtype stored; ``metadata`` is
      the file's string metadata (empty if it has none).

    Raises:
      ValueError: the file is not safetensors; the message says if it is a PyTorch pickle.
    """
    safetensors = safetensors_module()
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except safetensors.SafetensorError as error:
        raise _unreadable(path, error) from error
    return tensors, metadata
