"""train.py as two processes on this machine (2 CPU devices each, 127.0.0.1, gloo): an
uninterrupted run under pmap, launched by the flags; a run found by SLURM detection that
SIGTERM to one process stops at the same step on both, with a checkpoint, and whose resumed
run ends with the uninterrupted run's parameters; each host reads its own part of the data;
a short run under shard_map; and a two-process workdir resumes on one process with 4 devices
(an elastic resume).

The runs are shared by the tests through module fixtures (about a minute each).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import threading

import jax
import numpy as np
import pytest

from lambda_jax.train import EXIT_PREEMPTED, Checkpointer
from test_train_program import QUICK, ROOT, _env, _max_difference, _slurm_port, _train_command

pytestmark = pytest.mark.slow
DEVICES_PER_PROCESS = 2
TIMEOUT = 900


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, data_dir, cache, parallelism, sigterm_at=None, slurm=False, **overrides):
    """Runs the quick config (with ``overrides``) as 2 processes; with ``sigterm_at``, SIGTERM goes to process 1
    once process 0 logs that step. ``slurm``: JAX detects the cluster from SLURM's variables
    (``--config.distributed``) instead of the flags. Returns (exit codes, stderr of each)."""
    port = _slurm_port() if slurm else _free_port()
    command = _train_command(workdir, data_dir=data_dir, parallelism=parallelism,
                             distributed=slurm, **{**QUICK, **overrides})
    processes = []
    for i in range(2):
        env = _env(DEVICES_PER_PROCESS, cache)
        args = list(command)
        if slurm:
            env.update(SLURM_JOB_ID=str(port - 61440), SLURM_STEP_NODELIST="127.0.0.1",
                       SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
        else:
            args += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                     f"--process_id={i}"]
        processes.append(subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE,
                                          text=True))
    # A hung collective must fail the test, not block it.
    watchdog = threading.Timer(TIMEOUT, lambda: [p.kill() for p in processes])
    watchdog.start()
    try:
        other = []
        reader = threading.Thread(target=lambda: other.extend(processes[1].stderr))
        reader.start()
        log = []
        for line in processes[0].stderr:
            log.append(line)
            if sigterm_at is not None and f"step {sigterm_at}/" in line:
                processes[1].send_signal(signal.SIGTERM)
                sigterm_at = None
        codes = [p.wait() for p in processes]
        reader.join()
    finally:
        watchdog.cancel()
        for p in processes:
            if p.poll() is None:
                p.kill()
    return codes, ["".join(log), "".join(other)]


def _params(workdir, step=None):
    return Checkpointer(os.path.join(workdir, "checkpoints"), keep=2).read_state(step)


def _steps(workdir):
    return Checkpointer(os.path.join(workdir, "checkpoints"), keep=2).all_steps()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data, cache):
    """Two processes (pmap, launched by the flags) from start to end: the workdir."""
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    codes, logs = _launch(workdir, data, cache, "pmap")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "JAX process 1 of 2, devices 4 (2 local" in logs[1]
    return workdir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, data, cache):
    """Two processes found by SLURM detection; SIGTERM to process 1 at step 8, then the same
    command again: (workdir, stop logs, step, data positions, resume logs). Under pmap, as
    the uninterrupted run: pmap and shard_map sum in other orders, and the difference grows
    over the steps."""
    workdir = str(tmp_path_factory.mktemp("stopped"))
    codes, logs = _launch(workdir, data, cache, "pmap", sigterm_at=8, slurm=True)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs[0][-3000:] + logs[1][-3000:]
    stopped_at = _steps(workdir)[-1]
    data_dir = os.path.join(workdir, "checkpoints", str(stopped_at), "data")
    positions = {name: json.loads(open(os.path.join(data_dir, name)).read())
                 for name in sorted(os.listdir(data_dir)) if name.endswith(".json")}
    codes, resumed = _launch(workdir, data, cache, "pmap", slurm=True)
    assert codes == [0, 0], resumed[0][-3000:] + resumed[1][-3000:]
    return workdir, logs, stopped_at, positions, resumed


def test_sigterm_to_one_process_stops_both_at_the_same_step(stopped):
    _, logs, stopped_at, _, _ = stopped
    assert 8 <= stopped_at < QUICK["num_train_steps"]
    assert "Received SIGTERM" not in logs[0]  # only process 1 received it
    for log in logs:
        assert f"Stopped at step {stopped_at} with a checkpoint" in log


def test_each_process_reads_its_own_examples(stopped):
    """Process i of 2 reads positions i, i + 2, ... of the shuffled order."""
    _, _, stopped_at, positions, _ = stopped
    assert sorted(positions) == ["process_0-of-2.json", "process_1-of-2.json"]
    last = [int(positions[f"process_{i}-of-2.json"]["last_seen_indices"]["0"]) for i in (0, 1)]
    host_batch = QUICK["batch_size"] // 2
    assert last == [2 * (stopped_at * host_batch - 1), 2 * (stopped_at * host_batch - 1) + 1]


def test_the_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(stopped,
                                                                          uninterrupted):
    workdir, _, stopped_at, _, resumed = stopped
    assert f"Resumed from {workdir}/checkpoints/{stopped_at} (step {stopped_at})" in resumed[0]
    assert "Elastic resume" not in resumed[0]
    final, reference = _params(workdir), _params(uninterrupted)
    assert int(final["step"]) == QUICK["num_train_steps"]
    assert _max_difference(final, reference) < 1e-5


def test_two_processes_train_under_shard_map(tmp_path, data, cache):
    codes, logs = _launch(str(tmp_path), data, cache, "shard_map", num_train_steps=4,
                          eval_every_steps=4, checkpoint_every_steps=4)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "4 devices (shard_map)" in logs[0]
    with open(tmp_path / "final_metrics.json") as f:
        metrics = json.load(f)
    assert metrics["step"] == 4 and 0 <= metrics["eval_top1"] <= 1
    assert int(_params(str(tmp_path))["step"]) == 4


def test_a_two_process_workdir_resumes_on_one_process_with_four_devices(tmp_path, data, cache,
                                                                        uninterrupted):
    """The last checkpoint removed (a kill before the final save), the same command on one
    process with 4 devices continues from step 10 at the same global example and finishes.
    Each step trains on the same examples, but they fall on other devices (host i of 2
    holds every other example), and batch-norm statistics are per device: the parameters
    are those of another run, not bit-identical ones."""
    workdir = str(tmp_path / "elastic")
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(QUICK["num_train_steps"])))
    run = subprocess.run(_train_command(workdir, data_dir=data, **QUICK), cwd=ROOT,
                         env=_env(4, cache), capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resumed from" in run.stderr and "(step 10)" in run.stderr
    assert ("Step 10 was saved by 2 processes with 0 data workers each; continuing on 1 "
            "processes with 0: the data resumes at global example 320.") in run.stderr
    assert ("Elastic resume: saved by 2 processes on 4 devices, continuing on 1 processes on "
            "4 devices with the same global batch of 32") in run.stderr
    final = _params(workdir)
    assert int(final["step"]) == QUICK["num_train_steps"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final))
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        assert json.load(f)["step"] == QUICK["num_train_steps"]
