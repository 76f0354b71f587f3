"""What the self-attention layers share: head projections, relative offset tables and logits,
and attention over the whole image or within square windows.

Shapes: ``queries`` and ``keys`` ``[batch, height, width, heads, d]``, ``values``
``[batch, height, width, heads, v]``; a row table ``[rows, e]`` and a column table
``[cols, e]`` embed offsets along each axis (``e = d/2`` when they are split over the query,
else ``d``). Logits and the softmax accumulate in ``accumulate`` (float32 for float inputs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lambda_jax.layers.windows import windows


def check_multiple_of_heads(owner: str, field: str, depth: int, heads: int) -> None:
    """Raises a ``ValueError`` naming ``owner.field`` unless ``depth`` is a positive multiple of
    a positive ``heads``."""
    if depth < 1 or heads < 1 or depth % heads:
        raise ValueError(
            f"{owner}.{field} ({depth}) must be a positive multiple of heads ({heads})."
        )


def head_projections(
    module: nn.Module, x: jax.Array, heads: int, key_depth: int, value_depth: int,
    prefix: str = "",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Bias-free 1x1 projections ``{prefix}query``, ``{prefix}key`` and ``{prefix}value`` in
    ``module``'s dtypes, split over ``heads``.

    Args:
      x: ``[..., channels]``.

    Returns:
      queries scaled by ``key_depth^-1/2`` and keys, ``[..., heads, key_depth]``, and values
      ``[..., heads, value_depth]``.
    """

    def project(depth: int, name: str) -> jax.Array:
        dense = nn.Dense(heads * depth, use_bias=False, dtype=module.dtype,
                         param_dtype=module.param_dtype, name=prefix + name)
        return dense(x)

    queries = project(key_depth, "query") * key_depth**-0.5
    keys = project(key_depth, "key")
    values = project(value_depth, "value")
    return (
        queries.reshape(x.shape[:-1] + (heads, key_depth)),
        keys.reshape(x.shape[:-1] + (heads, key_depth)),
        values.reshape(x.shape[:-1] + (heads, value_depth)),
    )


def offset_table(
    module: nn.Module, name: str, rows: int, depth: int, size: int, remedy: str
) -> jax.Array:
    """The parameter ``name``: an offset embedding table ``[rows, depth]``, ``N(0, depth^-1/2)``.

    A global table (``rows = 2 * size - 1``) fixes the input size at init; applying the layer
    to another size raises an error that ends with ``remedy``, what the user can do instead.
    """
    if module.has_variable("params", name):
        built = module.get_variable("params", name).shape[0]
        if built != rows:
            raise ValueError(
                f"{type(module).__name__} was built for inputs with {(built + 1) // 2} "
                f"rows/columns and cannot be applied to {size}; {remedy}."
            )
    return module.param(
        name, nn.initializers.normal(depth**-0.5), (rows, depth), module.param_dtype
    )


def offset_logits(
    queries: jax.Array, row_table: jax.Array, col_table: jax.Array, split: bool, accumulate: Any
) -> tuple[jax.Array, jax.Array]:
    """Row and column offset logits ``[batch, height, width, heads, rows]`` and ``[..., cols]``.

    ``split``: the row table meets the first half of each query and the column table the
    second; otherwise both meet the whole query.
    """
    row_queries = col_queries = queries
    if split:
        half = row_table.shape[-1]
        row_queries, col_queries = queries[..., :half], queries[..., half:]
    row = jnp.einsum(
        "byxhd,rd->byxhr",
        row_queries,
        row_table.astype(queries.dtype),
        preferred_element_type=accumulate,
    )
    col = jnp.einsum(
        "byxhd,rd->byxhr",
        col_queries,
        col_table.astype(queries.dtype),
        preferred_element_type=accumulate,
    )
    return row, col


def global_attention(
    queries: jax.Array, keys: jax.Array, values: jax.Array, row_table: jax.Array,
    col_table: jax.Array, split: bool, accumulate: Any,
) -> jax.Array:
    """Attention of every position to every position; returns ``[batch, H, W, heads, v]``.

    The tables are ``[2*H-1, e]`` and ``[2*W-1, e]``: one row per offset.
    """
    batch, height, width, h, _ = queries.shape
    row, col = offset_logits(queries, row_table, col_table, split, accumulate)
    # Offset y_m - y_n sits at table index y_m - y_n + height - 1.
    row_index = np.arange(height)[None, :] - np.arange(height)[:, None] + height - 1
    col_index = np.arange(width)[None, :] - np.arange(width)[:, None] + width - 1
    row = jnp.take_along_axis(row, row_index[None, :, None, None, :], axis=-1)  # [b,H,W,h,H']
    col = jnp.take_along_axis(col, col_index[None, None, :, None, :], axis=-1)  # [b,H,W,h,W']
    content = jnp.einsum(
        "byxhd,bpqhd->byxhpq", queries, keys, preferred_element_type=accumulate
    )
    logits = content + row[..., :, None] + col[..., None, :]
    weights = jax.nn.softmax(logits.reshape(batch, height, width, h, -1), axis=-1)
    flat_values = values.reshape(batch, height * width, h, -1)
    return jnp.einsum(
        "byxhm,bmhv->byxhv",
        weights.astype(values.dtype),
        flat_values,
        preferred_element_type=accumulate,
    )


def local_attention(
    queries: jax.Array, keys: jax.Array, values: jax.Array, row_table: jax.Array,
    col_table: jax.Array, split: bool, accumulate: Any,
) -> jax.Array:
    """Attention within r x r windows; returns ``[batch, H, W, heads, v]``.

    The tables are ``[r, e]``. Windows are zero padded at the border and the padded positions
    are masked out.
    """
    batch, height, width, h, _ = queries.shape
    window = row_table.shape[0]
    row, col = offset_logits(queries, row_table, col_table, split, accumulate)
    position = (row[..., :, None] + col[..., None, :]).reshape(batch, height, width, h, -1)
    key_windows = windows(keys, window)  # [b, H, W, r*r, h, d]
    value_windows = windows(values, window)  # [b, H, W, r*r, h, v]
    inside = windows(jnp.ones((1, height, width), jnp.bool_), window)[0]  # [H, W, r*r]
    content = jnp.einsum(
        "byxhd,byxjhd->byxhj", queries, key_windows, preferred_element_type=accumulate
    )
    logits = jnp.where(inside[None, :, :, None, :], content + position, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum(
        "byxhj,byxjhv->byxhv",
        weights.astype(values.dtype),
        value_windows,
        preferred_element_type=accumulate,
    )
