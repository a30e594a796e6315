"""timm RandomErasing on a normalised float32 HWC array (applied after normalisation)."""

from __future__ import annotations

import math

import numpy as np


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    prob: float = 0.25,
    mode: str = "pixel",
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """With probability ``prob`` erase one rectangle of area ~U(min_area, max_area)*H*W and log-uniform aspect in
    [min_aspect, 1/min_aspect] (10 attempts, as timm). ``image``: float32 (H, W, C), modified in place and returned.

    mode 'pixel': per-pixel N(0,1) noise; 'rand': one N(0,1) colour per channel; 'const': zeros.
    """
    if prob <= 0 or rng.random() > prob:
        return image
    h_img, w_img, chan = image.shape
    area = h_img * w_img
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < w_img and h < h_img:
            top = int(rng.integers(0, h_img - h + 1))
            left = int(rng.integers(0, w_img - w + 1))
            if mode == "pixel":
                fill = rng.standard_normal((h, w, chan), dtype=np.float32)
            elif mode == "rand":
                fill = rng.standard_normal((1, 1, chan), dtype=np.float32)
            elif mode == "const":
                fill = np.float32(0.0)
            else:
                raise ValueError(f"unknown random-erasing mode {mode!r}; valid: 'pixel', 'rand', 'const'")
            image[top : top + h, left : left + w, :] = fill
            break
    return image
