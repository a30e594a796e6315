"""scikit-learn ``load_digits`` (1797 8x8 grayscale, 10 classes, shipped in the wheel): a tiny real dataset.

Deterministic stratified 80/20 split (random_state 0): split 'train' -> 1437 examples, any of
'test'/'val'/'validation'/'eval' -> 360. Pixels 0..16 are scaled to uint8 0..255 and upsampled (bicubic) to an
RGB (image_size, image_size, 3) image before the usual transforms.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

HELD_OUT_SPLITS = ("test", "val", "validation", "eval")


@functools.lru_cache(maxsize=1)
def _digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
    return images, d.target.astype(np.int32), np.sort(tr), np.sort(te)


class DigitsSource:
    """``load(i) -> (uint8 (S, S, 3), label)``; ``indices`` are rows of the full 1797-image array."""

    skip_augmentation = False
    num_classes = 10

    def __init__(self, split: str, image_size: int):
        images, labels, tr, te = _digits_split()
        if split == "train":
            self.indices = tr
        elif split in HELD_OUT_SPLITS:
            self.indices = te
        else:  # TFDS-style slices ('train[:10%]') included: they would otherwise be read as the whole split
            raise ValueError(f"digits split must be 'train' or one of {HELD_OUT_SPLITS} (no slices), got {split!r}")
        self._images, self._labels, self.image_size = images, labels, int(image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        row = self.indices[int(index)]
        img = Image.fromarray(self._images[row], mode="L")
        img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC).convert("RGB")
        return np.asarray(img), int(self._labels[row])
