"""imagenet2012 through tfds.data_source on tfds.testing.mock_data (no TensorFlow)."""

import os
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mambavision_jax import data as D
from mambavision_jax.data.source_tfds import TfdsSource
from mvj_data_helpers import make_config, take

N = 40


@pytest.fixture
def mock_imagenet():
    with tfds.testing.mock_data(num_examples=N):
        yield


def _cfg(**kw):
    kw.setdefault("num_classes", 1000)
    kw.setdefault("eval_split", "validation")
    return make_config("imagenet2012", size=32, **kw)


def test_train_batches_shape_dtype_normalisation(mock_imagenet):
    cfg = _cfg(bs=8, rand_augment="", reprob=0.0)
    assert D.num_examples(cfg, "train") == N
    assert D.steps_per_epoch(cfg) == N // 8
    b = take(D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1), 2)[1]
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8 and "erase" not in b
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert ((0 <= b["label"]) & (b["label"] < 1000)).all()
    mean, std = np.array(D.IMAGENET_MEAN), np.array(D.IMAGENET_STD)
    x = np.asarray(D.batch_images(b, mean, std))  # what the jitted step feeds the model
    assert x.dtype == np.float32
    assert np.all(x >= (0 - mean) / std - 1e-5) and np.all(x <= (1 - mean) / std + 1e-5)
    # the values, not loose statistics (which /255 alone, mean 0.5 and std 0.27 here, passed)
    np.testing.assert_allclose(x, (b["image"] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_eval_padding_and_mask(mock_imagenet):
    cfg = _cfg(eval_bs=16)
    batches = list(D.build_eval_iterator(cfg, process_index=0, process_count=1))
    assert len(batches) == 3  # ceil(40 / 16)
    assert all(b["image"].shape == (16, 32, 32, 3) for b in batches)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == N and (masks[:N] == 1).all() and (masks[N:] == 0).all()
    assert np.all(batches[-1]["image"][8:] == 0)
    src = D.build_source(cfg, "validation")
    labels = np.concatenate([b["label"] for b in batches])[:N]
    assert labels.tolist() == [src.load(i)[1] for i in range(N)]  # one pass, in order


def test_resume_equals_uninterrupted(mock_imagenet):
    cfg = _cfg(bs=8)  # full augmentation: RRC, random interp, RandAugment, erasing
    spe = D.steps_per_epoch(cfg)  # 5: the run below crosses an epoch boundary
    full = take(D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1), 2 * spe)
    k = 3
    resumed = take(D.build_train_iterator(cfg, start_step=k, process_index=0, process_count=1), 2 * spe - k)
    for a, b in zip(full[k:], resumed):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])
    # a new epoch reshuffles
    assert full[0]["label"].tolist() != full[spe]["label"].tolist()


def test_two_hosts_split_global_batch(mock_imagenet):
    one = take(D.build_train_iterator(_cfg(bs=8), start_step=4, process_index=0, process_count=1), 2)
    h0 = take(D.build_train_iterator(_cfg(bs=4), start_step=4, process_index=0, process_count=2), 2)
    h1 = take(D.build_train_iterator(_cfg(bs=4), start_step=4, process_index=1, process_count=2), 2)
    for g, a, b in zip(one, h0, h1):
        np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), g["label"])
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), g["image"])
        assert not np.array_equal(a["image"], b["image"])
    ev0 = list(D.build_eval_iterator(_cfg(eval_bs=8), process_index=0, process_count=2))
    ev1 = list(D.build_eval_iterator(_cfg(eval_bs=8), process_index=1, process_count=2))
    assert len(ev0) == len(ev1) == 3  # ceil(40 / 16) on both hosts
    assert sum(b["mask"].sum() for b in ev0 + ev1) == N


def test_not_prepared_error(tmp_path):
    cfg = _cfg(data_dir=str(tmp_path))
    with pytest.raises(D.DatasetNotPreparedError, match="tfds build imagenet2012"):
        D.num_examples(cfg, "train")


class MvjTestImages(tfds.core.GeneratorBasedBuilder):
    """A prepared array_record dataset (numpy features, so no TensorFlow is needed to write it)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"image": tfds.features.Tensor(shape=(20, 24, 3), dtype=np.uint8)}
        features["label"] = tfds.features.ClassLabel(num_classes=3)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(n)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "label": i % 3}


def test_tfds_source_survives_the_trip_to_a_worker_process(tmp_path):
    """Worker processes (``config.data.worker_processes``, -1 by default) get the source by cloudpickle in a fresh
    interpreter: a TFDS array_record source must reopen its files there and read the same records."""
    MvjTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = TfdsSource("mvj_test_images", "train", str(tmp_path))
    (tmp_path / "source.pkl").write_bytes(cloudpickle.dumps(source))
    read = (
        "import pickle, sys, numpy as np\n"
        "source = pickle.load(open(sys.argv[1], 'rb'))\n"
        "print([(source.load(i)[1], int(np.asarray(source.load(i)[0]).sum())) for i in range(len(source))])\n"
    )
    # The worker imports the builder's module, as workers import tensorflow_datasets' own imagenet2012 builder.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    args = [sys.executable, "-c", read, str(tmp_path / "source.pkl")]
    there = subprocess.run(args, capture_output=True, text=True, env=env)
    assert there.returncode == 0, there.stderr
    here = [(source.load(i)[1], int(np.asarray(source.load(i)[0]).sum())) for i in range(len(source))]
    assert len(here) == 7 and there.stdout.strip() == str(here)
