"""Test setup: 8 simulated CPU devices for every multi-device path, programs compiled
unoptimised (``xla_test_flags``), and a persistent compilation cache that the test
processes, the train.py subprocesses and the notebook kernels share, so a program compiled
once is not compiled again in the same run."""

import atexit
import os
import pathlib
import shutil
import tempfile

from xla_test_flags import cpu_flags

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cpu_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Environment variables rather than jax.config, so that subprocesses inherit them.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# implementation="autotune" writes its decisions here rather than in the user's home; tests
# of the cache itself set their own directory.
os.environ["LAMBDA_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="lambda_jax_autotune_")
atexit.register(shutil.rmtree, os.environ["LAMBDA_JAX_CACHE_DIR"], ignore_errors=True)

# The files that take longest, longest first: with one file per worker (pytest-xdist's
# loadfile), the workers then finish at about the same time.
_LONGEST_FIRST = ("test_train_program.py", "test_benchmarks.py", "test_train_multiprocess.py",
                  "test_models.py", "test_readme.py", "test_parity_timm.py",
                  "test_language_model.py", "test_evaluate.py", "test_notebooks.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
