"""Orbax checkpoints of the train state, the data iterator and the run's identity.

Each step directory holds three items: ``state`` (the :class:`TrainState` as numpy arrays),
``data`` (the grain iterator position, one file per host) and ``run`` (JSON naming the model,
so a workdir of another model is refused before anything is overwritten). Orbax writes each
step to a temporary directory and renames it when complete, so a save cut short by a crash
leaves the previous checkpoints intact; leftovers are removed when the manager opens.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or from a different run."""


class Checkpointer:
    """Keeps the last ``keep`` checkpoints plus the one with the best ``eval_top1``.

    Args:
      directory: where step directories go (``<workdir>/checkpoints``).
      keep: number of most recent checkpoints kept.
      async_saves: write in a background thread while training continues.
    """

    def __init__(self, directory: str, *, keep: int, async_saves: bool = True):
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints must be at least 1, got {keep}.")
        self.directory = os.path.abspath(directory)
        preservation = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics["eval_top1"],
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            enable_async_checkpointing=async_saves,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "run"), options=options
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def check_run(self, run: dict[str, Any]) -> None:
        """Raises :class:`CheckpointError` if the latest checkpoint belongs to another run.

        ``run`` holds the fields that must agree (model name, classes, overrides).
        """
        step = self.latest_step()
        if step is None:
            return
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))
        except Exception as error:
            raise self._unreadable(step, error) from error
        different = {k: (saved.run.get(k), v) for k, v in run.items() if saved.run.get(k) != v}
        if different:
            detail = "; ".join(f"{k}: checkpoint {old!r}, config {new!r}" for k, (old, new) in
                               different.items())
            raise CheckpointError(
                f"{self.step_path(step)} holds a checkpoint of a different run ({detail}). "
                "Use a new --workdir for this config, or delete that workdir's checkpoints."
            )

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Iterator,
        run: dict[str, Any],
        metrics: Optional[dict[str, float]] = None,
    ) -> None:
        """Starts saving ``state`` (host numpy arrays) and the iterator position at ``step``."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                run=ocp.args.JsonSave(run),
            ),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, state_template: Any, data_iterator: Iterator) -> Any:
        """Restores the state at ``step`` into ``state_template``'s structure and moves
        ``data_iterator`` to the saved position.

        Raises:
          CheckpointError: naming the step and path, if the checkpoint cannot be read or does
            not match the template.
        """
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(state_template),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )
        except Exception as error:
            raise self._unreadable(step, error) from error
        return restored.state

    def read_state(self, step: Optional[int] = None) -> dict[str, Any]:
        """The saved train state at ``step`` (default: latest) as nested dicts of numpy arrays,
        for inspection and export: ``read_state()["ema_params"]`` are the evaluated weights."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
        except Exception as error:
            raise self._unreadable(step, error) from error
        return restored.state

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        return CheckpointError(
            f"Cannot restore the checkpoint of step {step} at {self.step_path(step)}: "
            f"{type(error).__name__}: {str(error).rstrip('.')}. Delete that step's directory to resume from an "
            "earlier checkpoint, or start afresh with a new --workdir."
        )

    def reached_preemption(self, step: int) -> bool:
        """True on every host once a preemption notice reached any host (multi-host)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
