"""Orbax checkpoints of the train state and the data iterator, verified on restore.

Each step directory holds four items: ``state`` (the :class:`TrainState` as numpy arrays),
``data`` (the grain iterator position, one file per host), ``run`` (JSON: the model and the
config that defines the run) and ``checksums`` (JSON: a CRC-32 with dtype and shape of every
state array, and a CRC-32 of each host's iterator position). Orbax writes all items of a step
to a temporary directory and renames it when complete, so a step is never present without its
checksums, and a save cut short by a crash leaves the previous checkpoints intact; leftovers
are removed when the manager opens.

A checkpoint saved by another number of processes or data workers resumes at the same
global example index (:mod:`lambda_jax.train.data_position`), from every host's file.

A checkpoint that fails verification, or cannot be read, is *damaged*: it is moved, never
deleted, to ``<workdir>/checkpoints_damaged/<step>`` and the run resumes from the newest
intact one. A directory in ``checkpoints/`` named like a step but holding no checkpoint is
moved there too; other directories are left alone with a warning.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable, Iterator, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from lambda_jax.train import data_position
from lambda_jax.train.parallel import barrier

ITEMS = ("state", "data", "run", "checksums")
DAMAGED_DIR = "checkpoints_damaged"
BEST_METRIC = "eval_top1"
# Written by Orbax into every finished step directory.
_STEP_MARKER = "_CHECKPOINT_METADATA"
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or from a different run."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files fail verification or cannot be read."""

    def __init__(self, step: int, path: str, reason: str):
        super().__init__(f"The checkpoint of step {step} at {path} is damaged: {reason}")
        self.step, self.path = step, path


class NonFiniteError(FloatingPointError):
    """A NaN or infinity in the training metrics or in a state about to be saved."""


def _path_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flatten(tree: Any) -> dict[str, Any]:
    """``{"params/conv/kernel": leaf}``: the same names for a TrainState and its dict form."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_path_name(k) for k in path): leaf for path, leaf in leaves}


def _spec(array: np.ndarray) -> str:
    return f"{array.dtype}[{','.join(map(str, array.shape))}]"


def state_checksums(state: Any, check_finite: bool = True) -> dict[str, str]:
    """``{array path: "float32[3,3,16,16]:1a2b3c4d"}``: dtype, shape and CRC-32 of each array.

    Raises:
      NonFiniteError: naming the arrays, if ``check_finite`` and a floating-point array holds
        a NaN or infinity.
    """
    checksums, non_finite = {}, []
    for name, leaf in _flatten(state).items():
        array = np.asarray(leaf)
        if (check_finite and np.issubdtype(array.dtype, np.floating)
                and not np.isfinite(array).all()):
            non_finite.append(name)
        checksums[name] = f"{_spec(array)}:{zlib.crc32(np.ascontiguousarray(array).tobytes()):08x}"
    if non_finite:
        raise NonFiniteError(f"non-finite values in {', '.join(non_finite[:5])}"
                             + (f" and {len(non_finite) - 5} more arrays" if len(non_finite) > 5
                                else ""))
    return checksums


def _data_checksum(text: str) -> str:
    """CRC-32 of an iterator position, insensitive to how its JSON is laid out."""
    try:
        text = json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        pass
    return f"{zlib.crc32(text.encode()):08x}"


def _iterator_state_text(data_iterator: Iterator) -> str:
    state = data_iterator.get_state()
    return state.decode() if isinstance(state, bytes) else json.dumps(state)


def _set_iterator_state(data_iterator: Iterator, state: dict[str, Any]) -> None:
    as_bytes = isinstance(data_iterator.get_state(), bytes)
    data_iterator.set_state(json.dumps(state).encode() if as_bytes else state)


def _data_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _on_every_process(flag: bool) -> bool:
    """``flag`` and-ed over all processes: each host verifies its own data position."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.array([flag])).all())


def _absolute(directory: Any) -> epath.Path:
    path = epath.Path(directory)
    return path if "://" in str(directory) else epath.Path(path.absolute())


