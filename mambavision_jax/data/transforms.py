"""Host-side geometric/colour transforms with timm semantics, on PIL images, driven by a numpy ``Generator``.

All images are PIL RGB; arrays are uint8 or float32 HWC. ``rng`` is always a ``np.random.Generator`` so a whole
per-example augmentation chain is reproducible from its seed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

PIL_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
RANDOM_INTERP = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def pick_interpolation(name: str, rng: np.random.Generator | None = None):
    """PIL resample filter for ``name``; 'random' draws bilinear or bicubic from ``rng`` (timm 'random')."""
    if name == "random":
        if rng is None:
            raise ValueError("interpolation 'random' needs an rng")
        return RANDOM_INTERP[int(rng.integers(2))]
    try:
        return PIL_INTERP[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; valid: {sorted(PIL_INTERP) + ['random']}") from None


def random_resized_crop_params(rng: np.random.Generator, width: int, height: int, scale, ratio):
    """timm ``RandomResizedCropAndInterpolation.get_params``: returns (top, left, crop_h, crop_w).

    10 attempts of area ~ U(scale)*W*H and log-uniform aspect in ``ratio``; fallback is a central crop with the
    aspect clamped into ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    rng: np.random.Generator,
    size: int,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    interpolation: str = "bicubic",
) -> Image.Image:
    """Crop a random region (``random_resized_crop_params``) and resize it to (size, size)."""
    top, left, h, w = random_resized_crop_params(rng, img.width, img.height, scale, ratio)
    resample = pick_interpolation(interpolation, rng)
    # crop first, as torchvision F.resized_crop: resize(box=...) would let the filter read pixels outside the box
    return img.crop((left, top, left + w, top + h)).resize((size, size), resample)


def eval_resize_crop(
    img: Image.Image, size: int, crop_pct: float = 1.0, crop_mode: str = "center", interpolation: str = "bicubic"
) -> Image.Image:
    """timm eval transform geometry. scale_size = floor(size / crop_pct);
    'center': resize the short side to scale_size (aspect kept, long side int(scale_size * long / short)),
    'squash': resize both sides to scale_size; then center-crop (size, size) (torchvision rounding)."""
    scale_size = int(math.floor(size / crop_pct))
    resample = pick_interpolation(interpolation if interpolation != "random" else "bicubic")
    w, h = img.size
    if crop_mode == "squash":
        new_w = new_h = scale_size
    elif crop_mode == "center":
        if w <= h:
            new_w, new_h = scale_size, int(scale_size * h / w)
        else:
            new_w, new_h = int(scale_size * w / h), scale_size
    else:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; valid: 'center', 'squash'")
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    return center_crop(img, size)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop: top = round((H - size) / 2); pads with zeros if the image is smaller."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """torchvision ColorJitter(brightness=s, contrast=s, saturation=s) (timm uses a float as all three):
    factors ~ U(max(0, 1-s), 1+s), applied in random order."""
    if strength <= 0:
        return img
    ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in rng.permutation(3):
        factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        img = ops[k](img).enhance(factor)
    return img


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HWC (0..255) -> float32 HWC, (x/255 - mean) / std per channel."""
    mean255 = np.asarray(mean, np.float32) * 255.0
    inv_std255 = 1.0 / (np.asarray(std, np.float32) * 255.0)
    return (np.asarray(image, np.float32) - mean255) * inv_std255
