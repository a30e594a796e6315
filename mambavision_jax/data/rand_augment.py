"""timm RandAugment (``rand-m9-mstd0.5-inc1`` style strings) on PIL images with a numpy Generator.

Port of timm 1.0 ``auto_augment.py`` (rand_augment_transform / AugmentOp / RandAugment): each of ``num_ops`` ops is
drawn uniformly *with replacement* from the op list, applied with probability ``prob`` (0.5), with magnitude
~ N(m, mstd) clipped to [0, mmax or 10]. Geometric ops fill with the dataset mean (uint8) and resample with the
train interpolation (bilinear/bicubic at random for 'random').
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageOps, ImageEnhance

from .transforms import RANDOM_INTERP, PIL_INTERP

LEVEL_DENOM = 10.0

RAND_TRANSFORMS = [
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
]
# timm _RAND_INCREASING_TRANSFORMS (Cutout is done by random erasing instead).
RAND_INCREASING_TRANSFORMS = [
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
]


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """Parsed RandAugment string. ``ops`` is the op-name list the ops are drawn from."""

    num_ops: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float | None = None
    prob: float = 0.5
    increasing: bool = False
    ops: tuple[str, ...] = tuple(RAND_TRANSFORMS)


def parse_rand_augment(spec: str) -> RandAugmentConfig:
    """Parse a timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1' -> num_ops 2, magnitude 9, mstd 0.5,
    increasing ops. Keys: m (magnitude), n (num ops), p (op prob), mstd (>100 = uniform), mmax, inc.
    Unlike timm (``bool('0') is True``), 'inc0' means *not* increasing."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment string must start with 'rand', got {spec!r}")
    kw: dict = {}
    for c in parts[1:]:
        cs = re.split(r"(\d.*)", c)
        if len(cs) < 2:  # timm skips these, and reads 't...' as a weighted op set: neither is done here
            raise ValueError(
                f"RandAugment section {c!r} in {spec!r} is not supported; sections: m, n, p, mstd, mmax, inc "
                "followed by a number"
            )
        key, val = cs[:2]
        if key == "mstd":
            mstd = float(val)
            kw["magnitude_std"] = float("inf") if mstd > 100 else mstd
        elif key == "mmax":
            kw["magnitude_max"] = float(int(val))
        elif key == "inc":
            kw["increasing"] = bool(int(float(val)))
        elif key == "m":
            kw["magnitude"] = float(int(val))
        elif key == "n":
            kw["num_ops"] = int(val)
        elif key == "p":
            kw["prob"] = float(val)
        else:
            raise ValueError(f"unknown RandAugment key {key!r} in {spec!r}")
    inc = kw.get("increasing", False)
    return RandAugmentConfig(**kw, ops=tuple(RAND_INCREASING_TRANSFORMS if inc else RAND_TRANSFORMS))


# ---- level -> argument (timm LEVEL_TO_ARG), with random negation drawn from rng ----


def _neg(v, rng):
    return -v if rng.random() > 0.5 else v


def _level_args(name, level, rng, translate_pct=0.45):
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (_neg(level / LEVEL_DENOM * 30.0, rng),)
    if name == "Posterize":
        return (int(level / LEVEL_DENOM * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int(level / LEVEL_DENOM * 4),)
    if name == "Solarize":
        return (min(256, int(level / LEVEL_DENOM * 256)),)
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(level / LEVEL_DENOM * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(level / LEVEL_DENOM * 110)),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level / LEVEL_DENOM * 1.8 + 0.1,)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (max(0.1, 1.0 + _neg(level / LEVEL_DENOM * 0.9, rng)),)
    if name in ("ShearX", "ShearY"):
        return (_neg(level / LEVEL_DENOM * 0.3, rng),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (_neg(level / LEVEL_DENOM * translate_pct, rng),)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)


def _apply_op(name, img: Image.Image, args, fill, resample) -> Image.Image:
    base = name.replace("Increasing", "")
    if base == "AutoContrast":
        return ImageOps.autocontrast(img)
    if base == "Equalize":
        return ImageOps.equalize(img)
    if base == "Invert":
        return ImageOps.invert(img)
    if base == "Rotate":
        return img.rotate(args[0], resample=resample, fillcolor=fill)
    if base == "Posterize":
        if args[0] >= 8:
            return img
        if args[0] <= 0:  # keep 0 bits = black; old PIL did this, Pillow >= 11 rejects bits=0
            return Image.new(img.mode, img.size)
        return ImageOps.posterize(img, args[0])
    if base == "Solarize":
        return ImageOps.solarize(img, args[0])
    if base == "SolarizeAdd":
        return _solarize_add(img, args[0])
    if base == "Color":
        return ImageEnhance.Color(img).enhance(args[0])
    if base == "Contrast":
        return ImageEnhance.Contrast(img).enhance(args[0])
    if base == "Brightness":
        return ImageEnhance.Brightness(img).enhance(args[0])
    if base == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(args[0])
    if base == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, args[0], 0, 0, 1, 0), resample=resample, fillcolor=fill)
    if base == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, args[0], 1, 0), resample=resample, fillcolor=fill)
    if base == "TranslateXRel":
        px = args[0] * img.size[0]
        return img.transform(img.size, Image.AFFINE, (1, 0, px, 0, 1, 0), resample=resample, fillcolor=fill)
    if base == "TranslateYRel":
        px = args[0] * img.size[1]
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, px), resample=resample, fillcolor=fill)
    raise ValueError(f"unknown RandAugment op {name!r}")


class RandAugment:
    """Callable ``(PIL RGB image, rng) -> PIL RGB image``.

    Args:
      spec: timm string, e.g. 'rand-m9-mstd0.5-inc1'.
      mean: dataset mean in [0,1]; fill colour = round(255*mean) (timm ``img_mean``).
      interpolation: 'bicubic' | 'bilinear' | 'random' (random choice per op, timm default for 'random').
    """

    def __init__(self, spec: str, mean=(0.485, 0.456, 0.406), interpolation: str = "random"):
        self.config = parse_rand_augment(spec)
        self.fill = tuple(min(255, int(round(255 * m))) for m in mean)
        self.interpolation = interpolation

    def _magnitude(self, rng) -> float:
        c = self.config
        m = c.magnitude
        if c.magnitude_std == float("inf"):
            m = rng.uniform(0, m)
        elif c.magnitude_std > 0:
            m = rng.normal(m, c.magnitude_std)
        return max(0.0, min(m, c.magnitude_max or LEVEL_DENOM))

    def apply_op(self, name: str, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Apply one named op unconditionally (magnitude noise and sign still drawn from rng)."""
        args = _level_args(name, self._magnitude(rng), rng)
        if self.interpolation == "random":
            resample = RANDOM_INTERP[int(rng.integers(2))]
        else:
            resample = PIL_INTERP.get(self.interpolation, Image.Resampling.BICUBIC)
        return _apply_op(name, img, args, self.fill, resample)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        c = self.config
        for k in rng.integers(0, len(c.ops), size=c.num_ops):
            if c.prob < 1.0 and rng.random() > c.prob:
                continue
            img = self.apply_op(c.ops[k], img, rng)
        return img
