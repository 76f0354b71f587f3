"""Input-pipeline throughput on ImageNet-like JPEGs: the old host path against the new one.

Writes an array_record TFDS data set of synthetic JPEGs (about 500x375, each size drawn
around it, landscape and portrait), then reads its training split with Inception crops
and flips, in rounds that take turns between:

- before: TFDS decodes every JPEG in full, the crop is cut from the pixels, and the host
  normalises to float32 (the pipeline as it was);
- after: `lambda_jax.data.create_datasets`: TFDS decoding skipped, decode and crop in one
  step (a reduced-size JPEG decode where the crop allows), uint8 batches (the step
  normalises on the devices);

each with 0 grain workers (preprocessing in the main process) and 1 worker process. It
reports examples/s (median over rounds, after a warm-up that starts the workers), the
examples per CPU-second (this process and the variant's worker: what one busy core
delivers, whatever the machine's other load) and the bytes per example the batches send
to the devices. A worker prefetches a batch or two while other variants are timed, a
head start of at most ~2 of the 16 batches of a run.

    PYTHONPATH=. python benchmarks/input_pipeline.py          # ~5 minutes on 2 cores
    PYTHONPATH=. python benchmarks/input_pipeline.py --smoke  # seconds, checks it works

Results: benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import tempfile
import time

import grain.python as grain
from absl import flags
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from lambda_jax.data import create_datasets, input_pipeline, preprocessing  # noqa: E402
from lambda_jax.data.synthetic import NAME as DATASET, SyntheticImagenetJpegs  # noqa: E402

NAME = "input_pipeline"


@dataclasses.dataclass(frozen=True)
class HostFloatPreprocess(grain.RandomMapTransform):
    """The old training transform: decoded pixels -> crop, flip -> float32 on the host."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def random_map(self, example, rng: np.random.Generator):
        image = preprocessing.preprocess_for_train(
            example["image"], rng, augment="imagenet", image_size=self.image_size, channels=3)
        scaled = image.astype(np.float32) / np.float32(255)
        normalized = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std,
                                                                                np.float32)
        return {"image": normalized, "label": np.int32(example["label"])}


def before_loader(data_dir: str, config) -> grain.DataLoader:
    """The old path: TFDS decodes in full, the host builds float32 images."""
    source = tfds.builder(DATASET, data_dir=data_dir).as_data_source(split="train")
    return grain.DataLoader(
        data_source=source,
        sampler=grain.IndexSampler(len(source), shard_options=grain.NoSharding(),
                                   shuffle=True, num_epochs=None, seed=0),
        operations=[HostFloatPreprocess(config.image_size, input_pipeline.IMAGENET_MEAN,
                                        input_pipeline.IMAGENET_STD),
                    grain.Batch(config.batch_size, drop_remainder=True)],
        worker_count=config.num_workers,
    )


def after_loader(data_dir: str, config) -> grain.DataLoader:
    """The pipeline as the training program builds it."""
    return create_datasets(config, seed=0, shard_options=grain.NoSharding())[0]


def cpu_seconds(pids) -> float:
    """CPU time (user + system) of this process and of the worker processes `pids`."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


def main():
    def add_arguments(parser):
        parser.add_argument("--data_dir", default=None, help="where to write the synthetic "
                            "set (default: a temporary directory)")
        parser.add_argument("--workers", default="0,1",
                            help="comma-separated grain worker counts to measure")

    args = common.parse_args(__doc__.splitlines()[0], add_arguments)
    worker_counts = [int(count) for count in args.workers.split(",")]
    smoke = args.smoke
    image_size, batch_size = (32, 4) if smoke else (224, 32)
    batches_per_run = 2 if smoke else 16
    runs = 1 if smoke else max(1, args.runs)
    # grain's worker processes read its absl flags; this script parses argparse flags.
    flags.FLAGS.mark_as_parsed()
    load_at_start = os.getloadavg()

    with tempfile.TemporaryDirectory() as temporary:
        data_dir = args.data_dir or temporary
        builder = SyntheticImagenetJpegs(
            data_dir=data_dir, file_format="array_record",
            num_examples={"train": 16, "validation": 4} if smoke else None)
        builder.download_and_prepare()
        raw = builder.as_data_source(split="train",
                                     decoders={"image": tfds.decode.SkipDecoding()})
        jpeg_bytes = [len(raw[i]["image"]) for i in range(len(raw))]
        shapes = [preprocessing.image_shape(raw[i]["image"]) for i in range(len(raw))]

        iterators, workers_of, bytes_per_example = {}, {}, {}
        for workers in worker_counts:
            config = ml_collections.ConfigDict(dict(
                dataset=DATASET, data_dir=data_dir, image_size=image_size,
                batch_size=batch_size, eval_batch_size=batch_size, num_workers=workers))
            for variant, make in (("before", before_loader), ("after", after_loader)):
                children = set(multiprocessing.active_children())
                iterator = iter(make(data_dir, config))
                batch = next(iterator)  # starts the workers; not timed
                iterators[(variant, workers)] = iterator
                workers_of[(variant, workers)] = [
                    p.pid for p in set(multiprocessing.active_children()) - children]
                bytes_per_example[variant] = sum(
                    np.asarray(v).nbytes for v in batch.values()) / batch_size

        # CPU seconds and batches of each variant, over the timed runs and the warm-up.
        cpu = {key: [0.0, 0] for key in iterators}

        def draw(key):
            def run():
                start = cpu_seconds(workers_of[key])
                for _ in range(batches_per_run):
                    next(iterators[key])
                cpu[key][0] += cpu_seconds(workers_of[key]) - start
                cpu[key][1] += batches_per_run
            return run

        seconds = common.time_interleaved({key: draw(key) for key in iterators}, runs)
        del iterators

    rows = [{"variant": variant, "workers": workers,
             "examples_per_second": batches_per_run * batch_size / seconds[(variant, workers)],
             # Load-independent: examples per second of one busy core.
             "examples_per_cpu_second": cpu[(variant, workers)][1] * batch_size
             / cpu[(variant, workers)][0],
             "bytes_per_example_to_devices": bytes_per_example[variant]}
            for (variant, workers) in seconds]
    rate = {(row["variant"], row["workers"]): row["examples_per_second"] for row in rows}
    speedup = {f"{workers}_workers": rate[("after", workers)] / rate[("before", workers)]
               for workers in worker_counts}
    common.print_table(rows, ["variant", "workers", "examples_per_second",
                              "examples_per_cpu_second", "bytes_per_example_to_devices"])
    print("after / before examples/s:", {k: round(v, 3) for k, v in speedup.items()})
    path = common.write_json(args.out, NAME, {
        "smoke": smoke,
        "load_average_1_5_15_min": {"start": load_at_start, "end": os.getloadavg()},
        "setup": {"image_size": image_size, "batch_size": batch_size,
                  "train_examples": len(jpeg_bytes), "batches_per_run": batches_per_run,
                  "runs": runs, "mean_jpeg_bytes": float(np.mean(jpeg_bytes)),
                  "mean_height": float(np.mean([s[0] for s in shapes])),
                  "mean_width": float(np.mean([s[1] for s in shapes]))},
        "rows": rows,
        "after_over_before_examples_per_second": speedup,
    })
    print("wrote", path)


if __name__ == "__main__":
    main()
