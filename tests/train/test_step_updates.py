"""The train step's EMA update, per-step random draws and MESA teacher, on a tiny BatchNorm MLP (one CPU device):
behaviours the MambaVision step tests only check loosely (the EMA moved, the MESA term is positive)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mambavision_jax.data as data
from mambavision_jax.train import optim, sharding, state as state_lib, step as step_lib

SIZE, BATCH, CLASSES = 8, 16, 10


class _TinyBN(nn.Module):
    """Pooled pixels -> Dense -> BatchNorm -> Dense: params and batch_stats, no dropout (deterministic)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(8)(jnp.mean(x, axis=(1, 2)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(CLASSES)(nn.relu(x))


def _setup(c, use_ema):
    c.data.num_classes = CLASSES
    c.optimizer.warmup_epochs = 0
    mesh = sharding.make_mesh()
    model = _TinyBN()
    rng = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(lambda r: model.init({"params": r}, jnp.zeros((1, SIZE, SIZE, 3))), rng)["params"]
    tx, schedule = optim.make_optimizer(c, 1, abstract)
    init_fn = state_lib.make_init_fn(model, tx, SIZE, use_ema=use_ema)
    state, shardings = state_lib.create_train_state(init_fn, rng, mesh)
    train_step = step_lib.make_train_step(model, tx, schedule, c, 1, data, mesh, shardings)
    rs = np.random.RandomState(0)
    batch = sharding.global_batch(
        {
            "image": rs.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32) * 3,
            "label": rs.randint(0, CLASSES, size=(BATCH,)).astype(np.int32),
        },
        mesh,
    )
    return model, state, train_step, batch


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def test_ema_is_updated_from_the_new_params_and_batch_stats(tiny_config):
    """timm ModelEmaV2 after each update: ema = d * ema + (1 - d) * (params *after* the update), and likewise for
    the BatchNorm running statistics (the step's new ones)."""
    c = tiny_config
    c.ema_decay = 0.9
    c.optimizer.lr = 0.05
    _, state, train_step, batch = _setup(c, use_ema=True)
    before = _copy(state)
    state, _ = train_step(state, batch, jax.random.PRNGKey(1), 0)
    after = _copy(state)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), before.params, after.params)
    assert all(jax.tree.leaves(moved))  # the update changed every param, so old and new params differ
    expect = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, before.ema_params, after.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), after.ema_params, expect)
    expect_bs = jax.tree.map(lambda e, s: 0.9 * e + 0.1 * s, before.ema_batch_stats, after.batch_stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), after.ema_batch_stats, expect_bs)
    assert not np.allclose(after.batch_stats["BatchNorm_0"]["mean"], before.batch_stats["BatchNorm_0"]["mean"])


def test_each_update_draws_fresh_mixup_randoms_from_the_same_base_rng(tiny_config):
    """The step folds ``state.step`` into the base rng: with lr 0 (params fixed) the same batch and base rng give a
    different mixup/cutmix (so a different loss) at step 1 than at step 0, and the same loss when step 0 is
    replayed."""
    c = tiny_config
    c.ema_decay = None
    c.aug.mixup, c.aug.cutmix = 0.8, 1.0
    c.optimizer.lr = c.optimizer.warmup_lr = c.optimizer.min_lr = 0.0
    _, state, train_step, batch = _setup(c, use_ema=False)
    key = jax.random.PRNGKey(3)
    replay = jax.tree.map(jnp.copy, state)
    state, m0 = train_step(state, batch, key, 0)
    _, m0_again = train_step(replay, batch, key, 0)
    _, m1 = train_step(state, batch, key, 1)
    assert float(m0["loss"]) == float(m0_again["loss"])
    assert float(m1["loss"]) != pytest.approx(float(m0["loss"]), rel=1e-4)


def test_mesa_distils_from_the_ema_teacher_in_eval_mode(tiny_config):
    """MESA's term is mesa * 50 * KL(softmax(teacher/3) || softmax(student/3)) with the teacher the EMA weights
    and EMA running statistics in eval mode, and the student the current params in train mode."""
    c = tiny_config
    c.ema_decay = 0.9
    c.mesa, c.mesa_start_ratio = 1.0, 0.25
    c.optimizer.epochs = 4
    c.aug.mixup = c.aug.cutmix = 0.0
    c.aug.label_smoothing = 0.0
    model, state, train_step, batch = _setup(c, use_ema=True)
    # a teacher unlike the student: halved EMA weights, shifted EMA running mean
    state = state.replace(
        ema_params=jax.tree.map(lambda p: p * 0.5, state.ema_params),
        ema_batch_stats=jax.tree.map(lambda s: s + 0.3, state.ema_batch_stats),
    )
    before = _copy(state)
    images = jnp.asarray(batch["image"])
    student, _ = model.apply(
        {"params": before.params, "batch_stats": before.batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    teacher = model.apply({"params": before.ema_params, "batch_stats": before.ema_batch_stats}, images)
    expected = 1.0 * step_lib.MESA_SCALE * float(step_lib.mesa_kl(student, teacher))
    assert step_lib.mesa_active(2, c, 1)
    _, m = train_step(state, batch, jax.random.PRNGKey(1), 2)
    assert expected > 1e-3
    assert float(m["mesa_loss"]) == pytest.approx(expected, rel=1e-4)


def test_logged_lr_is_the_lr_the_update_applied(tiny_config):
    """The step's "lr" metric is the schedule at the update it made: AdamW's first update (no weight decay) moves
    each parameter by lr * g / (|g| + eps), so the largest move equals the logged lr, and it is schedule(0)."""
    c = tiny_config
    c.ema_decay = None
    c.aug.mixup = c.aug.cutmix = 0.0
    c.optimizer.name, c.optimizer.weight_decay = "adamw", 0.0
    c.optimizer.lr, c.optimizer.min_lr, c.optimizer.epochs = 0.01, 0.0, 3
    _, state, train_step, batch = _setup(c, use_ema=False)
    before = _copy(state.params)
    state, m = train_step(state, batch, jax.random.PRNGKey(1), 0)
    moves = jax.tree.map(lambda a, b: np.abs(a - b).max(), _copy(state.params), before)
    schedule = optim.make_schedule(c, 1)
    assert float(schedule(0)) != pytest.approx(float(schedule(1)), rel=1e-3)
    assert float(m["lr"]) == pytest.approx(float(schedule(0)), rel=1e-6)
    assert max(jax.tree.leaves(moves)) == pytest.approx(float(m["lr"]), rel=1e-3)
