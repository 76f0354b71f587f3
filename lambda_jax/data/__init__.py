"""Input pipelines (TFDS array_record + grain) and the built-in digits data set."""

from lambda_jax.data.input_pipeline import DatasetInfo, create_datasets

__all__ = ["DatasetInfo", "create_datasets"]
