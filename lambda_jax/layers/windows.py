"""Sliding square neighbourhoods of every position of an image, for local attention layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def windows(x: jax.Array, window: int, mode: str = "constant") -> jax.Array:
    """``[batch, H, W, ...]`` -> ``[batch, H, W, window*window, ...]``, row-major offsets.

    ``mode``: ``jnp.pad`` mode of the border, ``"constant"`` (zeros) or ``"reflect"``.
    """
    pad = window // 2
    height, width = x.shape[1:3]
    padded = jnp.pad(x, [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 3), mode=mode)
    return jnp.stack(
        [
            padded[:, dy : dy + height, dx : dx + width]
            for dy in range(window)
            for dx in range(window)
        ],
        axis=3,
    )
