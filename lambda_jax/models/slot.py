"""The slot interface: what sits in the 3x3 slot of a bottleneck block, the registry of slot
kinds by name, and the expansion of a ResNet's ``stage_slots`` into one slot per block.

The kinds themselves are in :mod:`lambda_jax.models.slot_kinds`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

import jax

if TYPE_CHECKING:
    from lambda_jax.models.blocks import Bottleneck
    from lambda_jax.models.resnet import ResNet

# A built slot layer: (y [batch, H, W, C], train, shared position embeddings or None) ->
# [batch, H', W', width] at the block's stride if the slot strides itself, else at H, W.
SlotLayer = Callable[[jax.Array, bool, Optional[jax.Array]], jax.Array]

# Slot kinds by name, filled in by Slot subclasses as they are declared.
_SLOT_CLASSES: dict[str, type["Slot"]] = {}


class Slot:
    """What sits in the 3x3 slot of a bottleneck block: the layer's settings, and the layer.

    A slot kind is a frozen dataclass deriving from ``Slot`` with its name,
    ``class MySlot(Slot, kind="my")``: that makes ``MySlot(...)``, ``"my"`` and
    ``{"kind": "my", ...}`` entries of ``ResNet.stage_slots``. It defines :meth:`build`.

    Attributes (class level):
      kind: the name of the slot kind in ``stage_slots``.
      strides_itself: whether the layer applies the block's stride; if not, a strided block
        applies it after the layer with ``Bottleneck.stride_pool``.
    """

    kind: ClassVar[str]
    strides_itself: ClassVar[bool] = False

    def __init_subclass__(cls, *, kind: Optional[str] = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if kind is None:  # a variant of its parent's kind, not a kind of its own
            return
        if kind in _SLOT_CLASSES:
            raise ValueError(f"A slot kind named {kind!r} already exists: {_SLOT_CLASSES[kind]}.")
        cls.kind = kind
        _SLOT_CLASSES[kind] = cls

    def build(self, block: Bottleneck) -> SlotLayer:
        """Creates the slot's layer as a child of ``block`` (called from the block's
        ``__call__``, with the block's width, stride and dtypes) and returns it as a
        :data:`SlotLayer`. The layer's name is part of the parameter paths."""
        raise NotImplementedError(f"{type(self).__name__} defines no build method.")

    def resolve(self, model: ResNet) -> Slot:
        """The slot with the settings it leaves to ``model`` filled in (default: itself)."""
        return self

    def shared_embeddings_key(self, spatial: tuple[int, ...]) -> Optional[tuple[str, tuple]]:
        """``(position, shape)`` of position embeddings the model holds for this slot and
        every other slot with the same key, for a slot input of spatial size ``spatial``;
        ``None``: the layer holds its own, if any."""
        return None


SlotSpec = Union[str, Mapping[str, Any], Slot]


def _slot(spec: SlotSpec) -> Slot:
    if isinstance(spec, Slot):
        return spec
    if isinstance(spec, str) and spec in _SLOT_CLASSES:
        return _SLOT_CLASSES[spec]()
    if isinstance(spec, Mapping) and spec.get("kind") in _SLOT_CLASSES:
        slot_class = _SLOT_CLASSES[spec["kind"]]
        settings = {key: value for key, value in spec.items() if key != "kind"}
        known = {field.name for field in dataclasses.fields(slot_class)}
        if set(settings) - known:
            raise ValueError(
                f"Unknown settings {sorted(set(settings) - known)} for a {spec['kind']!r} "
                f"slot; the settings are {sorted(known)}."
            )
        return slot_class(**settings)
    raise ValueError(
        f"A slot must be one of {sorted(_SLOT_CLASSES)}, a mapping with 'kind' set to one of "
        f"them and the slot's settings, or one of the slot classes "
        f"({', '.join(c.__name__ for c in _SLOT_CLASSES.values())}); got {spec!r}."
    )


def resolve_stage_slots(
    stage_slots: Sequence[Union[SlotSpec, Sequence[SlotSpec]]], stage_depths: Sequence[int]
) -> tuple[tuple[Slot, ...], ...]:
    """Expands ``stage_slots`` to one slot per block.

    Args:
      stage_slots: one entry per stage: a slot for every block of the stage, or a sequence
        with one slot per block. A slot is a :class:`Slot` (:class:`ConvSlot`,
        :class:`LambdaSlot`, :class:`AttentionSlot`, :class:`AxialAttentionSlot`,
        :class:`AugmentedConvSlot`, :class:`SANSlot`), the name of its kind (``"conv"``,
        ``"lambda"``, ``"attention"``, ``"axial_attention"``, ``"augmented_conv"``,
        ``"san"``: default settings) or a mapping such as
        ``{"kind": "lambda", "receptive_field": 7}``.
      stage_depths: number of blocks per stage.

    Returns:
      ``stage_slots[s][b]``: the slot of block b of stage s.
    """
    if len(stage_slots) != len(stage_depths):
        raise ValueError(
            f"stage_slots has {len(stage_slots)} entries but there are {len(stage_depths)} "
            "stages (stage_depths); give one slot, or one slot per block, for each stage."
        )
    resolved = []
    for stage, (spec, depth) in enumerate(zip(stage_slots, stage_depths)):
        if isinstance(spec, (str, Mapping, Slot)):
            resolved.append((_slot(spec),) * depth)
            continue
        if len(spec) != depth:
            raise ValueError(
                f"stage_slots[{stage}] lists {len(spec)} slots for a stage of {depth} blocks."
            )
        resolved.append(tuple(_slot(s) for s in spec))
    return tuple(resolved)