class Checkpointer:
    """Keeps the last ``keep`` checkpoints plus the one with the best ``eval_top1``.

    Metrics are stored with each step, so the best checkpoint is still known after a resume.

    Args:
      directory: where step directories go (``<workdir>/checkpoints``).
      keep: number of most recent checkpoints kept.
      async_saves: write in a background thread while training continues.
      read_only: open another run's checkpoints (``config.init_from``): nothing is written,
        moved or cleaned up.
    """

    def __init__(self, directory: Any, *, keep: int, async_saves: bool = True,
                 read_only: bool = False):
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints must be at least 1, got {keep}.")
        self.directory = _absolute(directory)
        self.damaged_directory = self.directory.parent / DAMAGED_DIR
        self.read_only = read_only
        if not read_only:
            self._set_aside_strays()

        def best_metric(metrics: dict[str, float]) -> float:
            return metrics.get(BEST_METRIC, -np.inf)

        preservation = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(get_metric_fn=best_metric, n=1,
                                      keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            best_fn=best_metric,  # makes Orbax write each step's metrics and read them back
            best_mode="max",
            enable_async_checkpointing=async_saves,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def _set_aside_strays(self) -> None:
        """Moves step-named directories without a checkpoint aside; warns about the rest."""
        if jax.process_index() == 0 and self.directory.exists():
            for child in sorted(self.directory.iterdir()):
                if not child.is_dir() or _TMP_MARKER in child.name:
                    continue
                if not child.name.isdigit():
                    logging.warning("Skipping %s: not a step directory.", child)
                elif not (child / _STEP_MARKER).exists():
                    destination = self._move_aside(child)
                    logging.warning("%s is named like a step but holds no checkpoint; moved it "
                                    "to %s.", child, destination)
        barrier("lambda_jax_checkpoint_strays")

    def _move_aside(self, path: epath.Path) -> epath.Path:
        self.damaged_directory.mkdir(parents=True, exist_ok=True)
        destination, n = self.damaged_directory / path.name, 0
        while destination.exists():
            n += 1
            destination = self.damaged_directory / f"{path.name}.{n}"
        path.rename(destination)
        return destination

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return str(self.directory / str(step))

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Iterator,
        run: dict[str, Any],
        metrics: Optional[dict[str, float]] = None,
    ) -> None:
        """Starts saving ``state`` (host numpy arrays) and the iterator position at ``step``.

        Raises:
          NonFiniteError: if ``state`` holds a NaN or infinity; nothing is saved.
        """
        try:
            checksums = {"state": state_checksums(state)}
        except NonFiniteError as error:
            raise NonFiniteError(f"Not saving step {step}: {error}.") from None
        # uint32: without jax_enable_x64, int64 would be gathered as int32 and wrap.
        data = np.array([int(_data_checksum(_iterator_state_text(data_iterator)), 16)], np.uint32)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            data = multihost_utils.process_allgather(data).reshape(-1)
        count = jax.process_count()
        checksums["data"] = {f"process_{i}-of-{count}.json": f"{int(crc):08x}"
                             for i, crc in enumerate(data)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                run=ocp.args.JsonSave(run),
                checksums=ocp.args.JsonSave(checksums),
            ),
            metrics=dict(metrics or {}),
            force=True,
        )

    def read_run(self, step: int) -> dict[str, Any]:
        """The ``run`` item of ``step``: the model and the config that defines the run.

        Raises:
          DamagedCheckpointError: if it cannot be read.
        """
        try:
            return self.manager.restore(
                step, args=ocp.args.Composite(run=ocp.args.JsonRestore())).run
        except Exception as error:
            raise self._damaged(step, error) from error

    def _checksums(self, step: int) -> dict[str, Any]:
        if not (self.directory / str(step) / "checksums").exists():
            raise DamagedCheckpointError(step, self.step_path(step), "it has no checksums.")
        try:
            return self.manager.restore(
                step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore())).checksums
        except Exception as error:
            raise self._damaged(step, error) from error

    def _verify_state(self, step: int, saved: dict[str, str], state: Any) -> None:
        restored = state_checksums(state, check_finite=False)
        wrong = [name for name, value in restored.items() if saved.get(name) != value]
        if wrong or set(saved) != set(restored):
            names = wrong or sorted(set(saved) ^ set(restored))
            raise DamagedCheckpointError(
                step, self.step_path(step),
                f"the checksums of {len(names)} arrays do not match ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}).")

    def restore(self, step: int, state_template: Any, data_iterator: Iterator,
                global_batch_size: Optional[int] = None) -> Any:
        """Restores the state at ``step`` into ``state_template``'s structure, verifies it
        against the saved checksums and moves ``data_iterator`` to the saved position.

        A checkpoint saved by another number of processes (or data workers) resumes at the
        same global example index (see :mod:`lambda_jax.train.data_position`); that needs
        ``global_batch_size``, the examples per step over all processes.

        Raises:
          DamagedCheckpointError: naming the step and path, if a file fails its checksum or
            cannot be read.
          CheckpointError: if the checkpoint holds arrays of another structure, dtype or shape
            than ``state_template``.
        """
        checksums = self._checksums(step)
        template = {name: _spec(np.asarray(leaf)) for name, leaf in _flatten(state_template).items()}
        saved = {name: value.rsplit(":", 1)[0] for name, value in checksums["state"].items()}
        if template != saved:
            differ = sorted(k for k in set(template) | set(saved) if template.get(k) != saved.get(k))
            raise CheckpointError(
                f"{self.step_path(step)} holds a train state that does not fit this config: "
                + "; ".join(f"{k}: checkpoint {saved.get(k)}, config {template.get(k)}"
                            for k in differ[:5])
                + ". Resume with the config it was saved with, or start a new --workdir with "
                "--config.init_from to take its weights.")
        data_state = self._data_state(step, checksums["data"], data_iterator, global_batch_size)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state_template)))
        except Exception as error:
            raise self._damaged(step, error) from error
        self._verify_state(step, checksums["state"], restored.state)
        _set_iterator_state(data_iterator, data_state)
        return restored.state

    def _read_data_state(self, step: int, name: str, expected: Optional[str]) -> dict[str, Any]:
        path = self.directory / str(step) / "data" / name
        try:
            text = path.read_text()
            state = json.loads(text)
        except Exception as error:
            raise self._damaged(step, error) from error
        if expected is not None and _data_checksum(text) != expected:
            raise DamagedCheckpointError(step, self.step_path(step),
                                         f"the checksum of {path} does not match.")
        return state

    def _data_state(self, step: int, expected: dict[str, str], data_iterator: Iterator,
                    global_batch_size: Optional[int]) -> dict[str, Any]:
        """This process's iterator state at ``step``, verified; converted through the global
        example index when the checkpoint was saved by another process or worker count."""
        names = sorted((p.name for p in (self.directory / str(step) / "data").glob(
            "process_*-of-*.json")), key=lambda n: int(n[len("process_"):].split("-", 1)[0]))
        fresh = json.loads(_iterator_state_text(data_iterator))
        if _data_file() in names:
            own = self._read_data_state(step, _data_file(), expected.get(_data_file()))
            if data_position.layout(own) == data_position.layout(fresh):
                return own
        if not names:
            raise DamagedCheckpointError(step, self.step_path(step),
                                         "it holds no data iterator position.")
        saved = [self._read_data_state(step, name, expected.get(name)) for name in names]
        num_examples = data_position.examples_read(saved)
        if global_batch_size is None:
            raise CheckpointError(
                f"{self.step_path(step)} was saved by {len(names)} processes (data workers "
                f"{data_position.layout(saved[0])}); pass global_batch_size to resume it on "
                f"{jax.process_count()} (data workers {data_position.layout(fresh)}).")
        try:
            state = data_position.state_at(fresh, num_examples, global_batch_size,
                                           jax.process_index(), jax.process_count())
        except ValueError as error:
            raise CheckpointError(f"{self.step_path(step)}: {error}") from None
        logging.warning(
            "Step %d was saved by %d processes with %d data workers each; continuing on %d "
            "processes with %d: the data resumes at global example %d.", step, len(names),
            data_position.layout(saved[0]), jax.process_count(), data_position.layout(fresh),
            num_examples)
        return state

    def restore_latest_intact(
        self,
        state_template: Any,
        data_iterator: Iterator,
        check_run: Optional[Callable[[int, dict[str, Any]], None]] = None,
        global_batch_size: Optional[int] = None,
    ) -> tuple[Optional[int], Any]:
        """Restores the newest checkpoint that verifies; moves damaged ones aside.

        Args:
          state_template: a state of the structure to restore (host numpy arrays).
          data_iterator: moved to the restored step's position.
          check_run: called with each candidate's step and ``run`` item before its arrays are
            read; it raises to refuse a checkpoint of another run (nothing is moved then).
          global_batch_size: examples per step over all processes; see :meth:`restore`.

        Returns:
          ``(step, state)``, or ``(None, state_template)`` if no intact checkpoint is left.
        """
        for step in reversed(self.all_steps()):
            try:
                if check_run is not None:
                    check_run(step, self.read_run(step))
                state = self.restore(step, state_template, data_iterator, global_batch_size)
                intact = True
            except DamagedCheckpointError as error:
                logging.error("%s", error)
                intact = False
            if _on_every_process(intact):
                return step, state
            self.set_aside(step)
        return None, state_template

    def set_aside(self, step: int) -> None:
        """Moves ``step`` to ``<workdir>/checkpoints_damaged/`` (on process 0) and forgets it."""
        if self.read_only:
            raise CheckpointError(f"{self.step_path(step)} is damaged; not moving it (read-only).")
        if jax.process_index() == 0:
            destination = self._move_aside(self.directory / str(step))
            logging.error("Moved the damaged checkpoint of step %d to %s; it is kept for "
                          "inspection and never read again.", step, destination)
        barrier(f"lambda_jax_checkpoint_set_aside_{step}")
        self.manager.reload()

    def read_state(self, step: Optional[int] = None) -> dict[str, Any]:
        """The saved train state at ``step`` (default: latest) as nested dicts of numpy arrays,
        verified against its checksums, for inspection, export and ``config.init_from``:
        ``read_state()["ema_params"]`` are the evaluated weights."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        checksums = self._checksums(step)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
        except Exception as error:
            raise self._damaged(step, error) from error
        self._verify_state(step, checksums["state"], restored.state)
        return restored.state

    def _damaged(self, step: int, error: Exception) -> DamagedCheckpointError:
        return DamagedCheckpointError(step, self.step_path(step),
                                      f"{type(error).__name__}: {str(error).rstrip('.')}.")

    def reached_preemption(self, step: int) -> bool:
        """True on every host once a preemption notice reached any host (multi-host)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        # Orbax removes a crashed save's leftovers in a thread it joins only before a save:
        # join it here, so a run that stops without saving leaves no half-removed directory.
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self.manager.close()



