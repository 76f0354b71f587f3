"""The Orbax manager of a run's checkpoints: save, verified restore, retention."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from lambda_jax.train import checkpoint_data
from lambda_jax.train.checkpoint_integrity import (
    DAMAGED_DIR,
    CheckpointError,
    DamagedCheckpointError,
    NonFiniteError,
    check_fits,
    move_aside,
    set_aside_strays,
    state_checksums,
    unreadable,
    verify_state,
)
from lambda_jax.train.parallel import barrier

ITEMS = ("state", "data", "run", "checksums")
BEST_METRIC = "eval_top1"


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
            set_aside_strays(self.directory, self.damaged_directory)

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
        checksums["data"] = checkpoint_data.position_checksums(data_iterator)
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

    def _restore_item(self, step: int, **items: Any) -> Any:
        """Reads one item of ``step``; a step that cannot be read is damaged."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise unreadable(step, self.step_path(step), error) from error
        (name,) = items
        return restored[name]

    def read_run(self, step: int) -> dict[str, Any]:
        """The ``run`` item of ``step``: the model and the config that defines the run.

        Raises:
          DamagedCheckpointError: if it cannot be read.
        """
        return self._restore_item(step, run=ocp.args.JsonRestore())

    def _checksums(self, step: int) -> dict[str, Any]:
        if not (self.directory / str(step) / "checksums").exists():
            raise DamagedCheckpointError(step, self.step_path(step), "it has no checksums.")
        return self._restore_item(step, checksums=ocp.args.JsonRestore())

    def _read_verified_state(self, step: int, saved: dict[str, str],
                             restore_args: ocp.args.StandardRestore) -> Any:
        state = self._restore_item(step, state=restore_args)
        verify_state(step, self.step_path(step), saved, state)
        return state

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
        check_fits(self.step_path(step), checksums["state"], state_template)
        data_state = checkpoint_data.saved_position(
            step, self.directory / str(step), checksums["data"], data_iterator,
            global_batch_size)
        state = self._read_verified_state(step, checksums["state"],
                                          ocp.args.StandardRestore(state_template))
        checkpoint_data.move_to(data_iterator, data_state)
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
            destination = move_aside(self.directory / str(step), self.damaged_directory)
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
        return self._read_verified_state(step, checksums["state"], ocp.args.StandardRestore())

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
