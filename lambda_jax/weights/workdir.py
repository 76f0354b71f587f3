"""The weights a ``train.py`` run evaluates, read from its workdir's Orbax checkpoints.

Nothing in the workdir is written or moved, so a run may still be training there. Needs
orbax-checkpoint (the training extra).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from lambda_jax.convert import state_dict as sd
from lambda_jax.models.registry import create_model
from lambda_jax.weights import fitting, settings
from lambda_jax.weights.base import WEIGHTS_KINDS, ModelWeights

logger = logging.getLogger(__name__)


def _checkpoint_location(path: pathlib.Path) -> tuple[pathlib.Path, Optional[int]]:
    """``(checkpoints folder, step or None)`` of a workdir, its checkpoints or a step folder."""
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name == "checkpoints":
        return path, None
    raise IsADirectoryError(
        f"{path} is a directory but not a training workdir: it has no checkpoints/ folder "
        "(train.py --workdir writes one). weights is "
        f"{WEIGHTS_KINDS}; a workdir's step folder is <workdir>/checkpoints/<step>."
    )


def _read_checkpoint(directory: pathlib.Path, step: Optional[int]) -> tuple[int, dict, dict]:
    """``(step, run, state)`` of ``step`` or of the newest checkpoint that verifies."""
    from lambda_jax.train import checkpoint

    if not directory.is_dir():
        raise FileNotFoundError(f"{directory.parent} has no checkpoints yet ({directory} does "
                                "not exist): train with train.py --workdir first.")
    reader = checkpoint.Checkpointer(directory, keep=1, async_saves=False, read_only=True)
    try:
        steps = reader.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {directory}: the run has not saved one "
                                    "yet (train.py saves at each evaluation and at the end).")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"No checkpoint of step {step} in {directory}; its steps "
                                    f"are {steps}.")
        damaged = []
        for candidate in [step] if step is not None else reversed(steps):
            try:
                return candidate, reader.read_run(candidate), reader.read_state(candidate)
            except checkpoint.DamagedCheckpointError as error:
                if step is not None:
                    raise
                logger.warning("%s Trying the previous checkpoint.", error)
                damaged.append(str(candidate))
        raise checkpoint.CheckpointError(
            f"Every checkpoint in {directory} is damaged (steps {', '.join(damaged)}; the "
            "warnings say why). Nothing was moved.")
    finally:
        reader.close()


def load_workdir(path: pathlib.Path, name: Optional[str],
                 overrides: Mapping[str, Any]) -> ModelWeights:
    """The model of the run at ``path`` with the variables it evaluates.

    Args:
      path: a workdir, its ``checkpoints`` folder, or one step folder
        ``<workdir>/checkpoints/<step>``; without a step, the newest checkpoint that passes
        its checksums (damaged ones are skipped with a warning).
      name: the model the caller loads, or None for the run's.
      overrides: settings on top of the run's model, ``model_overrides``, class count and
        ``dtype``; only runtime settings may differ from them.

    Raises:
      IsADirectoryError: ``path`` is not a workdir.
      FileNotFoundError: no checkpoints, or not the given step.
      CheckpointError: every checkpoint is damaged, or the given step is.
      StateDictMismatchError: the checkpoint does not fit the model.
    """
    directory, step = _checkpoint_location(path)
    step, run, state = _read_checkpoint(directory, step)
    source = f"{directory / str(step)}"
    config = run.get("config") or {}
    name = settings.check_name(source, run["model"], name)
    recorded = {"num_classes": run["num_classes"],
                **settings.decode(run.get("model_overrides") or {})}
    if "dtype" in config:
        recorded["dtype"] = getattr(jnp, config["dtype"])
    model_settings = settings.fixed_settings(source, "the run", name, recorded, overrides)
    model = create_model(name, **model_settings)
    # The run evaluates its exponential moving average; a state without one, its parameters.
    ema = bool(state.get("ema_params"))
    params, batch_stats = ("ema_params", "ema_batch_stats") if ema else ("params", "batch_stats")
    arrays = fitting.flat({"params": state[params], "batch_stats": state.get(batch_stats, {})})
    side = (config["image_size"],) * 2 if "image_size" in config else None
    try:
        if side is None:
            side, _ = fitting.first_fit(lambda c: fitting.built_side(name, model, arrays, c))
        variables, channels = fitting.first_fit(
            lambda c: fitting.fit_variables(name, model, arrays, side, c))
    except sd.StateDictMismatchError as error:
        raise sd.StateDictMismatchError(
            f"{source} (a run of {name!r} with overrides {run.get('model_overrides')}): {error}"
        ) from None
    return ModelWeights(model, variables, name, side, channels,
                        f"{source} ({'EMA' if ema else 'parameters'})", config or None)
