"""timm ``Mixup`` (mode 'batch', correct_lam=True) and label smoothing in pure JAX (jit-able, on device).

images: (B, H, W, C) any float dtype (NHWC); labels: int (B,); soft targets: float32 (B, num_classes).
The partner of example i is example B-1-i (``flip(0)``, as timm). The cutmix box is built with iota masks, so
shapes are static under jit. Hyper-parameters (alphas, prob, ...) must be Python numbers (static).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_one_hot(labels, num_classes: int, smoothing: float = 0.0):
    """(B,) int -> (B, num_classes) float32 with off = smoothing/num_classes, on = 1 - smoothing + off."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on, off).astype(jnp.float32)


def _cutmix_mask(key, lam, height: int, width: int):
    """timm ``rand_bbox`` (margin 0): cut = int(dim*sqrt(1-lam)), centre ~ U{0..dim-1}, box clipped to the image.
    Returns (mask (H, W) bool, True inside the box; corrected lam = 1 - box_area / (H*W))."""
    ky, kx = jax.random.split(key)
    ratio = jnp.sqrt(jnp.maximum(1.0 - lam, 0.0))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    yl = jnp.clip(cy - cut_h // 2, 0, height)
    yh = jnp.clip(cy + cut_h // 2, 0, height)
    xl = jnp.clip(cx - cut_w // 2, 0, width)
    xh = jnp.clip(cx + cut_w // 2, 0, width)
    ys = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    xs = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    mask = (ys >= yl) & (ys < yh) & (xs >= xl) & (xs < xh)
    area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
    return mask, 1.0 - area / float(height * width)


def mixup_cutmix_with_lam(
    rng,
    images,
    labels,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
):
    """Like ``mixup_cutmix`` but also returns (lam, use_cutmix) (scalars; lam = 1 when not applied)."""
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
    _, height, width, _ = images.shape
    do_mix = mixup_alpha > 0.0
    do_cut = cutmix_alpha > 0.0
    if not (do_mix or do_cut) or prob <= 0.0:
        return images, smoothed_one_hot(labels, num_classes, label_smoothing), jnp.float32(1.0), jnp.bool_(False)
    apply = jax.random.uniform(k_apply) < prob
    if do_mix and do_cut:
        use_cut = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cut = jnp.bool_(do_cut)
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if do_mix else jnp.float32(1.0)
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if do_cut else jnp.float32(1.0)
    x = images
    x_flip = images[::-1]
    if do_cut:
        mask, lam_cut_corr = _cutmix_mask(k_box, lam_cut, height, width)
        x_cut = jnp.where(mask[None, :, :, None], x_flip, x)
    else:
        lam_cut_corr, x_cut = jnp.float32(1.0), x
    lam_mix = lam_mix.astype(jnp.float32)
    x_mix = (x.astype(jnp.float32) * lam_mix + x_flip.astype(jnp.float32) * (1.0 - lam_mix)).astype(x.dtype)
    lam = jnp.where(apply, jnp.where(use_cut, lam_cut_corr, lam_mix), 1.0).astype(jnp.float32)
    out = jnp.where(apply, jnp.where(use_cut, x_cut, x_mix), x)
    y1 = smoothed_one_hot(labels, num_classes, label_smoothing)
    y2 = y1[::-1]
    targets = lam * y1 + (1.0 - lam) * y2
    return out, targets, lam, jnp.logical_and(apply, use_cut)


def mixup_cutmix(
    rng,
    images,
    labels,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
):
    """timm Mixup, batch mode. With probability ``prob``: if both alphas > 0 pick cutmix with ``switch_prob`` else
    the enabled one; lam ~ Beta(alpha, alpha); cutmix pastes a box of the flipped batch and lam becomes
    1 - box_area/(H*W); mixup blends lam*x + (1-lam)*x.flip(0). Targets = lam*smooth(y) + (1-lam)*smooth(y.flip(0)).
    Returns (images same shape/dtype, soft targets float32 (B, num_classes))."""
    out, targets, _, _ = mixup_cutmix_with_lam(
        rng,
        images,
        labels,
        num_classes=num_classes,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        label_smoothing=label_smoothing,
    )
    return out, targets
