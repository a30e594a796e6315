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


def _timm_cosine_lr(t, *, lr, warmup_lr, min_lr, warmup_t, t_initial):
    """timm ``CosineLRScheduler._get_lr(t)`` (one cycle, warmup_prefix=False), as the official scheduler computes it."""
    if t < warmup_t:
        return warmup_lr + t * (lr - warmup_lr) / warmup_t
    if t // t_initial >= 1:  # past the cycle: the cooldown
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * t / t_initial))


def test_schedule_official_recipe_values():
    spe = 100
    c = _config()
    sched = optim.make_schedule(c, spe)
    lr = lambda s: float(sched(s))
    # the official train.py calls step_update(num_updates=step + 1) before update `step` (0-based)
    official = lambda s: _timm_cosine_lr(s + 1, lr=5e-3, warmup_lr=1e-6, min_lr=5e-6, warmup_t=20 * spe,
                                         t_initial=310 * spe)  # fmt: skip
    for s in (0, 1, 10 * spe, 20 * spe - 2, 20 * spe - 1, 20 * spe, 100 * spe, 310 * spe - 2, 310 * spe - 1,
              310 * spe, 320 * spe - 1):  # fmt: skip
        assert lr(s) == pytest.approx(official(s), rel=1e-5, abs=1e-9), s
    assert lr(0) == pytest.approx(1e-6 + (5e-3 - 1e-6) / (20 * spe))  # the first update is one warmup step in
    # the last warmup update (t = warmup_t) joins the cosine evaluated at t = warmup_t (timm, warmup_prefix=False)
    expected = 5e-6 + 0.5 * (5e-3 - 5e-6) * (1 + np.cos(np.pi * 20 / 310))
    assert lr(20 * spe - 1) == pytest.approx(expected, rel=1e-5)
    assert lr(310 * spe - 1) == pytest.approx(5e-6)  # the last cosine update is at min_lr already
    assert lr(320 * spe - 1) == pytest.approx(5e-6)  # cooldown at min_lr
    assert optim.total_train_steps(c, spe) == 320 * spe
    c.total_steps = 7
    assert optim.total_train_steps(c, spe) == 7
    assert float(optim.make_schedule(c, spe)(20 * spe - 1)) == pytest.approx(expected, rel=1e-5)  # unchanged


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


@pytest.mark.parametrize("sizes", [[(3,)], [(2047,), (2048,), (2049,)], [(), (1,), (4, 5, 6), (0,), (4097, 3)]])
def test_leaf_squared_norms_match_per_leaf_sums(sizes):
    rng = np.random.default_rng(len(sizes))
    leaves = [rng.normal(size=s).astype(np.float32) for s in sizes]
    got = np.asarray(jax.jit(optim.leaf_squared_norms)([jnp.asarray(x) for x in leaves]))
    want = [np.sum(x.astype(np.float64) ** 2) for x in leaves]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    tree = {"a": leaves[0], "b": [jnp.asarray(x) for x in leaves[1:]]}
    assert float(optim.global_norm(tree)) == pytest.approx(np.sqrt(sum(want)), rel=1e-5)


def test_leaf_squared_norms_of_row_segments():
    """A (rows, NORM_ROW) leaf with row segments (the packed small leaves) gives one sum a segment, in order."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(6, optim.NORM_ROW)).astype(np.float32)
    whole = rng.normal(size=(3, 5)).astype(np.float32)
    got = np.asarray(jax.jit(optim.leaf_squared_norms, static_argnums=1)(
        [jnp.asarray(whole), jnp.asarray(rows), jnp.asarray(whole)], (None, (1, 3, 2), None)))
    sq = lambda x: np.sum(x.astype(np.float64) ** 2)  # noqa: E731
    np.testing.assert_allclose(got, [sq(whole), sq(rows[:1]), sq(rows[1:4]), sq(rows[4:]), sq(whole)], rtol=1e-5)


def test_leaf_squared_norms_use_no_scatter_and_a_concatenation_of_their_own():
    # XLA:GPU's scatter-add under contention (a segment sum into ~300 leaves) took 36 of B's 78 ms recipe step.
    jaxpr = jax.make_jaxpr(optim.leaf_squared_norms)([jnp.ones((5000,)), jnp.ones((3, 4))]).jaxpr
    names = [e.primitive.name for e in jaxpr.eqns]
    assert not [n for n in names if n.startswith("scatter")]
    assert names.index("concatenate") < names.index("optimization_barrier") < names.index("reduce_sum")


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_clip_by_global_norm_matches_optax(scale):
    rng = np.random.default_rng(1)
    g = {"w": jnp.asarray(rng.normal(size=(7, 5)) * scale, jnp.float32), "b": jnp.asarray(rng.normal(size=3) * scale)}
    for max_norm in (0.5, 5.0):
        want, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        got, _ = optim.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        for k in g:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)


@pytest.mark.parametrize("norm", [0.5, 3.0, 20.0])
def test_two_global_norm_clips_equal_one_at_the_smaller_bound(norm):
    g = {"w": jnp.full((4,), norm / 2.0)}  # global norm == norm
    two = optax.chain(optax.clip_by_global_norm(5.0), optax.clip_by_global_norm(1.0))
    want, _ = two.update(g, two.init(g))
    got, _ = optim.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)


def _timm_lamb_reference(params, grad_steps, lrs, *, clip, max_grad_norm, b1, b2, eps, wd, decayed):
    """timm's train.py global-norm clip followed by ``timm.optim.Lamb`` (bias correction, grad averaging,
    max_grad_norm, trust ratio on the decayed group only), in float64 NumPy."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t, (grads, lr) in enumerate(zip(grad_steps, lrs), start=1):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        if norm > clip:  # torch.nn.utils.clip_grad_norm_
            g = {k: x * clip / norm for k, x in g.items()}
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        divisor = norm / max_grad_norm if norm > max_grad_norm else 1.0
        for k in p:
            gk = g[k] / divisor
            m[k] = b1 * m[k] + (1 - b1) * gk
            v2[k] = b2 * v2[k] + (1 - b2) * gk * gk
            update = (m[k] / (1 - b1**t)) / (np.sqrt(v2[k]) / np.sqrt(1 - b2**t) + eps)
            if decayed[k]:
                update = update + wd * p[k]
                w_norm, u_norm = np.linalg.norm(p[k]), np.linalg.norm(update)
                update = update * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            p[k] = p[k] - lr * update
        out.append({k: x.copy() for k, x in p.items()})
    return out


