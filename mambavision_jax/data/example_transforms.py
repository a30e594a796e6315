"""Per-example train/eval chains on the host, ending in uint8 (S, S, 3): normalisation (and random erasing, which
timm applies in normalised space) run on the device inside the jitted step (``device_preprocess``), as timm's
``PrefetchLoader`` does.

Train (timm ``transforms_imagenet_train`` order): RandomResizedCrop -> hflip -> RandAugment (or ColorJitter when
rand_augment is '') -> [normalise -> RandomErasing: on the device; the host draws the erasing rectangle].
Eval: resize (crop_mode/crop_pct, bicubic) -> center crop -> [normalise: on the device].
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .config_utils import Preprocess, cfg_get, image_size, preprocess_settings
from .decode import to_pil_rgb
from .device_preprocess import ERASE_MODES
from .rand_augment import RandAugment
from .random_erasing import erasing_box
from .transforms import color_jitter, eval_resize_crop, normalize, random_resized_crop


class TrainTransform:
    def __init__(self, config, preprocess: Preprocess | None = None):
        aug = cfg_get(config, "aug", {})
        self.pre = preprocess or preprocess_settings(config)
        self.size = image_size(config)
        self.scale = tuple(cfg_get(aug, "scale", (0.08, 1.0)))
        self.ratio = tuple(cfg_get(aug, "ratio", (3 / 4, 4 / 3)))
        self.hflip = float(cfg_get(aug, "hflip", 0.5))
        self.interpolation = str(cfg_get(aug, "interpolation", "bicubic"))
        ra = str(cfg_get(aug, "rand_augment", "") or "")
        self.rand_augment = RandAugment(ra, self.pre.mean, self.interpolation) if ra else None
        self.color_jitter = 0.0 if ra else float(cfg_get(aug, "color_jitter", 0.0) or 0.0)
        self.reprob = float(cfg_get(aug, "reprob", 0.0))
        self.remode = str(cfg_get(aug, "remode", "pixel"))
        if self.remode not in ERASE_MODES:
            raise ValueError(
                f"config.aug.remode={self.remode!r} is not a random-erasing mode; valid: {', '.join(ERASE_MODES)}"
            )

    def __call__(self, image, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """-> (uint8 (S, S, 3) augmented image, int32 (4,) erasing rectangle (top, left, h, w), zeros for none)."""
        img = to_pil_rgb(image)
        img = random_resized_crop(img, rng, self.size, self.scale, self.ratio, self.interpolation)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        elif self.color_jitter > 0:
            img = color_jitter(img, rng, self.color_jitter)
        return np.asarray(img, np.uint8), erasing_box(rng, self.size, self.size, self.reprob)


class EvalTransform:
    def __init__(self, config, preprocess: Preprocess | None = None):
        self.pre = preprocess or preprocess_settings(config)
        self.size = image_size(config)

    def __call__(self, image, rng=None) -> np.ndarray:
        """-> uint8 (S, S, 3)."""
        img = to_pil_rgb(image)
        img = eval_resize_crop(img, self.size, self.pre.crop_pct, self.pre.crop_mode, self.pre.interpolation)
        return np.asarray(img, np.uint8)


def preprocess_image(image, model_name: str) -> np.ndarray:
    """One image (PIL, uint8 HWC array or encoded bytes) -> the normalised (S, S, 3) float32 NHWC input that the
    official evaluation of ``model_name`` uses: its pretrained_cfg resize by crop_pct (``center`` or ``squash``),
    bicubic, centre crop to the input size, mean/std. Add the batch axis with ``x[None]``."""
    from mambavision_jax.models.registry import pretrained_cfg

    cfg = pretrained_cfg(model_name)
    img = eval_resize_crop(
        to_pil_rgb(image), cfg["input_size"][1], cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"]
    )
    return normalize(np.asarray(img), cfg["mean"], cfg["std"])
