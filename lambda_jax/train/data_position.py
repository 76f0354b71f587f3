"""The training data position as a global example index, for resuming on another topology.

grain's ``DataLoader`` state is per process (``process_<i>-of-<n>.json``): for each of the
host's read streams (one per worker, or one without workers) ``last_seen_indices`` holds the
last global sampler index it handed out. Process ``p`` of ``n`` with ``w`` streams reads
stream ``j``'s indices ``p + j*n + k*n*w`` for ``k = 0, 1, ...``, one batch per step from
the streams in turn. So the states of all processes give the number of examples handed out
together, and that number gives the state any other process count and worker count would
have reached after the same steps. With at most one worker per host before and after, the
examples read are the same ones, ``0 .. N - 1`` of the sampler's order, and the next step's
global batch is the one the saved topology would have read.
"""

from __future__ import annotations

from typing import Any, Sequence

_LAST_SEEN = "last_seen_indices"
_WORKERS = "worker_count"
_LAST_WORKER = "last_worker_index"


def _streams(state: dict[str, Any]) -> int:
    return max(int(state[_WORKERS]), 1)


def examples_read(states: Sequence[dict[str, Any]]) -> int:
    """The examples handed out by all processes together.

    Args:
      states: grain ``DataLoader`` states, ``states[p]`` of process ``p``, all of one run.
    """
    count = len(states)
    total = 0
    for index, state in enumerate(states):
        streams = _streams(state)
        for stream in range(streams):
            offset = int(state[_LAST_SEEN][str(stream)]) - index - stream * count
            total += offset // (streams * count) + 1
    return total


def state_at(template: dict[str, Any], num_examples: int, global_batch: int, process_index: int,
             process_count: int) -> dict[str, Any]:
    """The state of process ``process_index`` of ``process_count`` after ``num_examples``
    examples in steps of ``global_batch``.

    Args:
      template: this process's fresh state (its worker count and sampler).
      num_examples: from :func:`examples_read`; a whole number of steps.
      global_batch: examples per step over all processes.

    Raises:
      ValueError: if ``num_examples`` is not a whole number of steps of ``global_batch``.
    """
    if global_batch % process_count or num_examples % global_batch:
        raise ValueError(
            f"The saved data position ({num_examples} examples) is not a whole number of steps "
            f"of config.batch_size={global_batch} split over {process_count} processes; resume "
            "with the batch size the checkpoint was saved with.")
    steps, host_batch = num_examples // global_batch, global_batch // process_count
    streams = _streams(template)
    last_seen = {}
    for stream in range(streams):
        batches = (steps - stream + streams - 1) // streams  # this stream's turns in `steps`
        last_seen[str(stream)] = (process_index + stream * process_count
                                  + (batches * host_batch - 1) * streams * process_count)
    return {**template, _LAST_SEEN: last_seen,
            _LAST_WORKER: (steps - 1) % streams if template[_WORKERS] else -1}


def layout(state: dict[str, Any]) -> int:
    """The worker count a state was saved with."""
    return int(state[_WORKERS])
