"""The training program: ``train_and_evaluate(config, workdir)``."""

from __future__ import annotations

import functools
import json
import signal
import threading
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from lambda_jax.train import config_check
from lambda_jax.train import metrics as metrics_lib
from lambda_jax.train.checkpoint import Checkpointer, NonFiniteError, read_weights
from lambda_jax.train.optim import create_learning_rate_fn, create_optimizer
from lambda_jax.train.parallel import AXIS, DataParallel
from lambda_jax.train.steps import TrainState, create_train_state, eval_step, train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# train.py's exit status after a stop on SIGTERM or Ctrl-C that saved a checkpoint: EX_TEMPFAIL,
# "try again later", so a scheduler requeues the job; a finished run exits 0.
EXIT_PREEMPTED = 75


def validate_config(config: ml_collections.ConfigDict, parallel: DataParallel) -> None:
    """Raises ``ValueError`` naming the field for settings that cannot run on these devices."""
    config_check.check_values(config, parallel.num_devices)


def _image_shape(info: Any) -> tuple[int, int, int]:
    size = info.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return height, width, info.channels


class PreemptionGuard:
    """Turns SIGTERM and a first Ctrl-C into a request to checkpoint and stop.

    On one host the signal sets a flag checked after every step; a second Ctrl-C interrupts
    at once. On several hosts JAX's preemption service receives the signal and Orbax's
    ``reached_preemption`` makes all hosts stop at the same step.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("Received %s: saving a checkpoint, then stopping.",
                        signal.Signals(signum).name)
        self.requested = True

    def should_stop(self, step: int, checkpointer: Checkpointer) -> bool:
        if jax.process_count() > 1:
            return checkpointer.reached_preemption(step)
        return self.requested


def evaluate(p_eval_step, state: TrainState, eval_fn, parallel: DataParallel) -> dict[str, float]:
    """One pass over the eval set: ``eval_loss``, ``eval_top1``, ``eval_top5`` (fractions)."""
    from lambda_jax.data import DevicePrefetcher

    totals = None
    with DevicePrefetcher(eval_fn(), parallel.shard_batch) as batches:
        for batch in batches:
            sums = p_eval_step(state, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("The eval set is empty; check config.eval_split.")
    totals = parallel.to_host(totals)
    count = float(totals["count"])
    return {
        "eval_loss": float(totals["loss"]) / count,
        "eval_top1": float(totals["top1"]) / count,
        "eval_top5": float(totals["top5"]) / count,
    }


def check_finite(host_metrics: Sequence[dict[str, Any]], first_step: int) -> None:
    """Raises :class:`NonFiniteError` naming the first step whose loss (or gradient norm, where
    the step reports one) is NaN or infinite; ``host_metrics[i]`` is step ``first_step + i``."""
    for i, step_metrics in enumerate(host_metrics):
        for name in ("loss", "grad_norm"):
            if name in step_metrics and not np.isfinite(step_metrics[name]):
                raise NonFiniteError(
                    f"The training {name} is {float(step_metrics[name])} at step "
                    f"{first_step + i}; stopping without saving. Lower config.learning_rate, "
                    "set config.grad_clip_norm, or check the data; the newest checkpoint "
                    "predates the divergence.")


def _learning_rate_at(config: dict[str, Any], steps_per_epoch: int, num_train_steps: int,
                      step: int) -> float:
    schedule = create_learning_rate_fn(ml_collections.ConfigDict(config), steps_per_epoch,
                                       num_train_steps)
    return float(schedule(step))


def _resume_check(run: dict[str, Any], allow_config_changes: bool, checkpointer: Checkpointer,
                  workdir: str):
    """A ``check_run`` for :meth:`Checkpointer.restore_latest_intact`: refuses a checkpoint
    whose run-defining fields differ from ``run``'s, unless ``allow_config_changes``."""

    def check(step: int, saved: dict[str, Any]) -> None:
        if "config" in saved:
            changes = config_check.config_changes(saved["config"], run["config"])
        else:  # saved before configs were recorded: the model fields only
            changes = {k: (saved.get(k), run[k]) for k in ("model", "model_overrides", "dataset")
                       if saved.get(k) != run[k]}
        if saved.get("num_classes") != run["num_classes"]:
            changes["num_classes"] = (saved.get("num_classes"), run["num_classes"])
        if not changes:
            return
        detail = config_check.describe_changes(changes)
        if not allow_config_changes:
            raise config_check.ConfigChangeError(
                f"{checkpointer.step_path(step)} holds a checkpoint of a different run "
                f"({detail}). These fields define the run. Resume with the saved values, pass "
                "--allow_config_changes to continue with the new ones on purpose, or start a new "
                f"--workdir with --config.init_from={workdir} to fine-tune from its weights.")
        before = (_learning_rate_at(saved["config"], saved["steps_per_epoch"],
                                    saved["num_train_steps"], step) if "config" in saved
                  else float("nan"))
        after = _learning_rate_at(run["config"], run["steps_per_epoch"], run["num_train_steps"],
                                  step)
        logging.warning("Continuing step %d with a changed config (--allow_config_changes): %s. "
                        "Learning rate at step %d: %.6g before, %.6g now.", step, detail, step,
                        before, after)

    return check


