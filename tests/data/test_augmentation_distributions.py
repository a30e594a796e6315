"""Augmentation distributions and the train stream's per-epoch augmentation: behaviours the timm parity tests do
not pin down (RandomResizedCrop's and RandomErasing's log-uniform aspects, the RandAugment magnitude noise, the
horizontal flip's axis, the cutmix box of timm's ``rand_bbox``, a fresh augmentation of a record every epoch)."""

import jax
import numpy as np
from PIL import Image

from mambavision_jax.data import mixup, pipeline
from mambavision_jax.data import rand_augment as RA
from mambavision_jax.data.example_transforms import TrainTransform
from mambavision_jax.data.random_erasing import erasing_box
from mambavision_jax.data.transforms import random_resized_crop_params
from mvj_data_helpers import make_config


def test_random_resized_crop_aspect_is_log_uniform():
    """timm/torchvision draw the crop's aspect log-uniformly in ``ratio``: with ratio (1/4, 4) half the crops are
    taller than wide and log(w/h) averages 0 (a uniform draw in [1/4, 4] gives ~20 % tall crops)."""
    rng = np.random.default_rng(0)
    logs = []
    for _ in range(3000):
        _, _, h, w = random_resized_crop_params(rng, 1000, 1000, (0.05, 0.05), (1 / 4, 4))
        logs.append(np.log(w / h))
    logs = np.asarray(logs)
    assert abs(np.mean(logs < 0) - 0.5) < 0.04
    assert abs(logs.mean()) < 0.05 and logs.min() > np.log(1 / 4) - 0.01 and logs.max() < np.log(4) + 0.01


def test_erasing_box_aspect_is_log_uniform():
    """timm RandomErasing draws the rectangle's aspect log-uniformly in [0.3, 1/0.3]: as many tall rectangles as
    wide ones (a uniform draw gives ~23 % tall)."""
    tall, boxes = 0, 0
    for i in range(3000):
        _, _, h, w = erasing_box(np.random.default_rng(i), 400, 400, prob=1.0)
        boxes += 1
        tall += int(h > w)
    assert abs(tall / boxes - 0.5) < 0.04


def test_rand_augment_magnitude_noise_follows_mstd():
    """'mstd0.5': each op's magnitude ~ N(9, 0.5) clipped to [0, 10]; 'mstd101': U(0, 9); no mstd: exactly 9."""
    rng = np.random.default_rng(0)
    m = np.asarray([RA.RandAugment("rand-m9-mstd0.5-inc1")._magnitude(rng) for _ in range(4000)])
    assert abs(m.mean() - 9.0) < 0.05 and 0.42 < m.std() < 0.55 and m.max() <= 10.0
    u = np.asarray([RA.RandAugment("rand-m9-mstd101")._magnitude(rng) for _ in range(4000)])
    assert u.min() >= 0.0 and u.max() <= 9.0 and abs(u.mean() - 4.5) < 0.2
    assert {RA.RandAugment("rand-m9")._magnitude(rng) for _ in range(20)} == {9.0}


def _flip_config(hflip):
    c = make_config(size=24, rand_augment="", reprob=0.0)
    c.aug.color_jitter = 0.0
    c.aug.scale, c.aug.ratio, c.aug.hflip = (1.0, 1.0), (1.0, 1.0), hflip
    return c


def test_train_transform_flips_horizontally_with_the_hflip_probability():
    """With a whole-image crop and no colour ops, the train transform returns the image or its mirror along the
    width (left-right, as timm's RandomHorizontalFlip), mirrored with probability ``aug.hflip``."""
    arr = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    always, _ = TrainTransform(_flip_config(1.0))(img, np.random.default_rng(0))
    np.testing.assert_array_equal(always, arr[:, ::-1])
    never, _ = TrainTransform(_flip_config(0.0))(img, np.random.default_rng(0))
    np.testing.assert_array_equal(never, arr)
    half = TrainTransform(_flip_config(0.5))
    flips = [np.array_equal(half(img, np.random.default_rng(i))[0], arr[:, ::-1]) for i in range(400)]
    assert 0.42 < np.mean(flips) < 0.58


def test_cutmix_box_is_timm_rand_bbox():
    """timm ``rand_bbox``: cut = int(H * sqrt(1 - lam)), box rows [cy - cut//2, cy + cut//2) clipped to the image, so
    an odd cut gives an unclipped box of cut - 1 rows; the returned lam is 1 - box area / image area."""
    height, width = 16, 40
    lam = 1.0 - (5.5 / 16) ** 2  # cut_h = int(16 * 0.34375) = 5 (odd), cut_w = int(40 * 0.34375) = 13 (odd)
    f = jax.jit(lambda k: mixup._cutmix_mask(k, lam, height, width))
    heights, widths = set(), set()
    for s in range(60):
        mask, lam_corr = f(jax.random.key(s))
        mask = np.asarray(mask)
        ys, xs = np.nonzero(mask)
        heights.add(int(ys.max() - ys.min() + 1))
        widths.add(int(xs.max() - xs.min() + 1))
        np.testing.assert_allclose(float(lam_corr), 1.0 - mask.mean(), atol=1e-6)
    assert max(heights) == 4 and max(widths) == 12, (heights, widths)


def test_a_record_is_augmented_afresh_every_epoch():
    """Each example's augmentation is seeded by (seed, epoch, record): the same record read in epochs 0 and 1 comes
    out differently augmented, and reading it again in epoch 0 (e.g. after a resume) gives the same pixels."""
    c = make_config(size=24, bs=8, reprob=1.0, workers=1)
    n, spe = len(pipeline.build_source(c, "train")), pipeline.steps_per_epoch(c)
    record = int(pipeline._permutation_rng(0, 0).permutation(n)[0])  # step 0, slot 0
    pos1 = int(np.nonzero(pipeline._permutation_rng(0, 1).permutation(n) == record)[0][0])

    def read(step, slot):
        it = pipeline.build_train_iterator(c, start_step=step, process_index=0, process_count=1)
        try:
            b = next(iter(it))
        finally:
            it.close()
        return b["image"][slot], b["erase"][slot], int(b["label"][slot])

    e0, e0_again, e1 = read(0, 0), read(0, 0), read(spe + pos1 // 8, pos1 % 8)
    assert e0[2] == e1[2]  # the same record
    np.testing.assert_array_equal(e0[0], e0_again[0])
    np.testing.assert_array_equal(e0[1], e0_again[1])
    assert not np.array_equal(e0[0], e1[0])
