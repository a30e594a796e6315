"""Reading the data-related parts of the training config (see docs/INTERFACES.md).

One place resolves: batch sizes (per host / global), normalisation mean/std, and eval crop settings, with the
fallback chain  config.eval_preprocess  ->  mambavision_jax.pretrained_cfg(config.model_name)  ->  ImageNet defaults.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "random")


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    """``cfg.name`` for a ConfigDict / dict / object, ``default`` when absent or None."""
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        val = cfg.get(name, default)
    else:
        try:
            val = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
        except (AttributeError, KeyError):
            val = default
    return default if val is None else val


def image_size(config) -> int:
    size = cfg_get(config.data, "image_size")
    if size is None or int(size) <= 0:
        raise ValueError(f"config.data.image_size must be a positive int, got {size!r}")
    return int(size)


def grad_accum_steps(config) -> int:
    """``config.grad_accum_steps`` (default 1): the micro-batches of ``batch_size_per_device`` rows that each device
    runs, one after another, for one update."""
    steps = cfg_get(config, "grad_accum_steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"config.grad_accum_steps must be a positive int, got {steps!r}")
    return steps


def local_batch_size(config, *, eval: bool = False) -> int:
    """Examples per host per step: ``<per_device> * jax.local_device_count()``, times ``grad_accum_steps`` for a
    train step (an update)."""
    key = "eval_batch_size_per_device" if eval else "batch_size_per_device"
    per_device = cfg_get(config, key)
    if per_device is None and eval:
        per_device = cfg_get(config, "batch_size_per_device")
    if per_device is None or int(per_device) <= 0:
        raise ValueError(f"config.{key} must be a positive int, got {per_device!r}")
    return int(per_device) * jax.local_device_count() * (1 if eval else grad_accum_steps(config))


def global_batch_size(config, *, eval: bool = False, process_count: int | None = None) -> int:
    """Examples per step over all hosts. With ``process_count`` given: local batch * process_count
    (every host holds the same number of devices); otherwise ``<per_device> * jax.device_count()``."""
    if process_count is not None:
        return local_batch_size(config, eval=eval) * int(process_count)
    return local_batch_size(config, eval=eval) // jax.local_device_count() * jax.device_count()


def _pretrained_cfg(model_name: str | None) -> dict | None:
    """``mambavision_jax.pretrained_cfg(model_name)`` if that function exists and knows the name, else None."""
    if not model_name:
        return None
    try:
        import mambavision_jax as mvj

        fn = getattr(mvj, "pretrained_cfg", None)
        if fn is None:
            log.info("mambavision_jax.pretrained_cfg not available; using ImageNet defaults for preprocessing")
            return None
        return dict(fn(model_name))
    except Exception as e:  # unknown model name, or the model package is mid-edit
        log.info("pretrained_cfg(%r) unavailable (%s); using ImageNet defaults for preprocessing", model_name, e)
        return None


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Normalisation and eval-crop settings. mean/std are in [0,1] units (multiply by 255 for uint8 pixels)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 1.0
    crop_mode: str = "center"
    interpolation: str = "bicubic"


def preprocess_settings(config) -> Preprocess:
    """Resolve mean/std/crop settings: explicit ``config.eval_preprocess`` fields win, then
    ``pretrained_cfg(config.model_name)``, then defaults (ImageNet mean/std, crop_pct 1.0, center, bicubic)."""
    pre = cfg_get(config, "eval_preprocess")
    pcfg = _pretrained_cfg(cfg_get(config, "model_name")) or {}
    defaults = Preprocess()

    def pick(name):
        val = cfg_get(pre, name)
        if val is None:
            val = pcfg.get(name)
        return getattr(defaults, name) if val is None else val

    out = Preprocess(
        mean=tuple(float(x) for x in pick("mean")),
        std=tuple(float(x) for x in pick("std")),
        crop_pct=float(pick("crop_pct")),
        crop_mode=str(pick("crop_mode")),
        interpolation=str(pick("interpolation")),
    )
    if out.crop_mode not in CROP_MODES:
        raise ValueError(f"eval crop_mode must be one of {CROP_MODES}, got {out.crop_mode!r}")
    if out.interpolation not in INTERPOLATIONS:
        raise ValueError(f"eval interpolation must be one of {INTERPOLATIONS}, got {out.interpolation!r}")
    if out.crop_pct <= 0:
        raise ValueError(f"eval crop_pct must be > 0, got {out.crop_pct}")
    if len(out.mean) != 3 or len(out.std) != 3:
        raise ValueError(f"mean/std must have 3 entries, got {out.mean} / {out.std}")
    return out
