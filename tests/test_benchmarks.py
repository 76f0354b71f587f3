"""Each benchmark script runs once at tiny sizes and writes its JSON and plot (no timing checks)."""

import json
import os
import subprocess
import sys

import pytest

from xla_test_flags import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_smoke(script, out_dir, name=None, plot=True, extra=()):
    env = dict(os.environ, PYTHONPATH=ROOT)
    # One device, as users run them; unoptimised, since a smoke run checks the script and
    # not its timings.
    env["XLA_FLAGS"] = FAST_COMPILE
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke", "--out",
         str(out_dir), *extra],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name = name or script.removesuffix(".py")
    with open(out_dir / f"{name}.json") as f:
        payload = json.load(f)
    if plot:
        assert (out_dir / f"{name}.png").stat().st_size > 0
    assert payload["machine"]["platform"] == "cpu"
    return payload, result.stdout


@pytest.mark.slow
def test_roofline_smoke(tmp_path):
    payload, stdout = _run_smoke("roofline.py", tmp_path)
    cases = {(row["case"], row["implementation"]) for row in payload["layers"]}
    assert ("local r=3", "lambda_jax tiled") in cases
    assert ("local r=3", "lambda_jax shift") in cases
    assert ("local r=3", "paper formulation (jnp)") in cases
    for row in payload["layers"]:
        assert row["train_ms"] > 0 and row["reference_gflop"] > 0 and row["matmul_gflops"] > 0
    assert len(payload["position_term"]) == 4
    sweep = {(row["r"], row["implementation"]) for row in payload["scope_sweep"]}
    assert sweep == {(r, impl) for r in (3, 5) for impl in ("tiled", "shift", "banded", "conv")}
    assert "| case | implementation |" in stdout


@pytest.mark.slow
def test_layer_scaling_smoke(tmp_path):
    payload, _ = _run_smoke("layer_scaling.py", tmp_path)
    layers = {row["layer"] for row in payload["rows"]}
    assert layers == {"lambda global", "lambda local r=7", "lambda local r=23",
                      "relative self-attention", "linear attention", "3x3 convolution"}
    for row in payload["rows"]:
        assert row["memory_mb"] > 0


@pytest.mark.slow
def test_torch_compare_smoke(tmp_path):
    for module in ("torch", "timm", "lambda_networks"):
        pytest.importorskip(module, reason='the comparison needs pip install -e ".[bench]"')
    payload, _ = _run_smoke("torch_compare.py", tmp_path)
    names = {row["implementation"] for row in payload["rows"]}
    assert {"lambda_jax", "timm", "lambda-networks"} <= names
    for row in payload["rows"]:
        assert row["forward_ms"] > 0 and row["train_ms"] > 0


@pytest.mark.slow
def test_models_smoke(tmp_path):
    payload, stdout = _run_smoke("models.py", tmp_path)
    settings, rows = payload["settings"], payload["rows"]
    assert [row["model"] for row in rows] == list(settings["models"])
    budget = settings["memory_budget_mb"]
    timed = 0
    for row in rows:
        assert row["params_m"] > 0
        for mode in ("inference", "train"):
            assert row[f"{mode}_memory_mb"] > 0 and row[f"{mode}_gflop_per_ex"] > 0
            within = row[f"{mode}_memory_mb"] <= budget
            assert (f"{mode}_ex_s" in row) == within
            timed += within
        assert row["train_gflop_per_ex"] > row["inference_gflop_per_ex"]
    by_model = {row["model"]: row for row in rows}
    # Global attention's [batch, heads, n, n] maps put its training step over the budget;
    # axial attention's [batch, heads, n, side] maps do not.
    global_attention = by_model["tiny global self-attention"]
    assert global_attention["train_status"] == "over memory budget"
    assert "train over memory budget" in global_attention["status"]
    axial = by_model["tiny axial self-attention"]
    assert "train_ex_s" in axial
    assert axial["train_memory_mb"] < global_attention["train_memory_mb"]
    assert timed >= 6
    baseline = rows[0]
    assert baseline["train_vs_baseline"] == 1.0 and baseline["train_memory_vs_baseline"] == 1.0
    assert rows[1]["train_vs_baseline"] == pytest.approx(
        rows[1]["train_ex_s"] / baseline["train_ex_s"])
    assert "| model | size |" in stdout


