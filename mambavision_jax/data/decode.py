"""Turning a stored image (uint8 array or encoded bytes) into an RGB ``PIL.Image``."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_pil_rgb(image) -> Image.Image:
    """Accepts a PIL image, a uint8 array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or encoded bytes
    (JPEG/PNG/...). Returns an RGB PIL image (fully loaded). Raises on undecodable input."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray, memoryview)) or (isinstance(image, np.ndarray) and image.dtype == object):
        data = image.item() if isinstance(image, np.ndarray) else image
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image array, got dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"expected an (H, W[, C]) image array, got shape {arr.shape}")
        img = Image.fromarray(arr)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_image_file(path: str) -> Image.Image:
    """Open and fully decode an image file to RGB. Raises (OSError, SyntaxError, ValueError, ...) if corrupt."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img
