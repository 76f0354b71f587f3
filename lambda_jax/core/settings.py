"""The settings of a lambda layer, declared once: the fields of the linen and NNX modules and
the keyword arguments of :func:`lambda_jax.functional.lambda_layer`, with their checks.

``LambdaFields`` holds what every lambda layer has (its sizes and its position lambdas);
``LambdaSettings`` adds the fields of :class:`lambda_jax.LambdaLayer` and
``CausalSettings`` those of :class:`lambda_jax.CausalLambdaLayer`. The linen modules take
their dataclass fields from these classes, so a new setting is added here only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from lambda_jax.core.pooling import STRIDE_POOLS as _POOLS
from lambda_jax.core.position import IMAGE_IMPLEMENTATIONS, IMPLEMENTATIONS

POSITIONS = ("global", "local", "none")
CAUSAL_POSITIONS = ("none", "local")
STRIDE_POOLS = tuple(_POOLS)
# The parameter that holds the position embeddings of each position mode.
EMBEDDING_NAMES = {"global": "relative_embeddings", "local": "local_embeddings"}


def position_embedding_shape(
    position: str, spatial: tuple[int, ...], dim_k: int, dim_u: int, receptive_field: int
) -> Optional[tuple[int, ...]]:
    """Shape of a lambda layer's position embeddings for inputs of spatial size ``spatial``.

    ``[2*S_1-1, ..., 2*S_s-1, k, u]`` (the relative table) for ``position="global"``,
    ``[r, ..., r, k, u]`` (the lambda convolution's kernel) for ``"local"``, ``None`` for
    ``"none"``.
    """
    if position == "global":
        return tuple(2 * size - 1 for size in spatial) + (dim_k, dim_u)
    if position == "local":
        return (receptive_field,) * len(spatial) + (dim_k, dim_u)
    return None


def check_input_shape(name: str, x: Any) -> None:
    """Raises ValueError unless ``x`` is ``[batch, *spatial, channels]`` with 1 to 3 spatial
    axes and no empty axis; ``name`` names the caller in the message."""
    shape = tuple(x.shape)
    if len(shape) not in (3, 4, 5):
        raise ValueError(
            f"{name} expects [batch, length, channels], [batch, height, width, channels] or "
            f"[batch, time, height, width, channels]; got an input of rank {len(shape)} with "
            f"shape {shape}."
        )
    if 0 in shape:
        axes = ["batch"] + [f"spatial axis {i + 1}" for i in range(len(shape) - 2)]
        empty = [axis for axis, size in zip(axes + ["channels"], shape) if size == 0]
        raise ValueError(
            f"{name} got an input of shape {shape} with no elements along {', '.join(empty)}; "
            "every axis needs at least one element."
        )


def check_tree(kind: str, tree: Mapping[str, Any], shapes: Mapping[str, Any],
               prefix: str = "") -> None:
    """Raises ValueError naming each entry of ``tree`` that is missing or has the wrong shape."""
    for name, shape in shapes.items():
        path = f"{prefix}[{name!r}]"
        if not isinstance(tree, Mapping) or name not in tree:
            raise ValueError(f"{kind}{path} is missing; the layer needs it "
                             f"({shape if isinstance(shape, tuple) else 'a dict'}).")
        if isinstance(shape, Mapping):
            check_tree(kind, tree[name], shape, path)
        elif tuple(jnp.shape(tree[name])) != shape:
            raise ValueError(f"{kind}{path} has shape {tuple(jnp.shape(tree[name]))}; the layer "
                             f"needs {shape} for these settings and this input.")


# Not frozen: flax.linen modules inherit these fields, and a dataclass cannot be both frozen
# and the base of a non-frozen one. Hashable, so settings can be static arguments of jit.
@dataclasses.dataclass(unsafe_hash=True)
class LambdaFields:
    """The sizes and the position lambdas of a lambda layer (see :class:`lambda_jax.LambdaLayer`
    for each field)."""

    dim_out: int
    dim_k: int = 16
    heads: int = 4
    dim_u: int = 1
    position: str = "global"
    receptive_field: int = 23

    @property
    def dim_v(self) -> int:
        return self.dim_out // self.heads

    def check_sizes(self, layer: str, positions: tuple[str, ...]) -> None:
        """Raises ValueError naming the first impossible size or position of ``layer``."""
        for name in ("dim_out", "dim_k", "heads", "dim_u"):
            if getattr(self, name) < 1:
                raise ValueError(f"{layer}.{name} must be positive, got {getattr(self, name)}.")
        if self.dim_out % self.heads:
            raise ValueError(
                f"{layer}.dim_out ({self.dim_out}) must be divisible by heads ({self.heads})."
            )
        if self.position not in positions:
            raise ValueError(
                f"{layer}.position must be one of {positions}, got {self.position!r}."
            )


@dataclasses.dataclass(unsafe_hash=True)
class LambdaSettings(LambdaFields):
    """The settings of a lambda layer: the fields of :class:`lambda_jax.LambdaLayer`, which
    documents each. ``check`` validates them, naming the field."""

    implementation: str = "auto"
    use_batchnorm: bool = True
    position_bias: bool = False
    stride: int = 1
    stride_pool: str = "3x3"
    axis_name: Optional[Any] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Optional[Any] = None

    def check(self) -> None:
        """Raises ValueError naming the first impossible field."""
        self.check_sizes("LambdaLayer", POSITIONS)
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"LambdaLayer.implementation must be one of {IMPLEMENTATIONS}, got "
                f"{self.implementation!r}."
            )
        if self.position == "local" and (self.receptive_field < 1 or self.receptive_field % 2 == 0):
            raise ValueError(
                "LambdaLayer.receptive_field must be a positive odd number for "
                f"position='local', got {self.receptive_field}."
            )
        if self.position_bias and self.position == "none":
            raise ValueError(
                "LambdaLayer.position_bias needs position lambdas: set position='global' or "
                "'local', or position_bias=False."
            )
        if self.stride not in (1, 2):
            raise ValueError(f"LambdaLayer.stride must be 1 or 2, got {self.stride}.")
        if self.stride_pool not in STRIDE_POOLS:
            raise ValueError(
                f"LambdaLayer.stride_pool must be one of {STRIDE_POOLS}, got {self.stride_pool!r}."
            )

    def check_inputs(self, x: Any, context: Any = None) -> None:
        """Raises ValueError if the input ``[batch, *S, channels]`` or the context
        ``[batch, *S_context, channels_context]`` cannot go through this layer."""
        check_input_shape("LambdaLayer", x)
        if (self.implementation in IMAGE_IMPLEMENTATIONS
                and self.position == "local" and len(x.shape) != 4):
            raise ValueError(
                f"LambdaLayer.implementation={self.implementation!r} needs images [batch, "
                f"height, width, channels]; got an input of shape {tuple(x.shape)}. Use "
                "'auto', 'shift' or 'conv'."
            )
        if context is None:
            return
        check_input_shape("LambdaLayer context", context)
        if len(context.shape) != len(x.shape):
            raise ValueError(
                f"LambdaLayer context must have the input's rank: input {tuple(x.shape)}, "
                f"context {tuple(context.shape)}."
            )
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"LambdaLayer context must have the input's batch size: input "
                f"{tuple(x.shape)}, context {tuple(context.shape)}."
            )
        if self.position != "none" and tuple(context.shape[1:-1]) != tuple(x.shape[1:-1]):
            raise ValueError(
                f"LambdaLayer with position={self.position!r} needs a context with the input's "
                f"positions: input {tuple(x.shape)}, context {tuple(context.shape)}. Use "
                "position='none' for a context of another size."
            )

    def embedding_shape(self, spatial: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        """The position embeddings' shape for inputs of spatial size ``spatial``."""
        return position_embedding_shape(
            self.position, tuple(spatial), self.dim_k, self.dim_u, self.receptive_field)

    def param_shapes(self, in_features: int, context_features: int,
                     spatial: tuple[int, ...]) -> dict[str, Any]:
        """The shape of every parameter, as the tree ``lambda_layer`` takes."""
        h, k, u, v = self.heads, self.dim_k, self.dim_u, self.dim_v
        shapes: dict[str, Any] = {
            "query": {"kernel": (in_features, h * k)},
            "key": {"kernel": (context_features, u * k)},
            "value": {"kernel": (context_features, u * v)},
        }
        if self.use_batchnorm:
            shapes["query_norm"] = {"scale": (h * k,), "bias": (h * k,)}
            shapes["value_norm"] = {"scale": (u * v,), "bias": (u * v,)}
        if self.position != "none":
            shapes[EMBEDDING_NAMES[self.position]] = self.embedding_shape(spatial)
        if self.position_bias:
            shapes["position_bias"] = (k,)
        return shapes


@dataclasses.dataclass(unsafe_hash=True)
class CausalSettings(LambdaFields):
    """The settings of a masked lambda layer for sequences: the fields of
    :class:`lambda_jax.CausalLambdaLayer`, which documents each."""

    position: str = "local"
    use_layernorm: bool = True
    epsilon: float = 1e-5
    dtype: Optional[Any] = None

    def check(self, x: Any) -> None:
        """Raises ValueError naming the first impossible field, or an input ``x`` that is not
        ``[batch, length, channels]``."""
        self.check_sizes("CausalLambdaLayer", CAUSAL_POSITIONS)
        if self.receptive_field < 1:
            raise ValueError("CausalLambdaLayer.receptive_field must be positive, got "
                             f"{self.receptive_field}.")
        if len(x.shape) != 3:
            raise ValueError("CausalLambdaLayer needs sequences [batch, length, channels]; got an "
                             f"input of shape {tuple(x.shape)}.")
        check_input_shape("CausalLambdaLayer", x)

