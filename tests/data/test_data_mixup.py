"""mixup_cutmix / smoothed_one_hot (pure JAX)."""

import jax
import jax.numpy as jnp
import numpy as np

from mambavision_jax.data import mixup_cutmix, mixup_cutmix_with_lam, smoothed_one_hot

B, H, W, K = 8, 16, 12, 10


def _batch():
    # image i is the constant i, so every pixel tells which example it came from
    images = jnp.broadcast_to(jnp.arange(B, dtype=jnp.float32)[:, None, None, None], (B, H, W, 3))
    labels = jnp.arange(B) % K
    return images, labels


def test_smoothed_one_hot():
    t = smoothed_one_hot(jnp.array([0, 3]), 10, 0.1)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    assert np.isclose(t[0, 0], 0.91) and np.isclose(t[0, 1], 0.01) and np.isclose(t[1, 3], 0.91)


def test_prob_zero_identity():
    images, labels = _batch()
    out, t = jax.jit(lambda r, x, y: mixup_cutmix(r, x, y, num_classes=K, prob=0.0, label_smoothing=0.1))(
        jax.random.key(0), images, labels
    )
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(t, smoothed_one_hot(labels, K, 0.1))


def test_targets_sum_to_one_and_lam_bounds():
    images, labels = _batch()
    f = jax.jit(
        lambda r: mixup_cutmix_with_lam(
            r,
            images,
            labels,
            num_classes=K,
            mixup_alpha=0.8,
            cutmix_alpha=1.0,
            prob=1.0,
            switch_prob=0.5,
            label_smoothing=0.1,
        )
    )
    kinds = set()
    for s in range(40):
        out, t, lam, cut = f(jax.random.key(s))
        np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, rtol=1e-5)
        assert 0.0 <= float(lam) <= 1.0
        kinds.add(bool(cut))
        # example 0 mixes with example B-1; its own-class weight = lam*0.91 + (1-lam)*0.01
        np.testing.assert_allclose(t[0, labels[0]], lam * 0.91 + (1 - lam) * 0.01, rtol=1e-5)
    assert kinds == {True, False}  # both cutmix and mixup occur with switch_prob 0.5


def test_mixup_only_blends():
    images, labels = _batch()
    out, t, lam, cut = mixup_cutmix_with_lam(
        jax.random.key(1), images, labels, num_classes=K, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0
    )
    assert not bool(cut)
    np.testing.assert_allclose(out[0], lam * 0 + (1 - lam) * (B - 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t[0, labels[0]], lam, rtol=1e-5)


def test_cutmix_area_matches_lam():
    images, labels = _batch()
    f = jax.jit(
        lambda r: mixup_cutmix_with_lam(
            r, images, labels, num_classes=K, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0
        )
    )
    for s in range(20):
        out, t, lam, cut = f(jax.random.key(s))
        assert bool(cut)
        pasted = np.asarray(out[0, :, :, 0] == B - 1)  # pixels taken from the partner
        area = pasted.mean()
        np.testing.assert_allclose(1.0 - area, float(lam), atol=1e-6)
        np.testing.assert_allclose(t[0, labels[0]], lam, rtol=1e-5)
        np.testing.assert_allclose(t[0, labels[B - 1]], 1 - lam, rtol=1e-5, atol=1e-6)
        # the pasted region is one axis-aligned box
        if pasted.any():
            ys, xs = np.nonzero(pasted)
            assert pasted[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()
        np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, rtol=1e-5)


def test_dtype_preserved_bf16():
    images, labels = _batch()
    out, t = mixup_cutmix(jax.random.key(0), images.astype(jnp.bfloat16), labels, num_classes=K)
    assert out.dtype == jnp.bfloat16 and t.dtype == jnp.float32 and t.shape == (B, K)
