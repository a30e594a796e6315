"""Synthetic source for throughput benchmarks: random uint8 (S, S, 3) images and random labels, deterministic per
index, generated directly at the target size. Images come from a fixed pool of ``POOL`` random images
(image of index i = pool[i % POOL]; label of i = hash(seed, split, i) % num_classes), so the pipeline builds a
batch with one uint8 gather (``load_batch``, no grain, no augmentation)."""

from __future__ import annotations

import numpy as np

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

    def __len__(self) -> int:
        return self.n

    def labels(self, indices) -> np.ndarray:
        """int32 labels of ``indices`` (splitmix64 hash of (seed, split, index)), vectorised."""
        with np.errstate(over="ignore"):
            z = np.asarray(indices, np.uint64) + np.uint64(self._seed * 2 + self._split_tag) * np.uint64(
                0x9E3779B97F4A7C15
            )
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        return (z % np.uint64(self.num_classes)).astype(np.int32)

    def label(self, index: int) -> int:
        return int(self.labels([index])[0])

    def load(self, index: int):
        """-> (uint8 (S, S, 3), label)."""
        return self._pool[int(index) % len(self._pool)], self.label(index)

    def load_batch(self, indices):
        """-> (uint8 (B, S, S, 3), int32 (B,)): ``load(i)`` for every index, in one gather."""
        indices = np.asarray(indices, np.int64)
        return self._pool[indices % len(self._pool)], self.labels(indices)
