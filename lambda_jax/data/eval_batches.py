"""Evaluation batches: each host's shard of the split, padded so all hosts take as many."""

import math
from typing import Iterator

import grain.python as grain
import numpy as np


def shard_bounds(num_examples: int, shard_options: grain.ShardOptions) -> tuple[int, int]:
    """[start, end) of this host's contiguous shard; the first num_examples % count
    shards hold one example more, so the shards cover every example once."""
    count, index = shard_options.shard_count, shard_options.shard_index
    base, remainder = divmod(num_examples, count)
    start = index * base + min(index, remainder)
    return start, start + base + (index < remainder)


class PaddedShard:
    """Records [start, end) of `source`, then copies of one record up to `length`.

    Every record gains 'mask': 1.0 for the shard's own records, 0.0 for the padding,
    so each host yields the same number of full evaluation batches and metrics
    weighted by the mask count every example of the split exactly once.
    """

    def __init__(self, source, start: int, end: int, length: int):
        self._source, self._start, self._end, self._length = source, start, end, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} records")
        real = self._start + index < self._end
        position = self._start + index if real else min(self._start, len(self._source) - 1)
        return {**self._source[position], "mask": np.float32(real)}

    def __repr__(self) -> str:
        return (f"PaddedShard({self._source!r}, start={self._start}, end={self._end}, "
                f"length={self._length})")


class EvalBatches:
    """Calling it gives one pass over this host's evaluation batches.

    One iterator over the batches repeated without end serves every pass, so grain's
    worker processes start at the first evaluation and serve all later ones (and
    prepare the first batches of the next pass while training runs). A pass left
    unfinished is completed, unseen, at the start of the next, so each pass starts at
    the first batch. One pass at a time.

    Args:
      dataset: a `grain.MapDataset` of `num_batches` batches, one pass.
      num_batches: batches per pass.
      num_workers: grain worker processes; 0 preprocesses in this process.
    """

    def __init__(self, dataset: grain.MapDataset, num_batches: int, num_workers: int):
        self.num_batches = num_batches
        self._dataset = dataset.repeat(None)
        self._num_workers = num_workers
        self._iterator = None
        self._taken = 0

    def __len__(self) -> int:
        return self.num_batches

    def __call__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._iterator is None:
            dataset = self._dataset.to_iter_dataset()
            if self._num_workers:
                dataset = dataset.mp_prefetch(
                    grain.MultiprocessingOptions(num_workers=self._num_workers))
            self._iterator = iter(dataset)
        return self._one_pass(self._iterator)

    def first_batch(self) -> dict[str, np.ndarray]:
        """The first batch of a pass, read in this process without starting one: the
        shapes and dtypes every batch has."""
        return self._dataset[0]

    def _one_pass(self, iterator):
        for _ in range(-self._taken % self.num_batches):
            next(iterator)
            self._taken += 1
        for _ in range(self.num_batches):
            batch = next(iterator)
            self._taken += 1
            yield batch

    def close(self) -> None:
        """Stops the worker processes; a later call starts new ones."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator, self._taken = None, 0


def create_eval_batches(source, preprocess: grain.MapTransform, host_batch_size: int,
                        shard_options: grain.ShardOptions, num_workers: int) -> EvalBatches:
    """This host's `EvalBatches` over all of `source`, each record mapped by `preprocess`.

    Every host yields ceil(ceil(len(source) / hosts) / host_batch_size) batches of
    `host_batch_size`; the padding that fills them has mask 0.
    """
    num_batches = math.ceil(math.ceil(len(source) / shard_options.shard_count)
                            / host_batch_size)
    start, end = shard_bounds(len(source), shard_options)
    dataset = (grain.MapDataset.source(
                   PaddedShard(source, start, end, num_batches * host_batch_size))
               .map(preprocess)
               .batch(host_batch_size))
    return EvalBatches(dataset, num_batches, num_workers)