def test_lamb_matches_timm_lamb_reference():
    """The LAMB chain (one fused clip, fused trust-ratio norms) against timm's algorithm over 4 steps whose
    gradient norms fall below, between and above the two clip bounds; a zero weight matrix checks ratio 1."""
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(6, 5)).astype(np.float32),
        "zero_kernel": np.zeros((3, 4), np.float32),
        "bias": rng.normal(size=(5,)).astype(np.float32),
        "scale": np.ones((7,), np.float32),
    }
    c = _config(warmup_epochs=0, lr=0.02, min_lr=0.02, weight_decay=0.05)
    tx, schedule = optim.make_optimizer(c, 10, params)
    grad_norms = [0.3, 2.0, 12.0, 0.9]
    grad_steps = []
    for norm in grad_norms:
        g = {k: rng.normal(size=v.shape) for k, v in params.items()}
        total = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        grad_steps.append({k: (x * norm / total).astype(np.float32) for k, x in g.items()})
    lrs = [float(schedule(i)) for i in range(len(grad_steps))]
    want = _timm_lamb_reference(
        params,
        grad_steps,
        lrs,
        clip=5.0,
        max_grad_norm=1.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        wd=0.05,
        decayed={"kernel": True, "zero_kernel": True, "bias": False, "scale": False},
    )
    state, p = tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for g, expected in zip(grad_steps, want):
        p, state = step(p, state, {k: jnp.asarray(v) for k, v in g.items()})
        for k in params:
            np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=2e-5, atol=1e-7, err_msg=k)
    assert np.any(np.asarray(p["zero_kernel"]) != 0)  # the zero matrix moved (trust ratio 1, not 0 or nan)


def test_trust_ratio_needs_params():
    tx = optim.scale_by_trust_ratio({"w": True})
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update({"w": jnp.ones((2, 2))}, tx.init(None))


def test_lamb_without_weight_decay_adapts_no_leaf():
    """timm builds one group with weight_decay=0 when the weight decay is 0, and Lamb takes the trust ratio only
    where ``weight_decay != 0`` (always_adapt=False): with weight_decay=0 every leaf takes the plain clipped Adam
    step, matrices included."""
    rng = np.random.default_rng(5)
    params = {
        "kernel": (3.0 * rng.normal(size=(6, 5))).astype(np.float32),
        "bias": rng.normal(size=(5,)).astype(np.float32),
    }
    c = _config(warmup_epochs=0, lr=0.02, min_lr=0.02, weight_decay=0.0)
    tx, schedule = optim.make_optimizer(c, 10, params)
    grad_steps = [{k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()} for _ in "ab"]
    lrs = [float(schedule(i)) for i in range(len(grad_steps))]
    want = _timm_lamb_reference(
        params, grad_steps, lrs, clip=5.0, max_grad_norm=1.0, b1=0.9, b2=0.999, eps=1e-8, wd=0.0,
        decayed={"kernel": False, "bias": False},
    )
    state, p = tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}
    for g, expected in zip(grad_steps, want):
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
        for k in params:
            np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name, nesterov", [("sgd", True), ("momentum", False)])
def test_sgd_names_follow_timm_nesterov(name, nesterov):
    """timm: 'sgd' is Nesterov momentum SGD, 'momentum' plain (heavy-ball) momentum SGD. One step from zero momentum
    with gradient g moves by lr * g plainly and by lr * (1 + momentum) * g with Nesterov."""
    c = _config(name=name, weight_decay=0.0, warmup_epochs=0, lr=0.1, min_lr=0.1, clip_grad_norm=0.0, momentum=0.9)
    params = {"w": jnp.ones((2, 2))}
    tx, _ = optim.make_optimizer(c, 10, params)
    updates, _ = tx.update({"w": jnp.full((2, 2), 0.5)}, tx.init(params), params)
    step = 0.1 * 0.5 * (1.9 if nesterov else 1.0)
    np.testing.assert_allclose(np.asarray(updates["w"]), -step, rtol=1e-6)


@pytest.mark.parametrize(
    "key, value",
    [("epochs", 0), ("epochs", -3), ("warmup_epochs", -1), ("cooldown_epochs", -1), ("lr", -1e-3),
     ("warmup_lr", -1e-6), ("min_lr", -5e-6), ("epochs", float("nan"))],
)  # fmt: skip
def test_bad_schedule_values_are_named(key, value):
    with pytest.raises(ValueError, match=f"config.optimizer.{key} must be"):
        optim.make_schedule(_config(**{key: value}), 100)


@pytest.mark.parametrize("total", [0, -5])
def test_a_total_steps_not_above_zero_is_named(total):
    c = _config()
    c.total_steps = total
    with pytest.raises(ValueError, match="config.total_steps must be > 0"):
        optim.total_train_steps(c, 100)
