"""Train/eval steps in-process on one CPU device with the tiny MambaVision."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

import mambavision_jax.data as data
from mambavision_jax.train import loop, optim, sharding, state as state_lib, step as step_lib
from mambavision_jax.train.packing import Packing


def test_train_steps_lower_loss_and_mesa_schedule(tiny_config, jax_cache_env):
    """A fixed batch: cross entropy falls over a few steps; the MESA term is exactly 0 while
    epoch/epochs <= mesa_start_ratio and positive afterwards (steps_per_epoch=1, epochs=4, start 0.25)."""
    c = tiny_config
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_epochs = 0
    c.optimizer.epochs = 4
    c.ema_decay = 0.9
    c.mesa = 1.0
    c.mesa_start_ratio = 0.25
    spe = 1
    mesh = sharding.make_mesh()
    model = loop.build_model(c)
    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(lambda r: model.init({"params": r}, jnp.zeros((1, 32, 32, 3))), rng)["params"]
    packing = Packing.of(abstract)
    tx, schedule = optim.make_optimizer(c, spe, abstract, packing)
    init_fn = state_lib.make_init_fn(model, tx, 32, use_ema=True, packing=packing)
    state, shardings = state_lib.create_train_state(init_fn, rng, mesh)
    train_step = step_lib.make_train_step(model, tx, schedule, c, spe, data, mesh, shardings)
    rs = np.random.RandomState(0)
    batch = sharding.global_batch(
        {
            "image": rs.normal(size=(16, 32, 32, 3)).astype(np.float32),
            "label": rs.randint(0, 10, size=(16,)).astype(np.int32),
        },
        mesh,
    )
    ce, mesa = [], []
    for i in range(6):
        state, m = train_step(state, batch, jax.random.PRNGKey(1), i)
        ce.append(float(m["ce"]))
        mesa.append(float(m["mesa_loss"]))
        assert bool(m["finite"])
    assert int(state.step) == 6
    assert ce[-1] < ce[0] - 0.1, ce
    assert mesa[0] == 0.0 and mesa[1] == 0.0, mesa  # epochs 0, 1: 0/4, 1/4 are not > 0.25
    assert all(v > 0 for v in mesa[2:]), mesa  # epoch 2: 2/4 > 0.25
    # the choice is made on the host: neither executable branches on the device
    for step in (0, 2):
        hlo = train_step.lower(state, batch, jax.random.PRNGKey(1), step).as_text()
        assert "stablehlo.case" not in hlo and "stablehlo.if" not in hlo
    assert [step_lib.mesa_active(s, c, spe) for s in range(4)] == [False, False, True, True]
    # EMA moved towards the params but is not equal to them
    p, e = jax.tree.leaves(state.params)[0], jax.tree.leaves(state.ema_params)[0]
    assert not np.allclose(np.asarray(p), np.asarray(e))


def test_train_step_normalises_and_erases_uint8_batches(tiny_config, jax_cache_env):
    """The step normalises uint8 images with the config's mean/std (same loss as the host-normalised float batch)
    and fills the host's erasing rectangles (whole-image rectangles in 'const' mode = an all-zero float batch)."""
    c = tiny_config
    c.aug.remode = "const"
    mesh = sharding.make_mesh()
    model = loop.build_model(c)
    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(lambda r: model.init({"params": r}, jnp.zeros((1, 32, 32, 3))), rng)["params"]
    packing = Packing.of(abstract)
    tx, schedule = optim.make_optimizer(c, 1, abstract, packing)
    init_fn = state_lib.make_init_fn(model, tx, 32, use_ema=False, packing=packing)
    state, shardings = state_lib.create_train_state(init_fn, rng, mesh)
    train_step = step_lib.make_train_step(model, tx, schedule, c, 1, data, mesh, shardings)
    pre = data.preprocess_settings(c)
    rs = np.random.RandomState(0)
    uint8 = rs.randint(0, 256, size=(16, 32, 32, 3)).astype(np.uint8)
    labels = rs.randint(0, 10, size=(16,)).astype(np.int32)

    def loss(**batch):
        st = jax.tree.map(jnp.copy, state)  # the step donates its state
        _, m = train_step(st, sharding.global_batch(dict(batch, label=labels), mesh), jax.random.PRNGKey(1), 0)
        return float(m["loss"])

    host = data.transforms.normalize(uint8, pre.mean, pre.std)
    assert loss(image=uint8) == pytest.approx(loss(image=host), rel=1e-5)
    whole = np.tile(np.asarray([[0, 0, 32, 32]], np.int32), (16, 1))
    zeros = loss(image=np.zeros_like(host))
    assert loss(image=uint8, erase=whole) == pytest.approx(zeros, rel=1e-5)
    assert loss(image=uint8) != pytest.approx(zeros, rel=1e-3)


