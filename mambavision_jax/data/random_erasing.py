"""timm RandomErasing, host half: where to erase. The fill (in normalised space) happens on the device, in the
jitted step (:func:`mambavision_jax.data.device_preprocess.erase_images`)."""

from __future__ import annotations

import math

import numpy as np

NO_BOX = (0, 0, 0, 0)


def erasing_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    prob: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """int32 (4,) (top, left, h, w) of the rectangle timm's RandomErasing would erase in a (height, width) image, or
    all zeros for none: with probability ``prob``, area ~U(min_area, max_area)·height·width and log-uniform aspect
    in [min_aspect, 1/min_aspect], 10 attempts to fit, as timm."""
    if prob <= 0 or rng.random() > prob:
        return np.asarray(NO_BOX, np.int32)
    area = height * width
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return np.asarray((top, left, h, w), np.int32)
    return np.asarray(NO_BOX, np.int32)
