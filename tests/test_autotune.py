"""lambda_jax.core.autotune: the fastest candidate within the memory bound; at trace time
under jit, grad, vmap, shard_map and pmap; cached in the process and on disk (a second
process compiles nothing); damaged cache files rewritten with a warning; and two processes
that use process 0's choice although process 1's cache says otherwise."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from autotune_worker import ARGS, CANDIDATES, OPTIONS, PROBLEM, hungry, looped, matmul
from lambda_jax.core import autotune
from lambda_jax.core.autotune import cache
from lambda_jax.core.autotune.choice import fastest_within_bound, within_bound
from xla_test_flags import cpu_flags

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
WORKER = os.path.join(ROOT, "tests", "autotune_worker.py")
TIMEOUT = 180


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache directory and an empty in-process cache for every test."""
    monkeypatch.setenv("LAMBDA_JAX_CACHE_DIR", str(tmp_path / "cache"))
    autotune.forget()
    yield tmp_path / "cache" / "autotune"
    autotune.forget()


def _values():
    rng = np.random.default_rng(3)
    return [jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in ARGS]


def test_picks_the_fastest_candidate_within_the_bound():
    choice = autotune.choose(CANDIDATES, ARGS, **OPTIONS)
    assert choice.name == "matmul" and not choice.from_cache
    m = choice.measurements
    assert m["matmul"]["seconds"] < m["looped"]["seconds"]
    assert all(m[name]["within_bound"] for name in CANDIDATES)
    assert choice.key["problem"]["dtype"] == "float32" and choice.key["mode"] == "train"


def test_drops_a_faster_candidate_above_the_bound_and_keeps_the_reference():
    choice = autotune.choose({"looped": looped, "hungry": hungry}, ARGS, **OPTIONS)
    m = choice.measurements
    assert m["hungry"]["seconds"] < m["looped"]["seconds"]
    assert m["hungry"]["memory_bytes"] > 1.25 * m["looped"]["memory_bytes"]
    assert not m["hungry"]["within_bound"] and m["looped"]["within_bound"]
    assert choice.name == "looped"


@pytest.mark.parametrize("memory, expected", [
    ({"ref": 100, "a": 125, "b": 126}, {"ref": True, "a": True, "b": False}),
    ({"ref": 0, "a": 0, "b": 1}, {"ref": True, "a": True, "b": False}),
])
def test_the_bound_is_relative_to_the_reference(memory, expected):
    assert within_bound(memory, "ref", 1.25) == expected


def test_the_fastest_allowed_candidate_wins():
    measurements = {"ref": {"seconds": 3.0, "memory_bytes": 1, "within_bound": True},
                    "fast": {"seconds": 1.0, "memory_bytes": 9, "within_bound": False},
                    "next": {"seconds": 2.0, "memory_bytes": 1, "within_bound": True}}
    assert fastest_within_bound(measurements) == "next"


@pytest.mark.parametrize("candidates, overrides, message", [
    ({}, {}, "at least one candidate"),
    (CANDIDATES, {"reference": "conv"}, "not a candidate; pass one of"),
    (CANDIDATES, {"mode": "eval"}, "pass 'train'"),
    (CANDIDATES, {"memory_bound": 0.5}, "factor >= 1"),
])
def test_bad_requests_say_what_to_pass(candidates, overrides, message):
    with pytest.raises(ValueError, match=message):
        autotune.choose(candidates, ARGS, **{**OPTIONS, **overrides})


def _shard_map(outer, a, b):
    mesh = jax.make_mesh((8,), ("devices",))
    with jax.set_mesh(mesh):
        tiled = jax.device_put(jnp.tile(a, (8, 1)), jax.NamedSharding(mesh, P("devices")))
        out = jax.jit(jax.shard_map(outer, in_specs=(P("devices"), P()),
                                    out_specs=P("devices")))(tiled, b)
    return np.asarray(out)[:len(a)]


CONTEXTS = {
    "jit": lambda outer, a, b: jax.jit(outer)(a, b),
    "grad_of_jit": lambda outer, a, b: jax.grad(lambda a: jax.jit(outer)(a, b).sum())(a),
    "vmap": lambda outer, a, b: jax.vmap(outer, in_axes=(0, None))(a[None], b)[0],
    "shard_map": _shard_map,
    "pmap": lambda outer, a, b: jax.pmap(outer, in_axes=(0, None))(jnp.stack([a] * 8), b)[0],
}


@pytest.mark.parametrize("context", CONTEXTS)
def test_chooses_at_trace_time(context):
    choices = []

    def outer(a, b):  # a new function each time: jit's cache would not trace it again
        choices.append(autotune.choose(CANDIDATES, [a, b], **OPTIONS))
        return CANDIDATES[choices[-1].name](a, b)

    a, b = _values()
    expected = (jax.grad(lambda a: matmul(a, b).sum())(a) if context == "grad_of_jit"
                else matmul(a, b))
    np.testing.assert_allclose(CONTEXTS[context](outer, a, b), expected, rtol=1e-4,
                               atol=1e-4)
    assert choices[0].name == "matmul" and not choices[0].from_cache
    assert len(autotune.cached_choices()) == 1


