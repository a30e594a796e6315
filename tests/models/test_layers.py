"""``models.layers.BatchNorm``: flax's variables, torch's running-statistics update, and the hand-written VJP of
``batch_norm_train`` against float64 autodiff of the plain formula."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.models.layers import BatchNorm, batch_norm_train

EPSILON = 1e-5


def _inputs(shape, seed):
    """Activations off zero mean and unit scale, randomised affine parameters and running statistics."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = rng.normal(0.5, 2.0, shape).astype(np.float32) + rng.normal(0, 1, channels).astype(np.float32)
    variables = {
        "params": {"scale": rng.uniform(0.5, 1.5, channels), "bias": rng.normal(0, 0.3, channels)},
        "batch_stats": {"mean": rng.normal(0, 0.5, channels), "var": rng.uniform(0.5, 2.0, channels)},
    }
    return jnp.asarray(x), jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)


def test_variables_and_outputs_match_flax_batch_norm():
    """Same variable tree as nn.BatchNorm (so checkpoints and the key map carry over), same outputs in eval and in
    training, same running mean."""
    x, variables = _inputs((4, 5, 6, 24), seed=0)
    ours = BatchNorm(EPSILON)
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=EPSILON, param_dtype=jnp.float32)
    shapes = lambda v: jax.tree.map(lambda a: (a.shape, a.dtype), v)  # noqa: E731
    assert shapes(ours.init(jax.random.key(0), x, True)) == shapes(flax_bn.init(jax.random.key(0), x, True))

    np.testing.assert_allclose(
        ours.apply(variables, x, False), flax_bn.apply(variables, x, use_running_average=True), rtol=1e-6, atol=1e-6
    )
    y, new = ours.apply(variables, x, True, mutable=["batch_stats"])
    y_flax, new_flax = flax_bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["mean"], new_flax["batch_stats"]["mean"], rtol=1e-6, atol=1e-6)


def test_running_statistics_update_as_torch():
    """running = 0.9 running + 0.1 batch statistic, the variance unbiased (torch.nn.BatchNorm2d's update; flax's
    nn.BatchNorm would use the biased one)."""
    x, variables = _inputs((2, 3, 2, 8), seed=1)
    _, new = BatchNorm(EPSILON).apply(variables, x, True, mutable=["batch_stats"])
    flat = np.asarray(x, np.float64).reshape(-1, 8)
    old = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    np.testing.assert_allclose(new["batch_stats"]["mean"], 0.9 * old["mean"] + 0.1 * flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 * old["var"] + 0.1 * flat.var(0, ddof=1), rtol=1e-5)


def test_init_leaves_statistics_and_eval_leaves_them_alone():
    x, variables = _inputs((2, 4, 4, 8), seed=2)
    fresh = BatchNorm(EPSILON).init(jax.random.key(0), x, True)
    np.testing.assert_array_equal(fresh["batch_stats"]["mean"], np.zeros(8))
    np.testing.assert_array_equal(fresh["batch_stats"]["var"], np.ones(8))
    _, new = BatchNorm(EPSILON).apply(variables, x, False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, new["batch_stats"], variables["batch_stats"])


def _plain_batch_norm(x, scale, bias):
    """The textbook formula, for autodiff: x̂·scale + bias with the batch's biased variance."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean((x - mean) ** 2, axes)
    return (x - mean) / jnp.sqrt(var + EPSILON) * scale + bias


@pytest.mark.parametrize("shape", [(3, 5, 7, 16), (2, 9, 33), (11, 4)])
def test_vjp_matches_float64_autodiff(shape):
    x, variables = _inputs(shape, seed=sum(shape))
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    cotangent = jnp.asarray(np.random.default_rng(3).normal(0, 1, shape).astype(np.float32))
    y, vjp = jax.vjp(lambda *a: batch_norm_train(*a, EPSILON, jnp.float32), x, scale, bias)
    grads = vjp(cotangent)
    with jax.enable_x64():
        wide = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, scale, bias, cotangent)]
        y_ref, vjp_ref = jax.vjp(_plain_batch_norm, *wide[:3])
        grads_ref = [np.asarray(g) for g in vjp_ref(wide[3])]
        y_ref = np.asarray(y_ref)
    np.testing.assert_allclose(y, y_ref, atol=2e-6 * np.abs(y_ref).max())
    for name, g, r in zip(("x", "scale", "bias"), grads, grads_ref):
        assert g.dtype == jnp.float32, name
        np.testing.assert_allclose(g, r, atol=1e-5 * np.abs(r).max(), err_msg=name)


def test_bfloat16_activations_keep_their_dtype():
    """bf16 in, bf16 out and bf16 dx; statistics and parameter gradients float32, within bf16 rounding of float32."""
    x, variables = _inputs((4, 6, 6, 32), seed=4)
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    cotangent = jnp.asarray(np.random.default_rng(5).normal(0, 1, x.shape).astype(np.float32))
    x16 = x.astype(jnp.bfloat16)
    y16, vjp16 = jax.vjp(lambda *a: batch_norm_train(*a, EPSILON, jnp.bfloat16), x16, scale, bias)
    grads16 = vjp16(cotangent.astype(jnp.bfloat16))
    y32, vjp32 = jax.vjp(lambda *a: batch_norm_train(*a, EPSILON, jnp.float32), x16.astype(jnp.float32), scale, bias)
    grads32 = vjp32(cotangent.astype(jnp.bfloat16).astype(jnp.float32))
    assert y16.dtype == jnp.bfloat16 and grads16[0].dtype == jnp.bfloat16
    assert grads16[1].dtype == grads16[2].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=1e-2 * np.abs(y32).max())
    for g16, g32 in zip(grads16, grads32):
        np.testing.assert_allclose(np.asarray(g16, np.float32), g32, atol=1e-2 * np.abs(g32).max())


def test_one_value_per_channel_is_refused_in_training():
    x, variables = _inputs((1, 1, 1, 8), seed=6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm(EPSILON).apply(variables, x, True, mutable=["batch_stats"])
    assert BatchNorm(EPSILON).apply(variables, x, False).shape == x.shape


def test_drop_path_rate_one_drops_every_branch_with_finite_gradients():
    """DropPath(1.0) (the last block's rate for drop_path_rate=1.0) drops every sample as timm's does: zero output,
    zero (not NaN) gradients, and a zero factor for the fused path (was x / 0: NaN gradients; 1 / 0 raised)."""
    from mambavision_jax.models.layers import DropPath

    x = jnp.ones((4, 3, 2))
    rngs = {"dropout": jax.random.PRNGKey(0)}
    out = lambda v: DropPath(1.0).apply({}, v, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(out(x), 0.0)
    np.testing.assert_array_equal(jax.grad(lambda v: out(v).sum())(x), 0.0)
    scale = DropPath(1.0).apply({}, 4, False, rngs=rngs, method=DropPath.sample_scale)
    np.testing.assert_array_equal(scale, np.zeros(4, np.float32))
