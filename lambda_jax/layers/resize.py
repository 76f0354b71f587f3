"""Moving global position lambdas to another input size.

A global lambda layer's relative embedding table ``[2*S_1-1, ..., 2*S_s-1, k, u]`` covers
exactly the offsets of an input of size ``S``. To fine-tune or evaluate at another
resolution, the table is interpolated linearly in the offset (the corner convention:
offset 0 stays offset 0 and the largest offsets map onto each other), as vision
transformers do for their position embeddings.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

TABLE_NAME = "relative_embeddings"

Size = Union[int, Sequence[int]]


def _interpolation_matrix(old_length: int, new_length: int) -> np.ndarray:
    """``[new_length, old_length]`` weights of linear interpolation with aligned corners."""
    if new_length == 1 or old_length == 1:
        weights = np.zeros((new_length, old_length))
        weights[:, (old_length - 1) // 2] = 1.0
        return weights
    position = np.arange(new_length) * (old_length - 1) / (new_length - 1)
    lower = np.clip(np.floor(position).astype(int), 0, old_length - 2)
    fraction = position - lower
    weights = np.zeros((new_length, old_length))
    weights[np.arange(new_length), lower] = 1.0 - fraction
    weights[np.arange(new_length), lower + 1] += fraction
    return weights


def resize_table(table: jax.Array, new_spatial: Sequence[int]) -> jax.Array:
    """Interpolates one relative table to a new input size.

    Args:
      table: ``[2*S_1-1, ..., 2*S_s-1, k, u]``.
      new_spatial: ``(S'_1, ..., S'_s)``.

    Returns:
      ``[2*S'_1-1, ..., 2*S'_s-1, k, u]``; the same array when the size is unchanged.
    """
    spatial_rank = table.ndim - 2
    if len(new_spatial) != spatial_rank:
        raise ValueError(
            f"A relative table of shape {table.shape} has {spatial_rank} spatial axes; got the "
            f"new size {tuple(new_spatial)}."
        )
    resized = table
    for axis, size in enumerate(new_spatial):
        old_length, new_length = table.shape[axis], 2 * size - 1
        if old_length == new_length:
            continue
        weights = jnp.asarray(_interpolation_matrix(old_length, new_length), table.dtype)
        resized = jnp.moveaxis(jnp.tensordot(weights, resized, axes=[[1], [axis]]), 0, axis)
    return resized


def _as_tuple(size: Size, rank: int) -> tuple[int, ...]:
    return (size,) * rank if isinstance(size, int) else tuple(size)


def resize_relative_embeddings(tree: Any, from_size: Size, to_size: Size) -> Any:
    """Resizes every global relative embedding table in a layer's or a model's variables.

    Each table belongs to a layer whose input is the model input scaled down by some
    stride; its new size keeps that scale: ``S' = S * to_size / from_size`` per axis,
    which must be a whole number.

    Args:
      tree: variables or params of a ``LambdaLayer`` or of any model holding them
        (nested dicts); leaves named ``relative_embeddings`` are
        ``[2*S_1-1, ..., 2*S_s-1, k, u]``.
      from_size: the spatial size of the input the variables were built for, e.g.
        ``(224, 224)`` for an image model (an int means the same on every axis).
      to_size: the new input size.

    Returns:
      The same tree with every table resized; tables are unchanged when the sizes are equal.
    """

    def resize(path, leaf):
        if not path or getattr(path[-1], "key", None) != TABLE_NAME:
            return leaf
        rank = leaf.ndim - 2
        old_in, new_in = _as_tuple(from_size, rank), _as_tuple(to_size, rank)
        spatial = tuple((length + 1) // 2 for length in leaf.shape[:rank])
        new_spatial = []
        for size, old, new in zip(spatial, old_in, new_in):
            if (size * new) % old:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} covers inputs of size {spatial} in a model "
                    f"built for {old_in}; at {new_in} that layer's input would not be a whole "
                    "number of positions. Choose a size that keeps every stride exact."
                )
            new_spatial.append(size * new // old)
        return resize_table(leaf, new_spatial)

    return jax.tree_util.tree_map_with_path(resize, tree)
