"""XLA flags of the test processes and of the programs the tests start.

The tests compile many small programs and run each briefly: XLA's optimising backend passes
cost more time than they save, so the tests compile unoptimised (results are the same
operations; only the machine code is slower). train.py runs that check a user's defaults
(the documented accuracy) and the benchmark scripts' own timings keep the defaults.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_flags(num_devices: int) -> str:
    """``XLA_FLAGS`` for ``num_devices`` simulated CPU devices, compiling unoptimised."""
    return f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}"
