"""The outcome of one autotuning decision, the rule that makes it, and its table."""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypedDict


class Measurement(TypedDict):
    """One candidate's figures on the device.

    seconds: the median wall time of one call (forward, or forward + vjp in "train").
    memory_bytes: XLA's temporaries of the compiled program (``temp_size_in_bytes``).
    within_bound: whether ``memory_bytes <= memory_bound * reference's memory_bytes``.
    """

    seconds: float
    memory_bytes: int
    within_bound: bool


@dataclasses.dataclass(frozen=True)
class Choice:
    """The candidate to use for one problem on one device kind.

    name: the chosen candidate.
    measurements: {candidate: Measurement}; empty on processes other than 0 of a
      multi-process run, which receive the name from process 0 without measuring.
    from_cache: True when no candidate was measured for this call (the in-process or the
      on-disk cache answered).
    key: the full key: device kind, backend, jax version, mode, candidates, reference,
      memory bound and the caller's problem (see ``cache.full_key``).
    """

    name: str
    measurements: Mapping[str, Measurement]
    from_cache: bool
    key: Mapping[str, Any]

    def table(self) -> str:
        """The measurements as a text table, fastest first; the chosen row is marked."""
        lines = [f"{self.key.get('problem')} ({self.key.get('mode')}, "
                 f"{self.key.get('device_kind')}): {self.name}",
                 f"  {'candidate':<24}{'time (ms)':>12}{'memory (MiB)':>14}  within bound"]
        for name, m in sorted(self.measurements.items(), key=lambda item: item[1]["seconds"]):
            mark = "*" if name == self.name else " "
            lines.append(f"{mark} {name:<24}{m['seconds'] * 1e3:>12.3f}"
                         f"{m['memory_bytes'] / 2**20:>14.3f}  {m['within_bound']}")
        return "\n".join(lines)


def within_bound(memory_bytes: Mapping[str, int], reference: str,
                 memory_bound: float) -> dict[str, bool]:
    """{candidate: memory_bytes <= memory_bound * memory_bytes[reference]}.

    The reference is always within (its ratio is 1, and a bound below 1 is refused by
    ``check_request``), so there is always a candidate to choose.
    """
    limit = memory_bound * memory_bytes[reference]
    return {name: used <= limit for name, used in memory_bytes.items()}


def fastest_within_bound(measurements: Mapping[str, Measurement]) -> str:
    """The name of the fastest candidate whose ``within_bound`` is True (ties: by name)."""
    allowed = [(m["seconds"], name) for name, m in measurements.items() if m["within_bound"]]
    return min(allowed)[1]


def check_request(candidates: Mapping[str, Any], reference: str, mode: str,
                  memory_bound: float) -> None:
    """Raises ValueError, saying what to pass instead, for a request that cannot be decided."""
    if not candidates:
        raise ValueError("choose() needs at least one candidate: pass a mapping "
                         "{name: function} with the formulations to compare.")
    if reference not in candidates:
        raise ValueError(f"reference={reference!r} is not a candidate; pass one of "
                         f"{sorted(candidates)} (the formulation whose memory sets the bound).")
    if mode not in ("train", "inference"):
        raise ValueError(f"mode={mode!r}: pass 'train' (value and gradient) or 'inference' "
                         "(the forward alone).")
    if not memory_bound >= 1:
        raise ValueError(f"memory_bound={memory_bound!r}: pass a factor >= 1 of the "
                         "reference's memory (e.g. 1.25 for training, 2.0 for inference).")
