"""Host transforms: RandomResizedCrop, eval center/squash crops (incl. timm parity), RandAugment, random-erasing
rectangles (their fill runs on the device: test_device_preprocess.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mambavision_jax import data as D
from mambavision_jax.data import rand_augment as RA
from mambavision_jax.data.config_utils import Preprocess
from mambavision_jax.data.device_preprocess import normalize_images
from mambavision_jax.data.example_transforms import EvalTransform, TrainTransform
from mambavision_jax.data.random_erasing import erasing_box
from mambavision_jax.data.transforms import eval_resize_crop, random_resized_crop, random_resized_crop_params
from mvj_data_helpers import make_config


def _gradient(w, h):
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 255 // max(w - 1, 1), ys * 255 // max(h - 1, 1), (xs + ys) % 256], -1).astype(np.uint8)


def _noise(w=48, h=40, lo=60, hi=180, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(lo, hi, (h, w, 3), dtype=np.uint8))


def test_random_resized_crop_sizes_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(5, 300, 2)
        top, left, ch, cw = random_resized_crop_params(rng, int(w), int(h), (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    img = Image.fromarray(_gradient(50, 30))
    for interp in ("bicubic", "random"):
        assert random_resized_crop(img, rng, 17, interpolation=interp).size == (17, 17)
    # scale=(1,1), ratio=(1,1) on a square image: the crop is the whole image
    assert random_resized_crop_params(rng, 40, 40, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 40, 40)
    # fallback (impossible aspect): central crop clamped to the ratio range
    assert random_resized_crop_params(rng, 100, 10, (1.0, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)


def test_eval_center_crop_known_geometry():
    arr = _gradient(20, 30)  # W=20, H=30
    # crop_pct 0.8 -> scale_size 20 = short side: no resize; centre crop 16: top round(14/2)=7, left 2
    out = np.asarray(eval_resize_crop(Image.fromarray(arr), 16, crop_pct=0.8, crop_mode="center"))
    np.testing.assert_array_equal(out, arr[7:23, 2:18])
    # squash: 40x20 -> 20x20 (bicubic), then crop 2..18
    img = Image.fromarray(_gradient(40, 20))
    sq = eval_resize_crop(img, 16, crop_pct=0.8, crop_mode="squash")
    ref = img.resize((20, 20), Image.Resampling.BICUBIC).crop((2, 2, 18, 18))
    np.testing.assert_array_equal(np.asarray(sq), np.asarray(ref))
    # center on a landscape image: short side 20 -> 20, long 40 -> 40 (no resize), crop left 12
    c = np.asarray(eval_resize_crop(img, 16, crop_pct=0.8, crop_mode="center"))
    np.testing.assert_array_equal(c, _gradient(40, 20)[2:18, 12:28])
    assert eval_resize_crop(Image.fromarray(_gradient(33, 77)), 24, 0.875, "squash").size == (24, 24)


@pytest.mark.parametrize("crop_mode,crop_pct", [("center", 0.875), ("squash", 0.93), ("center", 1.0)])
def test_eval_transform_matches_timm(crop_mode, crop_pct):
    timm_data = pytest.importorskip("timm.data")
    tf = timm_data.create_transform(
        input_size=(3, 32, 32), is_training=False, crop_pct=crop_pct, crop_mode=crop_mode, interpolation="bicubic"
    )
    ours = EvalTransform(make_config(size=32), Preprocess(crop_pct=crop_pct, crop_mode=crop_mode))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    ref = tf(img).numpy().transpose(1, 2, 0)
    host = ours(img)
    assert host.dtype == np.uint8  # normalised on the device, as the eval step does
    device = normalize_images(jnp.asarray(host[None]), D.IMAGENET_MEAN, D.IMAGENET_STD)[0]
    np.testing.assert_allclose(np.asarray(device), ref, atol=1e-5)


def test_rand_augment_parsing():
    c = RA.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (c.num_ops, c.magnitude, c.magnitude_std, c.increasing, c.prob) == (2, 9.0, 0.5, True, 0.5)
    assert list(c.ops) == RA.RAND_INCREASING_TRANSFORMS and len(c.ops) == 15
    c = RA.parse_rand_augment("rand-n3-m7-p0.8-mstd101")
    assert (c.num_ops, c.magnitude, c.prob, c.magnitude_std, c.increasing) == (3, 7.0, 0.8, float("inf"), False)
    assert list(c.ops) == RA.RAND_TRANSFORMS
    with pytest.raises(ValueError, match="must start with 'rand'"):
        RA.parse_rand_augment("augmix-m5")
    for section in ("tweights", "inc"):  # a weighted op set, a key without its number: refused, not skipped
        with pytest.raises(ValueError, match=f"section '{section}' .* is not supported"):
            RA.parse_rand_augment(f"rand-m9-{section}")
    aa = pytest.importorskip("timm.data.auto_augment")
    assert RA.RAND_INCREASING_TRANSFORMS == aa._RAND_INCREASING_TRANSFORMS
    assert RA.RAND_TRANSFORMS == aa._RAND_TRANSFORMS


@pytest.mark.parametrize("name", RA.RAND_INCREASING_TRANSFORMS)
def test_rand_augment_ops_change_image_and_match_timm(name):
    img = _noise()
    ra = RA.RandAugment("rand-m9-mstd0.5-inc1", interpolation="bicubic")
    out = ra.apply_op(name, img, np.random.default_rng(3))
    assert out.size == img.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(img)), name
    aa = pytest.importorskip("timm.data.auto_augment")
    args = RA._level_args(name, 9.0, np.random.default_rng(5))
    ref = aa.NAME_TO_OP[name](img, *args, fillcolor=ra.fill, resample=Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(
        np.asarray(RA._apply_op(name, img, args, ra.fill, Image.Resampling.BICUBIC)), np.asarray(ref)
    )


def test_posterize_zero_bits_is_black():
    out = RA._apply_op("PosterizeIncreasing", _noise(), (0,), (0, 0, 0), Image.Resampling.BICUBIC)
    assert np.asarray(out).max() == 0


def test_rand_augment_changes_most_images():
    ra = RA.RandAugment("rand-m9-mstd0.5-inc1")
    img = _noise()
    changed = sum(
        not np.array_equal(np.asarray(ra(img, np.random.default_rng(i))), np.asarray(img)) for i in range(100)
    )
    assert 60 < changed < 90  # P(at least one of 2 ops applied) = 0.75


def test_erasing_box_probability_area_and_bounds():
    hits, areas = 0, []
    for i in range(2000):
        top, left, h, w = erasing_box(np.random.default_rng(i), 32, 40, prob=0.25)
        if h:
            hits += 1
            assert w > 0 and 0 <= top and top + h <= 32 and 0 <= left and left + w <= 40
            areas.append(h * w / (32 * 40))
        else:
            assert (top, left, w) == (0, 0, 0)
    assert abs(hits / 2000 - 0.25) < 0.03
    assert 0.015 < min(areas) and max(areas) < 0.4
    assert not erasing_box(np.random.default_rng(0), 32, 32, prob=0.0).any()


def test_train_transform_deterministic_and_shape():
    tf = TrainTransform(make_config(size=24, reprob=1.0))
    img = _noise(60, 50)
    a, box_a = tf(np.asarray(img), np.random.default_rng(11))
    b, box_b = tf(img, np.random.default_rng(11))
    c, _ = tf(img, np.random.default_rng(12))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    assert box_a.shape == (4,) and box_a.dtype == np.int32 and box_a[2] > 0  # reprob 1: always a rectangle
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(box_a, box_b)
    assert not np.array_equal(a, c)
    cj = TrainTransform(make_config(size=24, rand_augment="", reprob=0.0))
    assert cj.rand_augment is None and cj.color_jitter == 0.4
    assert not cj(img, np.random.default_rng(0))[1].any()
    with pytest.raises(ValueError, match="remode='bogus'"):
        TrainTransform(make_config(size=24, remode="bogus"))


def test_preprocess_fallback_chain():
    import ml_collections as mlc

    from mambavision_jax.data import preprocess_settings

    cfg = make_config()
    cfg.model_name = "no_such_model"  # unknown to pretrained_cfg -> defaults
    p = preprocess_settings(cfg)
    assert (p.crop_pct, p.crop_mode, p.interpolation) == (1.0, "center", "bicubic")
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    cfg.eval_preprocess = mlc.ConfigDict(
        dict(crop_pct=0.9, crop_mode="squash", interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    )
    p = preprocess_settings(cfg)
    assert (p.crop_pct, p.crop_mode, p.mean, p.std) == (0.9, "squash", (0.5,) * 3, (0.25,) * 3)
    cfg.eval_preprocess.crop_mode = "border"
    with pytest.raises(ValueError, match="crop_mode"):
        preprocess_settings(cfg)


@pytest.mark.parametrize("model_name", ["mamba_vision_T2", "mamba_vision_L2_512_21k"])
def test_preprocess_image_matches_timm_eval_of_the_pretrained_cfg(model_name):
    import mambavision_jax as mvj
    from mambavision_jax.data import preprocess_image

    timm_data = pytest.importorskip("timm.data")
    cfg = mvj.pretrained_cfg(model_name)
    tf = timm_data.create_transform(
        input_size=cfg["input_size"],
        is_training=False,
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
        interpolation="bicubic",
        mean=cfg["mean"],
        std=cfg["std"],
    )
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    ours = preprocess_image(img, model_name)
    assert ours.shape == (cfg["input_size"][1], cfg["input_size"][2], 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, tf(img).numpy().transpose(1, 2, 0), atol=1e-5)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_random_resized_crop_matches_torchvision_resized_crop(interpolation):
    """timm's RandomResizedCropAndInterpolation crops then resizes (F.resized_crop): the filter must not read
    pixels outside the crop box (PIL ``resize(box=...)`` does, changing the border rows/columns)."""
    F = pytest.importorskip("torchvision.transforms.functional")
    from timm.data.transforms import str_to_interp_mode

    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (75, 100, 3), dtype=np.uint8))
    for seed in range(5):
        top, left, h, w = random_resized_crop_params(np.random.default_rng(seed), 100, 75, (0.08, 1.0), (3 / 4, 4 / 3))
        ours = random_resized_crop(img, np.random.default_rng(seed), 24, interpolation=interpolation)
        ref = F.resized_crop(img, top, left, h, w, [24, 24], str_to_interp_mode(interpolation))
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