def _check_formulation_rows(rows, shapes, formulations=("tiled", "banded", "shift", "conv")):
    assert {row["layer"] for row in rows} == shapes
    for layer in shapes:
        by_implementation = {row["implementation"]: row for row in rows if row["layer"] == layer}
        assert set(by_implementation) == set(formulations)
        assert [name for name, row in by_implementation.items()
                if row["default_train"]] == ["tiled"]
        assert [name for name, row in by_implementation.items()
                if row["default_inference"]] == ["shift"]
        conv = by_implementation["conv"]
        assert conv["train_vs_conv"] == 1.0 and conv["memory_vs_conv"] == 1.0
        for row in by_implementation.values():
            assert row["train_ms"] > 0 and row["forward_ms"] > 0 and row["train_temp_mb"] > 0
            assert row["memory_vs_conv"] == pytest.approx(
                row["train_temp_mb"] / conv["train_temp_mb"])
        default = by_implementation["tiled"]
        assert default["time_bound"] == 1.0
        assert default["within_bounds"] == (default["memory_vs_conv"] <= 1.25
                                             and default["train_vs_conv"] <= 1.0)
        allowed = [row["train_ms"] for row in by_implementation.values()
                   if row["memory_vs_conv"] <= 1.25]
        assert default["train_vs_fastest"] == pytest.approx(default["train_ms"] / min(allowed))
        inference = by_implementation["shift"]
        allowed = [row["forward_ms"] for row in by_implementation.values()
                   if row["forward_temp_mb"] <= 2 * conv["forward_temp_mb"]]
        assert inference["forward_vs_fastest"] == pytest.approx(
            inference["forward_ms"] / min(allowed))


@pytest.mark.slow
def test_local_formulations_smoke(tmp_path):
    payload, stdout = _run_smoke("local_formulations.py", tmp_path, plot=False)
    _check_formulation_rows(payload["rows"], {"8x8x16 r=5 u=1", "6x6x16 r=3 u=2"})
    assert payload["settings"]["memory_bound"] == 1.25
    assert "load_average_1_5_15_min_at_start" in payload["machine"]
    assert "| layer | implementation | default_train | default_inference |" in stdout


@pytest.mark.slow
def test_accelerator_smoke(tmp_path):
    payload, stdout = _run_smoke("accelerator.py", tmp_path, name="accelerator_cpu_smoke",
                                 plot=False, extra=("--peak-tflops", "1"))
    assert payload["settings"]["dtype"] == "bfloat16" and payload["settings"]["smoke"]
    _check_formulation_rows(payload["layers"], {"8x8x16 r=5 u=1"},
                            ("tiled", "banded", "shift", "conv", "pallas"))
    assert payload["settings"]["peak_flops"] == 1e12  # --peak-tflops 1
    # The same FLOPs (the lambda convolution's) over each formulation's time.
    for mode in ("forward", "train"):
        flops = {row[f"{mode}_peak_fraction"] * row[f"{mode}_ms"] for row in payload["layers"]}
        assert max(flops) == pytest.approx(min(flops)) and min(flops) > 0
    models = payload["models"]
    assert [row["model"] for row in models] == ["one-block convolution", "one-block lambda"]
    assert models[0]["train_vs_baseline"] == 1.0
    for row in models:
        assert row["train_ex_s"] > 0 and row["train_memory_mb"] > 0
    assert models[1]["train_vs_baseline"] == pytest.approx(
        models[1]["train_ex_s"] / models[0]["train_ex_s"])
    assert "| model | size |" in stdout
