"""Behaviour the parity tests cannot see: the stochastic-depth schedule of every variant, DropPath's per-sample mask
and rescaling (training only), each BatchNorm's epsilon (invisible with running variances near 1), and which
dtype each output has in 16-bit compute (the tolerance-based bfloat16 test cannot tell)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mambavision_jax as mvj
from mambavision_jax.models.layers import DropPath
from mambavision_jax.weights import load_state_dict
from official_reference import official, official_model, state_dict_numpy, torch, torch_logits
from test_model import SMALL


def official_drop_path_rates(name: str) -> list[list[float]]:
    """Each block's drop-path probability in the official model ``name`` (its default ``drop_path_rate`` and depths),
    built narrow (dim 8, one head) so that even L3 is cheap; 0 where the official block has an Identity."""
    model = getattr(official, name)(pretrained=False, dim=8, in_dim=8, num_heads=[1, 1, 1, 1])
    return [[float(getattr(block.drop_path, "drop_prob", 0.0)) for block in level.blocks] for level in model.levels]


@pytest.mark.parametrize("name", mvj.list_models())
def test_drop_path_rates_per_block_match_official(name):
    """Each block's stochastic-depth rate equals the official one: the variant's drop_path_rate, spread linearly from
    0 at the first block to the full rate at the last (torch.linspace over all blocks)."""
    levels = mvj.create_model(name).bind({}).levels
    ours = [list(level.drop_path) for level in levels]
    want = official_drop_path_rates(name)
    assert [len(r) for r in ours] == [len(r) for r in want]
    np.testing.assert_allclose(np.concatenate(ours), np.concatenate(want), rtol=1e-6, atol=1e-7, err_msg=name)


def test_drop_path_keeps_whole_samples_rescaled_by_the_keep_probability():
    """DropPath(rate) in training zeroes whole samples and divides the kept ones by 1 - rate (timm's drop_path with
    scale_by_keep), so the expected output is the input; sample_scale gives the same per-sample factors."""
    rate, batch = 0.25, 256
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 3, 5)) + 3.0  # no zeros of its own
    rngs = {"dropout": jax.random.PRNGKey(1)}
    out = np.asarray(DropPath(rate).apply({}, x, deterministic=False, rngs=rngs))
    factor = out / np.asarray(x)
    per_sample = factor.reshape(batch, -1)
    np.testing.assert_allclose(per_sample, per_sample[:, :1] * np.ones_like(per_sample), rtol=1e-6)  # whole samples
    kept = per_sample[:, 0] != 0
    np.testing.assert_allclose(per_sample[kept, 0], 1 / (1 - rate), rtol=1e-6)
    assert 0.15 < 1 - kept.mean() < 0.35, "about rate of the samples dropped"

    scale = np.asarray(DropPath(rate).apply({}, batch, False, rngs=rngs, method=DropPath.sample_scale))
    np.testing.assert_allclose(scale, per_sample[:, 0], rtol=1e-6)  # the same draw and the same factors
    np.testing.assert_array_equal(DropPath(rate).apply({}, x, deterministic=True), x)
    assert jnp.dtype(scale.dtype) == jnp.float32


def test_every_batch_norm_epsilon_matches_official_with_small_running_variances():
    """With running variances of 1e-5 to 1e-4 (the scales shrunk alike, so activations stay O(1)) the BatchNorms'
    epsilons (1e-4 in the stem, 1e-5 in the conv blocks and the final norm) change the output by percents: the
    eval logits still match the official model's."""
    torch_model = official_model("mamba_vision_T", seed=9, **SMALL)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                var = torch.rand(module.running_var.shape, generator=g) * 9e-5 + 1e-5
                module.running_var.copy_(var)
                module.weight.mul_(var.sqrt())
    images = np.random.default_rng(9).standard_normal((2, 64, 64, 3), dtype=np.float32)
    reference = torch_logits(torch_model, images)
    model = mvj.create_model("mamba_vision_T", **SMALL)
    logits = np.asarray(jax.jit(model.apply)(load_state_dict(state_dict_numpy(torch_model), model), images))
    assert np.abs(logits - reference).max() <= 1e-4 * np.abs(reference).max()


def test_bfloat16_compute_runs_every_stage_in_bfloat16_and_returns_float32():
    """dtype=bfloat16: parameters and statistics stay float32, every stage computes (and returns its map) in
    bfloat16, and the pooled features and logits come back as float32, as documented. Traced only (eval_shape)."""
    model = mvj.create_model("mamba_vision_T", **SMALL, dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    apply = lambda method: jax.eval_shape(lambda v, x: model.apply(v, x, method=method), variables, images)
    assert [m.dtype for m in apply(model.forward_intermediates)] == [jnp.bfloat16] * 4
    assert apply(model.forward_features).dtype == jnp.float32
    assert apply(model.__call__).dtype == jnp.float32
