"""train.py as two processes on this machine (2 CPU devices each, 127.0.0.1, gloo), in both
parallelism modes: each host reads its own part of the data; SIGTERM to one process stops
both at the same step with a checkpoint; the resumed run ends with the parameters of an
uninterrupted two-process run; and a two-process workdir resumes on one process with 4
devices (an elastic resume).

The runs are shared by the tests through module fixtures; all are slow (minutes on a loaded
2-core machine).
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

# Opt-in: on a loaded 2-core machine one process can reach its first collective more than
# gloo's 30 s key-value timeout after the other, which fails the run.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LAMBDA_JAX_MULTIPROCESS_TESTS") != "1",
                       reason="two-process train.py runs; set LAMBDA_JAX_MULTIPROCESS_TESTS=1"),
]
DEVICES_PER_PROCESS = 2
TIMEOUT = 900


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, data_dir, cache, parallelism, sigterm_at=None, slurm=False):
    """Runs the quick config as 2 processes; with ``sigterm_at``, SIGTERM goes to process 1
    once process 0 logs that step. ``slurm``: JAX detects the cluster from SLURM's variables
    (``--config.distributed``) instead of the flags. Returns (exit codes, stderr of each)."""
    port = _slurm_port() if slurm else _free_port()
    command = _train_command(workdir, data_dir=data_dir, parallelism=parallelism,
                             distributed=slurm, **QUICK)
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


@pytest.fixture(scope="module", params=["pmap", "shard_map"])
def stopped(request, tmp_path_factory, data, cache, uninterrupted):
    """Two processes, SIGTERM to process 1 at step 8, then the same command again (the
    shard_map run is found by SLURM detection): (mode, workdir, stop logs, step, resume
    logs)."""
    mode = request.param
    workdir = str(tmp_path_factory.mktemp(f"stopped_{mode}"))
    slurm = mode == "shard_map"
    codes, logs = _launch(workdir, data, cache, mode, sigterm_at=8, slurm=slurm)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs[0][-3000:] + logs[1][-3000:]
    stopped_at = _steps(workdir)[-1]
    data_dir = os.path.join(workdir, "checkpoints", str(stopped_at), "data")
    positions = {name: json.loads(open(os.path.join(data_dir, name)).read())
                 for name in sorted(os.listdir(data_dir))}
    codes, resumed = _launch(workdir, data, cache, mode, slurm=slurm)
    assert codes == [0, 0], resumed[0][-3000:] + resumed[1][-3000:]
    return mode, workdir, logs, stopped_at, positions, resumed


def test_sigterm_to_one_process_stops_both_at_the_same_step(stopped):
    _, _, logs, stopped_at, _, _ = stopped
    assert 8 <= stopped_at < QUICK["num_train_steps"]
    assert "Received SIGTERM" not in logs[0]  # only process 1 received it
    for log in logs:
        assert f"Stopped at step {stopped_at} with a checkpoint" in log


def test_each_process_reads_its_own_examples(stopped):
    """Process i of 2 reads positions i, i + 2, ... of the shuffled order."""
    _, _, _, stopped_at, positions, _ = stopped
    assert sorted(positions) == ["process_0-of-2.json", "process_1-of-2.json"]
    last = [int(positions[f"process_{i}-of-2.json"]["last_seen_indices"]["0"]) for i in (0, 1)]
    host_batch = QUICK["batch_size"] // 2
    assert last == [2 * (stopped_at * host_batch - 1), 2 * (stopped_at * host_batch - 1) + 1]


def test_the_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(stopped,
                                                                          uninterrupted):
    _, workdir, _, stopped_at, _, resumed = stopped
    assert f"Resumed from {workdir}/checkpoints/{stopped_at} (step {stopped_at})" in resumed[0]
    assert "Elastic resume" not in resumed[0]
    final, reference = _params(workdir), _params(uninterrupted)
    assert int(final["step"]) == QUICK["num_train_steps"]
    assert _max_difference(final, reference) < 1e-5


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
