"""Data parallelism over all devices: ``jax.pmap`` or ``jax.jit(jax.shard_map(...))``.

Both run the same per-device step functions. The train state is replicated on every
device; each batch is split along its first axis. ``DataParallel(mode, devices)`` returns
the class of the mode, behind one interface:

- :class:`PmapParallel`: the state carries a leading ``[local_devices]`` axis; a host batch
  is reshaped to ``[local_devices, per_device_batch, ...]``.
- :class:`ShardMapParallel`: the state is one global array replicated over a 1-D device
  mesh; batches are global arrays assembled from each host's share
  (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import abc
import itertools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
# Long enough for the slowest process to compile a large model's step.
BARRIER_TIMEOUT_S = 3600
_barriers = itertools.count()


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Returns once every JAX process has called ``barrier(name)``; at once on one process.

    A barrier of JAX's coordination service, with its own timeout, not a collective: the CPU
    collectives (gloo) give up when one process waits more than 30 s for another.

    Raises:
      jax.errors.JaxRuntimeError: if some process does not arrive within ``timeout_s``.
    """
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        # Every process passes the same barriers in the same order; the count makes each
        # name unique, as the coordination service requires. Naming the processes makes
        # Orbax use the coordination service rather than a collective.
        multihost.sync_global_processes(f"{name}_{next(_barriers)}", timeout=timeout_s,
                                        processes=set(range(jax.process_count())))


class DataParallel(abc.ABC):
    """Places the state and the batches on the devices and maps step functions over them.

    ``DataParallel(mode, devices)`` makes a :class:`PmapParallel` or a
    :class:`ShardMapParallel`.

    Args:
      mode: ``"pmap"`` or ``"shard_map"``.
      devices: the devices to use (default: all). A subset is for single-host runs only.
    """

    mode: str

    def __new__(cls, mode: str, devices: Optional[Sequence[jax.Device]] = None):
        if cls is DataParallel:
            if mode not in _BY_MODE:
                raise ValueError(f"config.parallelism must be one of {MODES}, got {mode!r}.")
            cls = _BY_MODE[mode]
        return super().__new__(cls)

    def __init__(self, mode: str, devices: Optional[Sequence[jax.Device]] = None):
        self.devices = list(devices) if devices is not None else jax.devices()
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        # Auto axes: Explicit ones (make_mesh's default) reject inputs placed without a mesh.
        self.mesh = jax.make_mesh(
            (len(self.devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=self.devices
        )
        self._local_mesh = Mesh(np.array(self.local_devices), (AXIS,))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_local_devices(self) -> int:
        return len(self.local_devices)

    @abc.abstractmethod
    def map_train_step(self, step_fn: Callable) -> Callable:
        """``step_fn(state, batch, rng) -> (state, metrics)`` over all devices; donates state."""

    @abc.abstractmethod
    def map_eval_step(self, step_fn: Callable) -> Callable:
        """``step_fn(state, batch) -> sums`` over all devices."""

    def compile(self, mapped: Callable, *args: Any, name: str) -> None:
        """Compiles ``mapped`` (from ``map_train_step`` or ``map_eval_step``) now for
        ``args``' shapes and placements; its calls with such arguments reuse the program.

        With several processes it returns once every process has compiled it, so that no
        process runs the program's first collective while another is still compiling.
        """
        # Lowered.compile() fills the cache that calls of pmap and jit look up; the
        # returned executable is not used because under pmap it takes global arrays.
        mapped.lower(*args).compile()
        barrier(f"lambda_jax_compiled_{name}")

    @abc.abstractmethod
    def replicate(self, tree: Any) -> Any:
        """Host arrays (the same on every host) -> the state layout of this mode."""

    def to_host(self, tree: Any) -> Any:
        """A replicated device tree (state or metrics) -> one numpy copy."""
        return jax.tree.map(lambda x: self._one_copy(np.asarray(x.addressable_shards[0].data)),
                            tree)

    def _one_copy(self, shard: np.ndarray) -> np.ndarray:
        return shard

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's batch ``[host_batch, ...]`` -> device arrays split over the devices.

        Raises:
          ValueError: if the host batch does not split evenly over this host's devices.
        """
        host_batch = len(next(iter(batch.values())))
        if host_batch % self.num_local_devices:
            raise ValueError(
                f"A host batch of {host_batch} examples does not split over "
                f"{self.num_local_devices} local devices; make the batch size a multiple of the "
                "device count."
            )
        return {k: self._place(v) for k, v in batch.items()}

    @abc.abstractmethod
    def _place(self, host_array: np.ndarray) -> jax.Array:
        """One array of a host batch -> its device array."""


class PmapParallel(DataParallel):
    """``jax.pmap`` over this host's devices; the state has a leading device axis."""

    mode = "pmap"

    def map_train_step(self, step_fn: Callable) -> Callable:
        return jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None),
                        devices=self._pmap_devices(), donate_argnums=(0,))

    def map_eval_step(self, step_fn: Callable) -> Callable:
        return jax.pmap(step_fn, axis_name=AXIS, devices=self._pmap_devices())

    def _pmap_devices(self) -> Optional[list]:
        # pmap over all devices must not name them (required on multi-host).
        return None if self.devices == jax.devices() else self.devices

    def replicate(self, tree: Any) -> Any:
        sharding = NamedSharding(self._local_mesh, P(AXIS))
        n = self.num_local_devices
        return jax.tree.map(
            lambda x: jax.device_put(np.broadcast_to(x, (n, *np.shape(x))), sharding), tree)

    def _one_copy(self, shard: np.ndarray) -> np.ndarray:
        return shard[0]

    def _place(self, host_array: np.ndarray) -> jax.Array:
        n = self.num_local_devices
        shape = (n, len(host_array) // n, *host_array.shape[1:])
        return jax.device_put(np.reshape(host_array, shape),
                              NamedSharding(self._local_mesh, P(AXIS)))


class ShardMapParallel(DataParallel):
    """``jax.jit(jax.shard_map(...))`` over a 1-D mesh of all devices; global arrays."""

    mode = "shard_map"

    def map_train_step(self, step_fn: Callable) -> Callable:
        return jax.jit(self._shard_map(step_fn, (P(), P(AXIS), P()), (P(), P())),
                       donate_argnums=(0,))

    def map_eval_step(self, step_fn: Callable) -> Callable:
        return jax.jit(self._shard_map(step_fn, (P(), P(AXIS)), P()))

    def _shard_map(self, fn: Callable, in_specs: Any, out_specs: Any) -> Callable:
        # check_vma=False: with it, the gradient of a replicated (P()) parameter comes back
        # already summed over the devices and the step's lax.pmean would scale it again.
        # Without it the per-device step sees per-device gradients exactly as under pmap.
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    def replicate(self, tree: Any) -> Any:
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                   lambda i: np.asarray(x)[i]),
            tree)

    def _place(self, host_array: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(AXIS)),
                                                      host_array)


_BY_MODE = {cls.mode: cls for cls in (PmapParallel, ShardMapParallel)}
MODES = tuple(_BY_MODE)
