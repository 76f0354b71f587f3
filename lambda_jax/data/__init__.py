"""Input pipelines (TFDS array_record + grain), device prefetching and the built-in digits."""

from lambda_jax.data.input_pipeline import DatasetInfo, EvalBatches, create_datasets
from lambda_jax.data.prefetch import DevicePrefetcher

__all__ = ["DatasetInfo", "DevicePrefetcher", "EvalBatches", "create_datasets"]
