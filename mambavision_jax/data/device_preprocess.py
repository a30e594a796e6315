"""Device side of the input pipeline: the jitted train and eval steps turn the host's uint8 batches into the
model's normalised float32 input and apply random erasing there (as timm's ``PrefetchLoader`` does on the GPU), so
the host ships and gathers 1 byte a pixel instead of 4 and never runs the per-pixel float work.

Batches: ``"image"`` uint8 (B, H, W, 3) 0..255, or a float array already normalised (used as it is); optional
``"erase"`` int32 (B, 4): per image the rectangle (top, left, height, width) to erase, height 0 for none (drawn on
the host by :func:`mambavision_jax.data.random_erasing.erasing_box`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ERASE_MODES = ("pixel", "rand", "const")


def normalize_images(images: jax.Array, mean, std) -> jax.Array:
    """uint8 (B, H, W, C) 0..255 -> float32 (x/255 - mean) / std per channel (``transforms.normalize`` on device)."""
    mean255 = jnp.asarray(mean, jnp.float32) * 255.0
    inv_std255 = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
    return (images.astype(jnp.float32) - mean255) * inv_std255


def erase_images(images: jax.Array, boxes: jax.Array, rng: jax.Array, mode: str) -> jax.Array:
    """Fills each image's rectangle ``boxes[b] = (top, left, height, width)`` (height 0: untouched) in normalised
    space, as timm's RandomErasing: mode 'pixel' with per-pixel N(0, 1) noise, 'rand' with one N(0, 1) colour per
    channel, 'const' with zeros. ``images``: float (B, H, W, C); ``boxes``: int (B, 4)."""
    if mode not in ERASE_MODES:
        raise ValueError(f"unknown random-erasing mode {mode!r}; valid: {', '.join(map(repr, ERASE_MODES))}")
    b, h, w, c = images.shape
    top, left, height, width = (boxes[:, i, None] for i in range(4))
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_rows = (rows >= top) & (rows < top + height)  # (B, H)
    in_cols = (cols >= left) & (cols < left + width)  # (B, W)
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]
    if mode == "pixel":
        fill = jax.random.normal(rng, images.shape, images.dtype)
    elif mode == "rand":
        fill = jax.random.normal(rng, (b, 1, 1, c), images.dtype)
    else:
        fill = jnp.zeros((), images.dtype)
    return jnp.where(inside, fill, images)


def batch_images(batch: dict, mean, std, erase_mode: str = "pixel", rng: jax.Array | None = None) -> jax.Array:
    """The model input of a batch: ``batch["image"]`` normalised if uint8 (kept if float), then erased where
    ``batch["erase"]`` says, with noise from ``rng`` (see the module docstring)."""
    images = batch["image"]
    if images.dtype == jnp.uint8:
        images = normalize_images(images, mean, std)
    elif not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"batch['image'] must be uint8 (0..255) or float (normalised), got {images.dtype}")
    if "erase" in batch:
        if rng is None:
            raise ValueError("batch has random-erasing rectangles ('erase') but no rng was given for the fill")
        images = erase_images(images, batch["erase"], rng, erase_mode)
    return images
