"""Test setup: 8 simulated CPU devices for every multi-device path, and a persistent
compilation cache that the test processes, the train.py subprocesses and the notebook
kernels share, so a program compiled once is not compiled again in the same run."""

import os
import pathlib

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Environment variables rather than jax.config, so that subprocesses inherit them.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
