"""TFDS source (``imagenet2012``) through ``tfds.data_source``: array_record random access, no TensorFlow.

Records are {'image': uint8 (H, W, 3) (or encoded bytes if a decoder was skipped), 'label': int, 'file_name'}.
"""

from __future__ import annotations

import numpy as np

from .decode import to_pil_rgb
from .errors import DatasetNotPreparedError

_HOW_TO_PREPARE = (
    "The data must be prepared as TFDS array_record files under data_dir (random access needs array_record; "
    "TFRECORD is not supported). Preparing ImageNet needs TensorFlow: `pip install tensorflow-cpu` then "
    "`tfds build imagenet2012 --manual_dir=<dir with ILSVRC2012_img_{train,val}.tar> --data_dir=<data_dir> "
    "--file_format=array_record`; or point config.data.data_dir at array_record data prepared elsewhere "
    "(<data_dir>/imagenet2012/<version>/...). Alternatively use config.data.name='folder' on an image folder."
)


class TfdsSource:
    """Random-access TFDS split. ``load(i) -> (PIL RGB image, int label)``."""

    skip_augmentation = False

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            self.num_classes = None
            try:
                self.num_classes = int(self._ds.dataset_info.features["label"].num_classes)
            except Exception:
                pass
        except Exception as e:  # not prepared, wrong format, wrong split name, ...
            raise DatasetNotPreparedError(
                f"could not open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r}: "
                f"{type(e).__name__}: {str(e)[:600]}\n{_HOW_TO_PREPARE}"
            ) from e
        if self.num_classes is None and name == "imagenet2012":
            self.num_classes = 1000

    def __len__(self) -> int:
        return len(self._ds)

    def load(self, index: int):
        rec = self._ds[int(index)]
        return to_pil_rgb(rec["image"]), int(np.asarray(rec["label"]))
