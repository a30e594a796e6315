"""scikit-learn digits and synthetic sources; config errors."""

import numpy as np
import pytest

from mambavision_jax import data as D
from mambavision_jax.data.source_digits import _digits_split
from mvj_data_helpers import make_config, take


def test_digits_split_and_shapes():
    cfg = make_config("digits", size=32, bs=16)
    assert D.num_examples(cfg, "train") == 1437 and D.num_examples(cfg, "test") == 360
    images, labels, tr, te = _digits_split()
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == 1797
    assert set(labels[tr]) == set(labels[te]) == set(range(10))
    src = D.build_source(cfg, "train")
    img, label = src.load(0)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.max() > 200 and 0 <= label < 10
    # deterministic: a fresh split is identical
    _digits_split.cache_clear()
    _, _, tr2, te2 = _digits_split()
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)


def test_digits_refuses_a_split_slice_it_would_not_apply():
    with pytest.raises(ValueError, match=r"no slices.*'train\[:10%\]'"):
        D.build_source(make_config("digits", size=32, bs=16), "train[:10%]")


def test_digits_iterators():
    cfg = make_config("digits", size=32, bs=16, eval_bs=64)
    b = take(D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1), 1)[0]
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.uint8 and b["label"].dtype == np.int32
    assert b["erase"].shape == (16, 4) and b["erase"].dtype == np.int32  # reprob 0.25: rectangles for the device
    evs = list(D.build_eval_iterator(cfg, process_index=0, process_count=1))
    assert len(evs) == 6 and sum(e["mask"].sum() for e in evs) == 360
    labels = np.concatenate([e["label"][e["mask"] == 1] for e in evs])
    assert sorted(set(labels.tolist())) == list(range(10))


def test_synthetic():
    cfg = make_config("synthetic", size=24, bs=8, num_classes=7)
    assert D.num_examples(cfg, "train") == 256 and D.steps_per_epoch(cfg) == 32
    a = take(D.build_train_iterator(cfg, start_step=5, process_index=0, process_count=1), 3)
    b = take(D.build_train_iterator(cfg, start_step=6, process_index=0, process_count=1), 2)
    np.testing.assert_array_equal(a[1]["image"], b[0]["image"])
    np.testing.assert_array_equal(a[2]["label"], b[1]["label"])
    assert a[0]["image"].shape == (8, 24, 24, 3) and a[0]["image"].dtype == np.uint8 and "erase" not in a[0]
    assert ((0 <= a[0]["label"]) & (a[0]["label"] < 7)).all()
    ev = list(D.build_eval_iterator(cfg, process_index=0, process_count=1))
    assert len(ev) == 32 and ev[0]["image"].shape == (8, 24, 24, 3)


def test_config_errors():
    with pytest.raises(D.UnknownDatasetError, match="imagenet2012, folder, digits, synthetic"):
        D.num_examples(make_config("cifar"), "train")
    with pytest.raises(ValueError, match="image_size"):
        D.num_examples(make_config("digits", size=0), "train")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        D.steps_per_epoch(make_config("digits", bs=5000))
    with pytest.raises(ValueError, match="10 classes"):
        D.num_examples(make_config("digits", num_classes=5), "train")
