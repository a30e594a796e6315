"""Input pipelines for mambavision_jax (API in docs/INTERFACES.md, "Data").

Host side (numpy/PIL/grain): ``build_train_iterator``, ``build_eval_iterator``, ``num_examples``,
``steps_per_epoch``, ``preprocess_image`` (one image as the official evaluation sees it). Device side (pure JAX,
jit-able): ``batch_images`` (a batch's uint8 images normalised and randomly erased), ``mixup_cutmix``,
``smoothed_one_hot``.
"""

from .config_utils import IMAGENET_MEAN, IMAGENET_STD, Preprocess, preprocess_settings
from .device_preprocess import batch_images
from .example_transforms import preprocess_image
from .errors import CorruptImageError, DataError, DatasetNotFoundError, DatasetNotPreparedError, UnknownDatasetError
from .mixup import mixup_cutmix, mixup_cutmix_with_lam, smoothed_one_hot
from .pipeline import (
    DataIterator,
    build_eval_iterator,
    build_train_iterator,
    num_examples,
    skipped_files,
    steps_per_epoch,
    worker_process_count,
)
from .sources import DATASETS, build_source

__all__ = [
    "build_train_iterator",
    "build_eval_iterator",
    "num_examples",
    "steps_per_epoch",
    "worker_process_count",
    "batch_images",
    "mixup_cutmix",
    "mixup_cutmix_with_lam",
    "smoothed_one_hot",
    "skipped_files",
    "build_source",
    "preprocess_image",
    "DATASETS",
    "DataIterator",
    "preprocess_settings",
    "Preprocess",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "UnknownDatasetError",
    "DatasetNotFoundError",
    "DatasetNotPreparedError",
    "CorruptImageError",
]
