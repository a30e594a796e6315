"""Synthetic source for throughput benchmarks: random uint8 (S, S, 3) images and random labels, deterministic per
index, generated directly at the target size. Images come from a fixed pool of ``POOL`` random images
(image of index i = pool[i % POOL]; label of i drawn from rng(seed, split, i)), pre-normalised once, so the
pipeline's per-example cost is a lookup (``load_normalized``); no augmentation is applied."""
from __future__ import annotations

import numpy as np

from .transforms import normalize

POOL = 64


class SyntheticSource:
    skip_augmentation = True

    def __init__(self, split: str, image_size: int, num_examples: int, num_classes: int, seed: int = 0):
        if num_examples <= 0:
            raise ValueError(f"config.data.synthetic_examples must be positive, got {num_examples}")
        self.image_size, self.n, self.num_classes = int(image_size), int(num_examples), int(num_classes)
        self._split_tag = 0 if split.startswith("train") else 1
        self._seed = int(seed) % (2**63)
        rng = np.random.default_rng([self._seed, self._split_tag, 2**32])
        s = self.image_size
        self._pool = rng.integers(0, 256, (min(POOL, self.n), s, s, 3), dtype=np.uint8)
        self._pool_norm: dict = {}

    def __len__(self) -> int:
        return self.n

    def label(self, index: int) -> int:
        return int(np.random.default_rng([self._seed, self._split_tag, int(index)]).integers(self.num_classes))

    def load(self, index: int):
        """-> (uint8 (S, S, 3), label)."""
        return self._pool[int(index) % len(self._pool)], self.label(index)

    def load_normalized(self, index: int, mean, std):
        """-> (float32 (S, S, 3) = normalize(load(index)[0], mean, std), label); read-only array."""
        key = (tuple(mean), tuple(std))
        pool = self._pool_norm.get(key)
        if pool is None:
            pool = normalize(self._pool, mean, std)
            pool.flags.writeable = False
            self._pool_norm[key] = pool
        return pool[int(index) % len(pool)], self.label(index)
