"""The on-disk cache of autotuning decisions: one JSON file per key.

Files live in ``$LAMBDA_JAX_CACHE_DIR/autotune`` (default ``~/.cache/lambda_jax/autotune``),
named by a hash of the key: ``<sha256 of the key, 24 hex digits>.json``. One file per key
means that processes tuning different problems never write the same file, and a file is
written whole to a temporary name and renamed over the old one (``os.replace``, atomic on
POSIX), so a reader sees the old file or the new one, never half of either.

A file holds::

    {"schema": "lambda_jax.autotune/1", "key": {...}, "name": "conv",
     "measurements": {"conv": {"seconds": 1.2e-3, "memory_bytes": 4096, "within_bound": true},
                      ...}}

so that ``cached_choices()`` can print every decision's table from the cache alone.
"""

import hashlib
import json
import numbers
import os
import pathlib
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from lambda_jax.core.autotune.choice import Choice

SCHEMA = "lambda_jax.autotune/1"


def cache_dir() -> pathlib.Path:
    """The directory of the autotuning files: ``$LAMBDA_JAX_CACHE_DIR/autotune``, by default
    ``~/.cache/lambda_jax/autotune``."""
    root = os.environ.get("LAMBDA_JAX_CACHE_DIR") or os.path.join("~", ".cache", "lambda_jax")
    return pathlib.Path(root).expanduser() / "autotune"


def _encode(value: Any) -> str:
    """A value JSON has no type for: dtypes (``jnp.float32``, ``np.dtype``) by name, others
    by ``str``."""
    if isinstance(value, (np.dtype, type)):
        try:
            return np.dtype(value).name
        except TypeError:
            pass
    return str(value)


def _canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, sorted keys, other objects
    encoded by ``_encode``), so a key built in memory equals the same key read from a
    file."""
    return json.loads(json.dumps(value, sort_keys=True, default=_encode))


def full_key(*, candidates: Iterable[str], mode: str, reference: str, memory_bound: float,
             problem: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """Everything the decision depends on: the device kind (of ``backend``'s first
    device), the backend, the jax version, the mode, the candidates' names, the reference,
    the memory bound and the caller's ``problem`` (shapes, dtypes, options)."""
    return _canonical({
        "device_kind": jax.devices(backend)[0].device_kind, "backend": backend,
        "jax_version": jax.__version__, "mode": mode, "candidates": sorted(candidates),
        "reference": reference, "memory_bound": float(memory_bound), "problem": problem})


def digest(key: Mapping[str, Any]) -> str:
    """24 hex digits of the SHA-256 of ``key`` as JSON: the name of its file."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def path_for(key: Mapping[str, Any], directory: pathlib.Path) -> pathlib.Path:
    """The file of ``key`` in ``directory``."""
    return directory / f"{digest(key)}.json"


def _problem_with(entry: Any) -> str | None:
    """What is wrong with a file's contents ``entry``, or None when it is a decision."""
    if not isinstance(entry, dict) or entry.get("schema") != SCHEMA:
        return f"not a {SCHEMA} file"
    key, name, measurements = entry.get("key"), entry.get("name"), entry.get("measurements")
    if not isinstance(key, dict) or not isinstance(measurements, dict):
        return "no key or no measurements"
    if sorted(measurements) != key.get("candidates") or name not in measurements:
        return "the measurements are not those of the key's candidates"
    for m in measurements.values():
        if not (isinstance(m, dict) and isinstance(m.get("seconds"), numbers.Real)
                and isinstance(m.get("memory_bytes"), int)
                and isinstance(m.get("within_bound"), bool)):
            return "a measurement without seconds, memory_bytes and within_bound"
    return None


def _load(path: pathlib.Path) -> tuple[Choice | None, str | None]:
    """(the file's decision, None), or (None, what is wrong with the file)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"unreadable: {error}"
    problem = _problem_with(entry)
    if problem:
        return None, problem
    return Choice(name=entry["name"], measurements=entry["measurements"], from_cache=True,
                  key=entry["key"]), None


def read(key: Mapping[str, Any], directory: pathlib.Path) -> Choice | None:
    """The cached decision for ``key``, or None: no file, or a file that is damaged or holds
    another key (then with a warning naming the file, which the caller rewrites)."""
    path = path_for(key, directory)
    if not path.exists():
        return None
    choice, problem = _load(path)
    if choice is not None and choice.key != key:
        choice, problem = None, "it holds another key"
    if choice is None:
        warnings.warn(f"Ignoring the autotuning cache file {path} ({problem}); measuring "
                      "again and rewriting it.", stacklevel=3)
    return choice


def write(choice: Choice, directory: pathlib.Path) -> None:
    """Writes ``choice`` to its file atomically; a directory that cannot be written only
    warns (the decision still holds for this process)."""
    entry = {"schema": SCHEMA, "key": choice.key, "name": choice.name,
             "measurements": choice.measurements}
    path = path_for(choice.key, directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=path.stem, suffix=".tmp",
                                         delete=False) as f:
            json.dump(entry, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as error:
        warnings.warn(f"Could not write the autotuning cache file {path} ({error}); the "
                      "decision is kept in this process only.", stacklevel=3)


def cached_choices(directory: pathlib.Path | None = None) -> list[Choice]:
    """Every decision in ``directory`` (default ``cache_dir()``), e.g. to print
    ``choice.table()`` for each; damaged files are skipped with a warning."""
    choices = []
    for path in sorted((directory or cache_dir()).glob("*.json")):
        choice, problem = _load(path)
        if choice is None:
            warnings.warn(f"Skipping the autotuning cache file {path} ({problem}).",
                          stacklevel=2)
        else:
            choices.append(choice)
    return choices
