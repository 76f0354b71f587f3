"""Device prefetching: the next batches go to the accelerators while the step runs.

`grain.experimental.device_put` prefetches a `grain.IterDataset` with `jax.device_put`;
the training loader is a `grain.DataLoader` and a batch is placed by
`DataParallel.shard_batch` (a reshape per device under pmap, a global array under
shard_map), so this module prefetches any iterator with any placement function, and
checkpoints the position of the batches handed out rather than of those prefetched.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

DEFAULT_BUFFER_SIZE = 2
_POLL_SECONDS = 0.1


class _End:
    """Queued after the last batch, with the error that ended the iterator, if any."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class DevicePrefetcher:
    """Iterates `put(batch)` for the batches of `iterator`, `size` of them ahead.

    A background thread draws from `iterator` and calls `put` (for example
    `DataParallel.shard_batch`), so the host-to-device copy of the next batches overlaps
    the running step. At most `size` placed batches wait to be handed out.

    `get_state()` / `set_state()` (the grain iterator protocol, for
    `grain.checkpoint.CheckpointSave`) give the position just after the last batch
    handed out, not the position of the prefetching thread, so a checkpoint resumes at
    the next batch the loop would have trained on. They need `iterator` to have them.

    Args:
      iterator: yields host batches; with `get_state` and `set_state` to be checkpointed.
      put: host batch -> device batch.
      size: batches placed ahead, >= 1.
    """

    def __init__(self, iterator: Iterator, put: Callable[[Any], Any],
                 size: int = DEFAULT_BUFFER_SIZE):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}.")
        self._iterator, self._put, self._size = iterator, put, size
        self._state = iterator.get_state() if hasattr(iterator, "get_state") else None
        self._thread = None
        self._peeked = None
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(self._size)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._fill, daemon=True,
                                        name="device-prefetch")
        self._thread.start()

    def _fill(self) -> None:
        checkpointable = self._state is not None
        try:
            while not self._stop.is_set():
                if not self._slots.acquire(timeout=_POLL_SECONDS):
                    continue
                try:
                    batch = next(self._iterator)
                except StopIteration:
                    self._queue.put(_End())
                    return
                state = self._iterator.get_state() if checkpointable else None
                self._queue.put((self._put(batch), state))
        except BaseException as error:  # re-raised in the consuming thread
            self._queue.put(_End(error))

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self):
        batch, self._state = self._take()
        self._peeked = None
        return batch

    def peek(self):
        """The next batch without handing it out: the next `next()` returns it, and
        `get_state()` does not count it until then."""
        self._peeked = self._take()
        return self._peeked[0]

    def _take(self) -> tuple[Any, Any]:
        if self._peeked is not None:
            return self._peeked
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._finished = True
            if item.error is not None:
                raise item.error
            raise StopIteration
        self._slots.release()
        return item

    def get_state(self):
        """The wrapped iterator's state just after the last batch handed out."""
        if self._state is None:
            raise TypeError(f"{self._iterator!r} has no get_state: it cannot be checkpointed.")
        return self._state

    def set_state(self, state) -> None:
        """Moves the wrapped iterator to `state`, dropping the prefetched batches."""
        self.close()
        self._iterator.set_state(state)
        self._state = self._iterator.get_state()
        self._start()

    def start_prefetch(self) -> None:
        """Part of the grain iterator protocol: prefetching already runs."""

    def close(self) -> None:
        """Stops the background thread; prefetched batches are dropped and iteration ends."""
        self._finished = True
        self._peeked = None
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> "DevicePrefetcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