def _log_topology_change(saved: dict[str, Any], run: dict[str, Any], batch_size: int) -> None:
    """Logs a resume on another number of processes or devices (an elastic resume)."""
    if "num_devices" not in saved:  # saved before topologies were recorded
        return
    before = (saved["num_processes"], saved["num_devices"])
    after = (run["num_processes"], run["num_devices"])
    if before != after:
        logging.warning("Elastic resume: saved by %s processes on %s devices, continuing on %d "
                        "processes on %d devices with the same global batch of %d (%d examples "
                        "per device).", *before, *after, batch_size, batch_size // after[1])


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: Optional[Sequence[jax.Device]] = None,
    allow_config_changes: bool = False,
) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.dataset``, evaluating, logging and checkpointing.

    Resumes from the newest intact checkpoint in ``<workdir>/checkpoints``; damaged ones are
    moved to ``<workdir>/checkpoints_damaged/``. A checkpoint may come from another number of
    processes and devices: the global batch stays ``config.batch_size`` and the data continues
    at the same global example index. Without a checkpoint, starts from
    ``config.init_from``'s weights if set. Stops early with a checkpoint on SIGTERM or Ctrl-C.
    Writes TensorBoard events and ``config.json`` to ``workdir`` and, when training completes,
    ``<workdir>/final_metrics.json``.

    Args:
      config: a config from ``configs/`` (see ``configs/default.py`` for every field).
      workdir: directory for checkpoints, event files and final metrics; local or a URL such
        as ``gs://bucket/run`` (every file goes through ``etils.epath``, arrays through
        Orbax and tensorstore).
      devices: devices to train on (default: all; a subset only on a single host).
      allow_config_changes: resume although fields outside
        :data:`config_check.MAY_CHANGE_ON_RESUME` differ from the checkpoint's; the changes
        and the learning rate before and after are logged.

    Returns:
      The last metrics, with ``step`` and ``preempted``. ``examples_per_second`` counts
      training steps only, not the evaluations and checkpoint saves in between.

    Raises:
      ConfigChangeError: the newest intact checkpoint was saved with another run-defining
        config (and ``allow_config_changes`` is False).
      NonFiniteError: the loss became NaN or infinite; the newest checkpoint predates it.
    """
    from lambda_jax import create_model
    from lambda_jax.data import DevicePrefetcher, create_datasets

    parallel = DataParallel(config.parallelism, devices)
    validate_config(config, parallel)

    train_loader, eval_fn, info = create_datasets(config, seed=config.seed)
    config_check.check_data_size(config, info.num_train_examples)
    model = create_model(
        config.model,
        num_classes=info.num_classes,
        dtype=DTYPES[config.dtype],
        axis_name=AXIS,
        **{k: v for k, v in config.model_overrides.items() if v is not None},
    )
    steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
    num_train_steps = (
        config.num_train_steps if config.num_train_steps > 0
        else int(config.num_epochs * steps_per_epoch)
    )
    if num_train_steps < 1:
        raise ValueError(f"config.num_epochs={config.num_epochs} is less than one step "
                         f"({steps_per_epoch} steps per epoch); raise it.")
    eval_every = config.eval_every_steps or steps_per_epoch
    checkpoint_every = config.checkpoint_every_steps or eval_every
    learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, num_train_steps)
    tx = create_optimizer(config, learning_rate_fn)

    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    init = functools.partial(create_train_state, model=model, tx=tx, image_shape=_image_shape(info))
    # Initialisation runs once: on the CPU, XLA's slow optimising passes (mostly over the
    # random-number code) would take longer than running it unoptimised.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    host_state = jax.device_get(jax.jit(init, compiler_options=options)(init_rng))

    config_json = json.loads(config.to_json_best_effort())
    # Unset overrides are not part of the run, so a run saved without them resumes.
    config_json["model_overrides"] = {
        k: v for k, v in config_json["model_overrides"].items() if v is not None}
    run = {
        "model": config.model,
        "model_overrides": config_json["model_overrides"],
        "num_classes": info.num_classes,
        "dataset": config.dataset,
        "config": config_json,
        "steps_per_epoch": steps_per_epoch,
        "num_train_steps": num_train_steps,
        # How it ran: may change on resume (logged when it does).
        "num_processes": jax.process_count(),
        "num_devices": parallel.num_devices,
    }
    checkpointer = Checkpointer(
        epath.Path(workdir) / "checkpoints",
        keep=config.keep_checkpoints,
        async_saves=config.async_checkpoints,
    )
    try:
        train_iter = iter(train_loader)
        latest, host_state = checkpointer.restore_latest_intact(
            host_state, train_iter,
            check_run=_resume_check(run, allow_config_changes, checkpointer, workdir),
            global_batch_size=config.batch_size)
    except BaseException:
        checkpointer.close()
        raise
    if latest is not None:
        logging.info("Resumed from %s (step %d).", checkpointer.step_path(latest), latest)
        _log_topology_change(checkpointer.read_run(latest), run, config.batch_size)
    else:
        train_iter = iter(train_loader)  # a damaged checkpoint may have moved it
        if config.init_from:
            weights = read_weights(config.init_from, {
                k: getattr(host_state, k)
                for k in ("params", "batch_stats", "ema_params", "ema_batch_stats")})
            host_state = host_state.replace(**weights)
            logging.info("Starting from the weights in %s.", config.init_from)
    metrics_lib.write_json(workdir, "config.json", config.to_json_best_effort(indent=2))
    start_step = int(host_state.step)
    # Checkpoints take the prefetcher's position: that of the batches handed out.
    train_iter = DevicePrefetcher(train_iter, parallel.shard_batch)
    state = parallel.replicate(host_state)
    del host_state

    p_train_step = parallel.map_train_step(functools.partial(
        train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
        num_classes=info.num_classes, label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay, axis_name=AXIS, mean=info.mean, std=info.std,
    ))
    p_eval_step = parallel.map_eval_step(functools.partial(
        eval_step, model=model, num_classes=info.num_classes, axis_name=AXIS,
        mean=info.mean, std=info.std,
    ))

    writer = metrics_lib.MetricWriter(workdir)
    last: dict[str, Any] = {}
    eval_metrics: Optional[dict[str, float]] = None
    step = start_step
    preempted = False
    pending: list[dict[str, jax.Array]] = []  # on the devices, not yet checked
    fetched: list[dict[str, np.ndarray]] = []  # checked, not yet logged
    logging.info("Training %s on %s: steps %d..%d of %d per epoch, %d devices (%s).",
                 config.model, config.dataset, start_step, num_train_steps, steps_per_epoch,
                 parallel.num_devices, parallel.mode)
    try:
        # Ahead of time, every process waiting for the others: see DataParallel.compile.
        if start_step < num_train_steps:
            parallel.compile(p_train_step, state, train_iter.peek(), dropout_rng,
                             name="train_step")
        parallel.compile(p_eval_step, state, parallel.shard_batch(eval_fn.first_batch()),
                         name="eval_step")
        throughput = metrics_lib.Throughput(start_step)
        with PreemptionGuard() as guard:
            while step < num_train_steps:
                batch = next(train_iter)
                state, step_metrics = p_train_step(state, batch, dropout_rng)
                pending.append(step_metrics)
                step += 1
                done = step == num_train_steps
                preempted = guard.should_stop(step, checkpointer)
                log_due = step % config.log_every_steps == 0 or done
                save_due = step % checkpoint_every == 0 or done or preempted
                if log_due or save_due:
                    # The metrics are fetched here anyway: checking them adds no device sync.
                    host_metrics = parallel.to_host(pending)
                    check_finite(host_metrics, step - len(pending) + 1)
                    fetched.extend(host_metrics)
                    pending = []
                if log_due:
                    last = {
                        "train_loss": float(np.mean([m["loss"] for m in fetched])),
                        "train_accuracy": float(np.mean([m["accuracy"] for m in fetched])),
                        "learning_rate": float(fetched[-1]["learning_rate"]),
                        "examples_per_second":
                            throughput.examples_per_second(step, config.batch_size),
                    }
                    writer.write(step, last)
                    metrics_lib.log_progress(step, num_train_steps, last)
                    fetched = []
                # An evaluation due with a checkpoint runs first, so its metrics are saved
                # with it and the best checkpoint is known after a resume.
                evaluated = step % eval_every == 0 or done
                if evaluated:
                    with throughput.paused():
                        eval_metrics = evaluate(p_eval_step, state, eval_fn, parallel)
                    writer.write(step, eval_metrics)
                    metrics_lib.log_progress(step, num_train_steps, eval_metrics)
                if save_due:
                    with throughput.paused():
                        checkpointer.save(step, parallel.to_host(state), train_iter, run,
                                          metrics=eval_metrics if evaluated else None)
                if preempted:
                    logging.warning("Stopped at step %d with a checkpoint in %s; rerun the same "
                                    "command to resume.", step, checkpointer.step_path(step))
                    break
        if not preempted and eval_metrics is None:
            eval_metrics = evaluate(p_eval_step, state, eval_fn, parallel)
        checkpointer.wait()
    finally:
        train_iter.close()
        eval_fn.close()
        checkpointer.close()
        writer.close()
    result = {**last, **(eval_metrics or {}), "step": step, "preempted": preempted}
    if not preempted:
        metrics_lib.write_final_metrics(workdir, result)
    return result
