"""``build_source(config, split)``: the one place that maps ``config.data.name`` to a source object.

Every source has ``__len__``, ``num_classes``, ``skip_augmentation`` and ``load(index) -> (image, int label)``
where image is a PIL RGB image or a uint8 (H, W, 3) array. The folder source, whose files may be corrupt, also has
``load_or_none(index)``, which the eval pass reads: image None for a corrupt file skipped, no substitute.
"""

from __future__ import annotations

import os

from .config_utils import cfg_get, image_size
from .errors import UnknownDatasetError
from .source_digits import DigitsSource
from .source_folder import FolderSource
from .source_synthetic import SyntheticSource
from .source_tfds import TfdsSource

DATASETS = ("imagenet2012", "folder", "digits", "synthetic")


def build_source(config, split: str):
    name = cfg_get(config.data, "name")
    size = image_size(config)
    data_dir = cfg_get(config.data, "data_dir")
    if data_dir:  # a '~' in --config.data.data_dir=~/... reaches us unexpanded: shells expand it at a word's start only
        data_dir = os.path.expanduser(data_dir)
    if name == "imagenet2012":
        src = TfdsSource(name, split, data_dir)
    elif name == "folder":
        src = FolderSource(data_dir, split, cfg_get(config.data, "on_corrupt", "raise"))
    elif name == "digits":
        src = DigitsSource(split, size)
    elif name == "synthetic":
        src = SyntheticSource(
            split,
            size,
            int(cfg_get(config.data, "synthetic_examples", 1024)),
            int(cfg_get(config.data, "num_classes", 1000)),
            int(cfg_get(config, "seed", 0)),
        )
    else:
        raise UnknownDatasetError(f"unknown config.data.name {name!r}; valid: {', '.join(DATASETS)}")
    want = cfg_get(config.data, "num_classes")
    if want is not None and src.num_classes is not None and src.num_classes > int(want):
        raise ValueError(f"dataset {name!r} has {src.num_classes} classes but config.data.num_classes={want}")
    return src