def read_weights(source: Any, template: dict[str, Any]) -> dict[str, Any]:
    """The arrays of another run's checkpoint that ``template`` names, in its structure.

    For fine-tuning (``config.init_from``): the optimizer state and step start afresh.

    Args:
      source: a workdir (its newest checkpoint), its ``checkpoints`` directory, or one step
        directory ``<workdir>/checkpoints/<step>``.
      template: ``{"params": ..., "batch_stats": ..., ...}`` of host arrays; each saved array
        must have the same path, dtype and shape.

    Raises:
      CheckpointError: if nothing there verifies, or the arrays do not fit ``template``.
    """
    path, step = epath.Path(source), None
    if path.name.isdigit() and (path / "state").exists():
        path, step = path.parent, int(path.name)
    elif (path / "checkpoints").exists():
        path = path / "checkpoints"
    reader = Checkpointer(path, keep=1, async_saves=False, read_only=True)
    try:
        saved = _flatten(reader.read_state(step))
    finally:
        reader.close()
    wanted = _flatten(template)
    differ = [name for name, leaf in wanted.items()
              if name not in saved or _spec(np.asarray(saved[name])) != _spec(np.asarray(leaf))]
    if differ:
        raise CheckpointError(
            f"config.init_from={source}: {len(differ)} arrays of this model are missing there or "
            f"have another dtype or shape ({', '.join(differ[:3])}"
            f"{', ...' if len(differ) > 3 else ''}).")
    return jax.tree.unflatten(jax.tree.structure(template), [saved[name] for name in wanted])
