"""Data for training and evaluation: random-access sources, per-example transforms, grain pipelines."""

from cbam_jax.data.pipeline import eval_batches, eval_preprocessing, make_source, num_eval_batches, train_dataset
from cbam_jax.data.sources import ArraySource, ImageFolderSource, digits_source, tfds_source

__all__ = ["ArraySource", "ImageFolderSource", "digits_source", "eval_batches", "eval_preprocessing",
           "make_source", "num_eval_batches", "tfds_source", "train_dataset"]
