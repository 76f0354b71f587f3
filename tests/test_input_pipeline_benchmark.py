"""benchmarks/input_pipeline.py runs at tiny sizes and reports both paths (no timing checks)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("workers", [
    "0", pytest.param("0,1", marks=pytest.mark.slow, id="0-and-1-workers")])
def test_input_pipeline_benchmark_smoke(tmp_path, workers):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "input_pipeline.py"), "--smoke",
         "--workers", workers, "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "input_pipeline.json") as f:
        payload = json.load(f)
    assert payload["smoke"] and payload["setup"]["image_size"] == 32
    counts = [int(count) for count in workers.split(",")]
    rows = {(row["variant"], row["workers"]): row for row in payload["rows"]}
    assert set(rows) == {(variant, count) for variant in ("before", "after") for count in counts}
    for (variant, _), row in rows.items():
        assert row["examples_per_second"] > 0
        # float32 or uint8 32x32x3 images, and an int32 label.
        pixel_bytes = 4 if variant == "before" else 1
        assert row["bytes_per_example_to_devices"] == 32 * 32 * 3 * pixel_bytes + 4
    assert set(payload["after_over_before_examples_per_second"]) == {
        f"{count}_workers" for count in counts}
    # The synthetic JPEGs are about 500x375 either way round (sides within 20%).
    assert 300 <= payload["setup"]["mean_height"] <= 600
    assert 300 <= payload["setup"]["mean_width"] <= 600