def test_a_second_call_compiles_nothing_and_the_file_answers_after_a_restart(cache_dir):
    first = autotune.choose(CANDIDATES, ARGS, **OPTIONS)
    assert [p.suffix for p in cache_dir.iterdir()] == [".json"]
    compiled = autotune.compiled_candidates()
    second = autotune.choose(CANDIDATES, ARGS, **OPTIONS)
    autotune.forget()
    from_disk = autotune.choose(CANDIDATES, ARGS, **OPTIONS)
    assert autotune.compiled_candidates() == compiled
    assert second.from_cache and from_disk.from_cache
    assert second.name == from_disk.name == first.name
    assert from_disk.measurements == first.measurements
    [cached] = autotune.cached_choices()
    assert first.name in cached.table() and "looped" in cached.table()


def _env(num_devices, cache_root):
    return dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=cpu_flags(num_devices),
                JAX_PLATFORMS="cpu", LAMBDA_JAX_CACHE_DIR=str(cache_root))


def _report(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_a_second_process_with_the_same_cache_compiles_nothing(cache_dir):
    first = autotune.choose(CANDIDATES, ARGS, **OPTIONS)
    run = subprocess.run([sys.executable, WORKER], env=_env(2, cache_dir.parent), cwd=ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    report = _report(run.stdout)
    assert report == {"process": 0, "name": first.name, "from_cache": True,
                      "again": first.name, "again_from_cache": True, "compiled": 0,
                      "result_ok": True}


def _looped_wins(key):
    """A cached decision for ``key`` in which looped is measured fastest."""
    return autotune.Choice("looped", {
        name: {"seconds": 1.0 if name == "looped" else 2.0, "memory_bytes": 0,
               "within_bound": True} for name in CANDIDATES}, False, key)


def _key():
    return autotune.full_key(candidates=CANDIDATES, mode=OPTIONS["mode"],
                             reference=OPTIONS["reference"],
                             memory_bound=OPTIONS["memory_bound"], problem=PROBLEM,
                             backend="cpu")


@pytest.mark.parametrize("content", [
    b"\x00\xff{ not json",
    json.dumps({"version": 3, "winner": "matmul"}).encode(),
    "another key",
])
def test_a_damaged_cache_file_is_rewritten_with_a_warning(cache_dir, content):
    path = cache.path_for(_key(), cache_dir)
    cache_dir.mkdir(parents=True)
    if content == "another key":
        other = dict(_key(), problem={"op": "another"})
        cache.write(_looped_wins(other), cache_dir)
        os.replace(cache.path_for(other, cache_dir), path)
    else:
        path.write_bytes(content)
    with pytest.warns(UserWarning, match=f"{path}.*measuring again and rewriting it"):
        choice = autotune.choose(CANDIDATES, ARGS, **OPTIONS)
    assert not choice.from_cache
    assert cache.read(_key(), cache_dir) == autotune.Choice(
        choice.name, choice.measurements, True, choice.key)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_use_process_0s_choice(tmp_path, monkeypatch):
    """Process 0 measures (matmul wins); process 1's own cache says looped; both use
    matmul, process 1 without compiling."""
    roots = [tmp_path / "process_0", tmp_path / "process_1"]
    cache.write(_looped_wins(_key()), roots[1] / "autotune")
    monkeypatch.setenv("LAMBDA_JAX_CACHE_DIR", str(roots[1]))
    assert autotune.choose(CANDIDATES, ARGS, **OPTIONS).name == "looped"  # alone it would
    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, WORKER, f"--port={port}", f"--process_id={i}", "--num_processes=2"],
        env=_env(2, roots[i]), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    # A hung exchange must fail the test, not block it.
    watchdog = threading.Timer(TIMEOUT, lambda: [p.kill() for p in processes])
    watchdog.start()
    outputs = [None, None]
    # Both read at once: a full pipe of one process would block the other's collective.
    readers = [threading.Thread(target=lambda i=i: outputs.__setitem__(
        i, processes[i].communicate())) for i in range(2)]
    try:
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
    finally:
        watchdog.cancel()
        for p in processes:
            if p.poll() is None:
                p.kill()
    logs = outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert [p.returncode for p in processes] == [0, 0], logs
    reports = [_report(out) for out, _ in outputs]
    for i, report in enumerate(reports):
        assert report["process"] == i and report["result_ok"]
        assert report["name"] == report["again"] == "matmul"
        assert report["again_from_cache"]
    assert reports[0]["compiled"] == 2 and reports[1]["compiled"] == 0


def _broken(a, b):
    """``matmul`` as a Pallas kernel compiled (not interpreted), which the CPU backend
    cannot lower: a candidate that fails on the device, as an untested kernel may."""
    import jax.experimental.pallas as pl

    def kernel(a_ref, b_ref, out_ref):
        out_ref[...] = a_ref[...] @ b_ref[...]

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(a.shape, a.dtype))(a, b)


def test_a_candidate_that_fails_on_the_device_is_left_out_with_a_warning(cache_dir):
    candidates = {**CANDIDATES, "broken": _broken}
    with pytest.warns(UserWarning, match="candidate 'broken' failed on .* left out"):
        choice = autotune.choose(candidates, ARGS, **OPTIONS)
    assert choice.name == "matmul"
    broken = choice.measurements["broken"]
    assert broken["seconds"] == float("inf") and not broken["within_bound"]
    autotune.forget()
    again = autotune.choose(candidates, ARGS, **OPTIONS)  # from the file, infinity and all
    assert again.from_cache and again.name == "matmul"
    assert again.measurements["broken"]["seconds"] == float("inf")
