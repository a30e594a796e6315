"""The train stream's random generators; config values refused by name."""

import ml_collections as mlc
import pytest

from mambavision_jax import data as D
from mambavision_jax.data import pipeline
from mvj_data_helpers import make_config


@pytest.mark.parametrize("seed", [0, 31, 2**40 + 3])
def test_the_epoch_permutation_draws_from_no_example_s_augmentation_stream(seed):
    """numpy pads a seed list shorter than 4 entries with zeros: a permutation seeded [seed, epoch, 1] drew the very
    numbers that augment record 1 (seeded [seed, epoch, 1, 0]) in that epoch."""
    for epoch in range(3):
        perm = pipeline._permutation_rng(seed, epoch).bit_generator.state
        for record in range(4):
            assert pipeline._example_rng(seed, epoch, record).bit_generator.state != perm, (epoch, record)
        assert pipeline._permutation_rng(seed, epoch + 1).bit_generator.state != perm


def test_a_misspelt_eval_interpolation_is_refused_when_the_settings_are_read():
    """The train step reads the settings at start-up; the eval transform used the name only on its first image,
    an epoch of training later."""
    cfg = make_config()
    cfg.eval_preprocess = mlc.ConfigDict(dict(interpolation="bicubik"))
    with pytest.raises(ValueError, match="interpolation.*'bicubik'"):
        D.preprocess_settings(cfg)
    cfg.eval_preprocess.interpolation = "bilinear"
    assert D.preprocess_settings(cfg).interpolation == "bilinear"


def test_gradient_accumulation_multiplies_the_train_batch_not_the_eval_batch():
    from mambavision_jax.data.config_utils import global_batch_size, local_batch_size

    cfg = make_config(bs=8, eval_bs=16)
    cfg.grad_accum_steps = 3
    assert local_batch_size(cfg) == global_batch_size(cfg) == 24
    assert local_batch_size(cfg, eval=True) == 16
    assert pipeline.steps_per_epoch(cfg) == pipeline.num_examples(cfg, "train") // 24
    it = D.build_train_iterator(cfg, start_step=0, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    assert batch["image"].shape[0] == batch["label"].shape[0] == 24
    for bad in (0, -2, 1.5, True, "2"):
        cfg = make_config()
        cfg.grad_accum_steps = bad
        with pytest.raises(ValueError, match="config.grad_accum_steps must be a positive int"):
            local_batch_size(cfg)


def test_too_few_examples_for_an_accumulated_batch_names_grad_accum_steps():
    cfg = make_config(bs=8)
    cfg.grad_accum_steps = 1000
    with pytest.raises(ValueError, match="fewer than one global batch .*grad_accum_steps"):
        pipeline.steps_per_epoch(cfg)
