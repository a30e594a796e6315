"""Device side of the input pipeline: normalisation of uint8 batches and the random-erasing fill."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax import data as D
from mambavision_jax.data.device_preprocess import erase_images, normalize_images
from mambavision_jax.data.transforms import normalize

MEAN, STD = D.IMAGENET_MEAN, D.IMAGENET_STD


def _images(b=3, h=20, w=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_normalize_matches_host_normalize():
    x = _images()
    ours = np.asarray(jax.jit(lambda v: normalize_images(v, MEAN, STD))(x))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, normalize(x, MEAN, STD), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_erase_fills_exactly_the_rectangles(mode):
    x = normalize_images(jnp.asarray(_images()), MEAN, STD)
    boxes = jnp.asarray([[2, 3, 5, 7], [0, 0, 0, 0], [15, 20, 5, 8]], jnp.int32)  # image 1: none; 2: bottom-right
    out = np.asarray(jax.jit(erase_images, static_argnames="mode")(x, boxes, jax.random.PRNGKey(0), mode=mode))
    inside = np.zeros(out.shape[:3], bool)
    inside[0, 2:7, 3:10] = True
    inside[2, 15:20, 20:28] = True
    np.testing.assert_array_equal(out[~inside], np.asarray(x)[~inside])
    filled = out[inside]
    if mode == "const":
        assert (filled == 0).all()
    elif mode == "rand":  # one colour per image and channel
        for b in (0, 2):
            region = out[b][inside[b]]
            assert (region == region[0]).all() and not (region[0] == np.asarray(x)[b][inside[b]][0]).all()
        assert not np.array_equal(out[0][inside[0]][0], out[2][inside[2]][0])
    else:  # per-pixel N(0, 1)
        assert len(np.unique(filled)) == filled.size
        assert abs(filled.mean()) < 0.3 and 0.7 < filled.std() < 1.3


def test_pixel_fill_is_standard_normal_and_depends_on_rng():
    x = jnp.zeros((2, 64, 64, 3))
    boxes = jnp.asarray([[0, 0, 64, 64]] * 2, jnp.int32)
    a = np.asarray(erase_images(x, boxes, jax.random.PRNGKey(1), "pixel"))
    b = np.asarray(erase_images(x, boxes, jax.random.PRNGKey(2), "pixel"))
    assert abs(a.mean()) < 0.03 and abs(a.std() - 1.0) < 0.03
    assert not np.array_equal(a, b)


def test_batch_images_paths():
    x = _images(2)
    boxes = np.asarray([[1, 1, 4, 4], [0, 0, 0, 0]], np.int32)
    plain = np.asarray(D.batch_images({"image": x}, MEAN, STD))
    np.testing.assert_allclose(plain, normalize(x, MEAN, STD), rtol=1e-6, atol=1e-6)
    erased = np.asarray(D.batch_images({"image": x, "erase": boxes}, MEAN, STD, "const", jax.random.PRNGKey(0)))
    assert (erased[0, 1:5, 1:5] == 0).all() and np.array_equal(erased[1], plain[1])
    already = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(D.batch_images({"image": already}, MEAN, STD)), already)


def test_batch_images_errors():
    with pytest.raises(TypeError, match="uint8 .* or float"):
        D.batch_images({"image": np.zeros((1, 4, 4, 3), np.int32)}, MEAN, STD)
    with pytest.raises(ValueError, match="no rng"):
        D.batch_images({"image": _images(1), "erase": np.zeros((1, 4), np.int32)}, MEAN, STD)
    with pytest.raises(ValueError, match="unknown random-erasing mode 'dots'"):
        erase_images(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4), jnp.int32), jax.random.PRNGKey(0), "dots")
