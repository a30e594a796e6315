"""Schedule values and the weight-decay mask (no model needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from mambavision_jax.train import optim


def _config(**opt):
    base = dict(
        name="lamb",
        lr=5e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.05,
        clip_grad_norm=5.0,
        lamb_max_grad_norm=1.0,
        epochs=310,
        warmup_epochs=20,
        cooldown_epochs=10,
        warmup_lr=1e-6,
        min_lr=5e-6,
    )
    base.update(opt)
    return ConfigDict(dict(optimizer=base, total_steps=None))


def test_schedule_official_recipe_values():
    spe = 100
    c = _config()
    sched = optim.make_schedule(c, spe)
    lr = lambda s: float(sched(s))
    assert lr(0) == pytest.approx(1e-6)  # warmup starts at warmup_lr
    assert lr(10 * spe) == pytest.approx(1e-6 + 0.5 * (5e-3 - 1e-6), rel=1e-5)  # linear halfway
    # end of warmup: timm (warmup_prefix=False) joins the cosine evaluated at t = warmup_t
    expected = 5e-6 + 0.5 * (5e-3 - 5e-6) * (1 + np.cos(np.pi * 20 / 310))
    assert lr(20 * spe) == pytest.approx(expected, rel=1e-5)
    assert lr(20 * spe - 1) == pytest.approx(1e-6 + (20 * spe - 1) * (5e-3 - 1e-6) / (20 * spe), rel=1e-5)
    assert lr(310 * spe - 1) == pytest.approx(5e-6, rel=1e-3)  # end of cosine
    assert lr(310 * spe) == pytest.approx(5e-6)  # cooldown at min_lr
    assert lr(320 * spe - 1) == pytest.approx(5e-6)
    assert optim.total_train_steps(c, spe) == 320 * spe
    c.total_steps = 7
    assert optim.total_train_steps(c, spe) == 7
    assert float(optim.make_schedule(c, spe)(20 * spe)) == pytest.approx(expected, rel=1e-5)  # schedule unchanged


def test_weight_decay_mask_excludes_1d_and_biases():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.ones((8,))},
        "norm": {"scale": jnp.ones((8,)), "bias": jnp.ones((8,))},
        "mixer": {"A_log": jnp.ones((4, 8)), "D": jnp.ones((4,))},
        "odd": {"bias": jnp.ones((2, 2))},
        "head": {"kernel": jnp.ones((8, 10))},
    }
    mask = optim.weight_decay_mask(params)
    assert mask["conv"]["kernel"] and mask["head"]["kernel"] and mask["mixer"]["A_log"]
    assert not any(
        [mask["conv"]["bias"], mask["norm"]["scale"], mask["norm"]["bias"], mask["mixer"]["D"], mask["odd"]["bias"]]
    )


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_optimizer_decays_only_masked_leaves(name):
    """With zero gradients only weight decay moves parameters: masked-out leaves stay put."""
    c = _config(name=name, weight_decay=0.5, warmup_epochs=0, lr=0.1)
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    tx, _ = optim.make_optimizer(c, 10, params)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    assert np.all(np.asarray(new["w"]) < 1.0)
    np.testing.assert_array_equal(np.asarray(new["b"]), 1.0)


def test_gradient_clipping():
    c = _config(name="adamw", weight_decay=0.0, clip_grad_norm=1.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0))
    g = {"w": jnp.full((10,), 100.0)}
    out, _ = tx.update(g, tx.init(g))
    assert float(optax.tree.norm(out)) == pytest.approx(1.0, rel=1e-5)
    full, _ = optim.make_optimizer(c, 10, g)  # builds with clipping first in the chain
    assert full is not None