def test_erasing_follows_mixup_as_in_the_official_loader():
    """timm's collate mixes the batch and its prefetcher erases afterwards: an erased rectangle holds the fill alone
    ('const': zeros), not a blend of the fill with the partner image; unerased images are the mix."""
    c = config_dict.ConfigDict(dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 200, 60, 90)])
    boxes = np.asarray([[0, 0, 8, 8], [0, 0, 0, 0], [2, 3, 4, 5], [0, 0, 0, 0]], np.int32)

    def half_mix(rng, x, labels):
        return 0.5 * x + 0.5 * x[::-1], labels

    batch = dict(image=jnp.asarray(images), erase=jnp.asarray(boxes), label=jnp.arange(4))
    key = jax.random.PRNGKey(0)
    got, _ = step_lib.model_inputs(batch, key, key, half_mix, c, "const")
    mixed = np.asarray(half_mix(None, data.transforms.normalize(images, c.mean, c.std), None)[0])
    np.testing.assert_array_equal(np.asarray(got[0]), 0.0)
    np.testing.assert_allclose(np.asarray(got[1]), mixed[1], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[2, 2:6, 3:8]), 0.0)
    np.testing.assert_allclose(np.asarray(got[2, :2]), mixed[2, :2], rtol=1e-6)


def test_mesa_kl_matches_reference():
    s = jnp.array([[1.0, 2.0, 0.5], [0.1, -1.0, 3.0]])
    t = jnp.array([[0.5, 2.5, 0.0], [1.0, 0.0, 2.0]])
    ps, pt = jax.nn.softmax(s / 3, -1), jax.nn.softmax(t / 3, -1)
    ref = float(jnp.sum(pt * (jnp.log(pt) - jnp.log(ps))) / 2)
    assert float(step_lib.mesa_kl(s, t)) == pytest.approx(ref, rel=1e-6)
    assert float(step_lib.mesa_kl(s, s)) == pytest.approx(0.0, abs=1e-7)


class _FixedLogits(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        del train
        return x[:, 0, 0, :6]  # logits are the first pixel's 6 channels


def test_eval_step_counts_with_mask():
    mesh = sharding.make_mesh()
    logits = np.array(
        [
            [9, 1, 2, 3, 4, 5],  # label 0: top1 hit
            [1, 9, 8, 7, 6, 5],  # label 2: top5 hit only
            [9, 8, 7, 6, 5, 0],  # label 5: miss
            [0, 0, 0, 0, 0, 9],
        ],  # label 5: top1 hit but masked out
        np.float32,
    )
    images = np.zeros((4, 2, 2, 6), np.float32)
    images[:, 0, 0, :] = logits
    batch = sharding.global_batch(
        {"image": images, "label": np.array([0, 2, 5, 5], np.int32), "mask": np.array([1, 1, 1, 0], np.float32)}, mesh
    )
    out = jax.device_get(step_lib.make_eval_step(_FixedLogits(), mesh, 6, (0, 0, 0), (1, 1, 1))({}, batch))
    assert float(out["count"]) == 3 and float(out["correct1"]) == 1 and float(out["correct5"]) == 2
    nll = -jax.nn.log_softmax(jnp.asarray(logits), -1)[jnp.arange(3), jnp.array([0, 2, 5])]
    assert float(out["loss_sum"]) == pytest.approx(float(nll.sum()), rel=1e-5)


def test_a_batch_the_micro_batches_cannot_split_is_refused_by_name(tiny_config):
    c = tiny_config
    c.grad_accum_steps = 4
    c.batch_size_per_device = 2
    model = loop.build_model(c)
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3))))
    mesh = sharding.make_mesh()
    tx, schedule = optim.make_optimizer(c, 10, variables["params"])
    abstract = jax.eval_shape(state_lib.make_state_fn(tx, use_ema=False), variables)
    shardings = sharding.state_shardings(abstract, mesh)
    train_step = step_lib.make_train_step(model, tx, schedule, c, 10, data, mesh, shardings)
    batch = {"image": jax.ShapeDtypeStruct((6, 32, 32, 3), np.uint8), "label": jax.ShapeDtypeStruct((6,), np.int32)}
    with pytest.raises(ValueError, match="grad_accum_steps=4 splits each device's rows into 4 .* holds 6 rows"):
        train_step.lower(abstract, batch, jax.ShapeDtypeStruct((2,), np.uint32), 0)
