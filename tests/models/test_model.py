"""Model behaviour that the parity tests do not cover: layout helpers, input checks, train mode, backbone API."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mambavision_jax as mvj
from mambavision_jax.models.layers import window_partition, window_reverse
from mambavision_jax.models.mamba_vision import attention_block_indices

SMALL = dict(depths=(1, 1, 2, 2), dim=16, in_dim=8, num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2), num_classes=5)


@pytest.fixture(scope="module")
def small():
    model = mvj.create_model("mamba_vision_T", **SMALL, drop_path_rate=0.5)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 3))
    return model, model.init(jax.random.PRNGKey(0), images), images


@pytest.mark.parametrize(
    "depth,expected", [(8, [4, 5, 6, 7]), (5, [3, 4]), (11, [6, 7, 8, 9, 10]), (4, [2, 3]), (1, []), (2, [1])]
)
def test_attention_blocks_are_the_second_half(depth, expected):
    assert list(attention_block_indices(depth)) == expected


def test_window_partition_row_major_with_right_bottom_padding():
    x = jnp.arange(1 * 3 * 5 * 1, dtype=jnp.float32).reshape(1, 3, 5, 1)
    tokens, layout = window_partition(x, 2)
    assert layout == (1, 4, 6) and tokens.shape == (6, 4, 1)
    np.testing.assert_array_equal(tokens[0, :, 0], [0, 1, 5, 6])  # window (0,0): rows 0-1, cols 0-1
    np.testing.assert_array_equal(tokens[2, :, 0], [4, 0, 9, 0])  # window (0,2): col 4 then padding
    np.testing.assert_array_equal(tokens[3, :, 0], [10, 11, 0, 0])  # window (1,0): row 2 then padding
    np.testing.assert_array_equal(window_reverse(tokens, 2, layout, (3, 5)), x)


def test_stage_shapes_and_features(small):
    model, variables, images = small
    maps = model.apply(variables, images, method=model.forward_intermediates)
    assert [m.shape for m in maps] == [(4, 16, 16, 16), (4, 8, 8, 32), (4, 4, 4, 64), (4, 2, 2, 128)]
    pooled = model.apply(variables, images, method=model.forward_features)
    assert pooled.shape == (4, 128)
    assert model.apply(variables, images).shape == (4, 5)


def test_headless_model_returns_pooled_features(small):
    model, variables, images = small
    headless = mvj.create_model("mamba_vision_T", **{**SMALL, "num_classes": 0})
    params = {k: v for k, v in variables["params"].items() if k != "head"}
    out = headless.apply({"params": params, "batch_stats": variables["batch_stats"]}, images)
    assert out.shape == (4, 128)
    head = variables["params"]["head"]  # the values the full model's head classifies, not just their shape
    logits = model.apply(variables, images)
    np.testing.assert_allclose(out @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5)


def test_train_mode_drop_path_and_batch_stats(small):
    model, variables, images = small
    run = lambda seed: model.apply(
        variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(seed)}, mutable=["batch_stats"]
    )
    (a, state_a), (b, _) = run(0), run(1)
    assert not np.allclose(a, b), "drop path must make train-mode outputs depend on the dropout rng"
    assert not np.allclose(state_a["batch_stats"]["norm"]["mean"], variables["batch_stats"]["norm"]["mean"])
    np.testing.assert_array_equal(model.apply(variables, images), model.apply(variables, images))


@pytest.mark.parametrize(
    "shape,dtype,message",
    [
        ((64, 64, 3), jnp.float32, "rank 4"),
        ((2, 3, 64, 64), jnp.float32, "NCHW"),
        ((2, 64, 64, 1), jnp.float32, "3 channels"),
        ((2, 64, 64, 3), jnp.uint8, "floating-point"),
    ],
)
def test_bad_images_are_refused(small, shape, dtype, message):
    model, variables, _ = small
    with pytest.raises(ValueError, match=message):
        model.apply(variables, jnp.zeros(shape, dtype))


@pytest.mark.parametrize(
    "backend,dtype,head_dim,length,train,expected",
    [
        ("gpu", jnp.bfloat16, 40, 49, False, "cudnn"),
        ("gpu", jnp.bfloat16, 40, 196, True, "cudnn"),
        ("gpu", jnp.bfloat16, 40, 49, True, "xla"),  # cuDNN's fused backward refuses odd lengths (stage-4 windows)
        ("gpu", jnp.bfloat16, 49, 196, False, "xla"),  # head_dim not a multiple of 8 (the L variants)
        ("gpu", jnp.float32, 40, 196, False, "xla"),
        ("cpu", jnp.bfloat16, 40, 196, False, "xla"),
    ],
)
def test_attention_auto_implementation(monkeypatch, backend, dtype, head_dim, length, train, expected):
    from mambavision_jax.models.mamba_vision import Attention

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert Attention(dim=4 * head_dim, num_heads=4, dtype=dtype)._implementation(head_dim, length, train) == expected
    with pytest.raises(ValueError, match="attention_impl"):
        Attention(dim=8, num_heads=1, attention_impl="flash")._implementation(8, 49, False)


@pytest.mark.parametrize(
    "backend,dtype,setting,expected",
    [
        ("gpu", jnp.bfloat16, None, 8),
        ("gpu", jnp.float16, None, 8),
        ("gpu", jnp.float32, None, 1),
        ("cpu", jnp.bfloat16, None, 1),
        ("cpu", jnp.float32, 4, 4),
    ],
)
def test_conv_channel_multiple_auto(monkeypatch, backend, dtype, setting, expected):
    from mambavision_jax.models.mamba_vision import conv_channel_multiple

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert conv_channel_multiple(setting, dtype) == expected
    with pytest.raises(ValueError, match="conv_channel_multiple"):
        conv_channel_multiple(0, dtype)


def test_padded_conv_channels_give_the_same_model_and_gradients():
    """dim 20 (stage 1 at 20 channels, like L's 196) with convs padded to multiples of 8: same parameters,
    same logits, same gradients and BN statistics as unpadded; the lowered program convolves 24 channels."""
    arch = dict(SMALL, dim=20, in_dim=12, num_heads=(1, 2, 2, 4))
    plain = mvj.create_model("mamba_vision_T", **arch, conv_channel_multiple=1)
    padded = mvj.create_model("mamba_vision_T", **arch, conv_channel_multiple=8)
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 64, 64, 3))
    variables = plain.init(jax.random.PRNGKey(0), images)
    assert jax.tree.map(jnp.shape, padded.init(jax.random.PRNGKey(0), images)) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_allclose(padded.apply(variables, images), plain.apply(variables, images), rtol=1e-5, atol=1e-5)

    (grads_p, stats_p), (grads_u, stats_u) = [
        jax.grad(training_loss, argnums=1, has_aux=True)(m, variables["params"], variables, images)
        for m in (padded, plain)
    ]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads_p, grads_u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats_p, stats_u)
    assert conv_channel_counts(plain, variables, images) & {12, 20}, "the unpadded model convolves 12 and 20"
    assert all(c < 8 or c % 8 == 0 for c in conv_channel_counts(padded, variables, images))


def training_loss(model, params, variables, images):
    """(sum of squared logits, new BN statistics) in train mode with ``params`` in ``variables``, drop path drawn
    from a fixed key."""
    logits, new = model.apply(
        {**variables, "params": params},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(3)},
    )
    return jnp.sum(logits**2), new["batch_stats"]


def conv_channel_counts(model, variables, images) -> set:
    """Every input and output channel count of the convolutions in the lowered program."""
    hlo = jax.jit(model.apply).lower(variables, images).as_text()
    kernels = re.findall(r"convolution.*tensor<3x3x(\d+)x(\d+)x", hlo)
    assert kernels, "no 3x3 convolution found in the lowered program"
    return {int(c) for pair in kernels for c in pair}


def test_gelu_erf_matches_torch_formula_and_jax_gradient():
    """gelu_erf computes torch.nn.GELU()'s x/2 (1 + erf(x/√2)) (float64 math.erf reference), keeps the dtype, and
    has jax.nn.gelu's exact gradient."""
    import math

    from mambavision_jax.models.layers import gelu_erf

    x = np.concatenate([np.linspace(-9, 9, 1001), np.random.default_rng(0).normal(0, 3, 1000)]).astype(np.float32)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(
        gelu_erf(jnp.asarray(x)), want, rtol=2e-6, atol=1e-6
    )  # 1 + erf cancels for x << 0, as in torch
    assert gelu_erf(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
    grad = jax.vmap(jax.grad(gelu_erf))(jnp.asarray(x))
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=2e-6)


def test_pallas_blocks_give_the_same_model_and_gradients():
    """norm_impl="pallas" (LayerNorms with the residual updates), the kernels in interpret mode off a GPU: the same
    parameters, logits and, in training with layer scale and drop path drawn from the same RNG, the same loss
    gradients and BN statistics as the XLA blocks. 8 images of 32² make 128 and 32 token rows in stages 3 and 4, so
    every block takes the fused path, which the traced program shows."""
    arch = dict(SMALL, layer_scale=0.5, drop_path_rate=0.3)
    xla = mvj.create_model("mamba_vision_T", **arch)
    model = mvj.create_model("mamba_vision_T", **arch, norm_impl="pallas")
    images = jax.random.normal(jax.random.PRNGKey(2), (8, 32, 32, 3))
    variables = xla.init(jax.random.PRNGKey(0), images)
    assert jax.tree.map(jnp.shape, model.init(jax.random.PRNGKey(0), images)) == jax.tree.map(jnp.shape, variables)
    logits = [jax.jit(m.apply)(variables, images) for m in (model, xla)]
    np.testing.assert_allclose(*logits, atol=2e-5)

    gradient = jax.jit(jax.grad(training_loss, argnums=1, has_aux=True), static_argnums=0)
    (grads_f, stats_f), (grads_x, stats_x) = [gradient(m, variables["params"], variables, images) for m in (model, xla)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), grads_f, grads_x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats_f, stats_x)
    traced = str(jax.make_jaxpr(model.apply)(variables, images))
    # each of the 4 blocks of stages 3 and 4: two fused LayerNorms
    assert traced.count("name=add_layer_norm_fwd") == traced.count("pallas_call[") == 8


def test_unknown_norm_impl_is_refused():
    images = jnp.zeros((1, 64, 64, 3))
    with pytest.raises(ValueError, match="norm_impl must be one of xla, pallas"):
        mvj.create_model("mamba_vision_T", **SMALL, norm_impl="cuda").init(jax.random.PRNGKey(0), images)


def test_mosaic_mlps_give_the_same_model_and_gradients():
    """mlp_impl="mosaic" (the MLPs' GELU fused into Mosaic GPU GEMMs), the kernels under Mosaic GPU's interpreter off
    a GPU: the same parameters, and bf16 logits and training gradients as close to the float32 model's as the XLA
    MLPs' bf16 ones are (all gradients together, and each MLP parameter's). 8 images of 32² make 128 token rows in
    stage 3 (the kernels: 128 x 256 CTA tiles) and 32 in stage 4 (they do not tile: XLA there), which the traced
    program shows."""
    bf16 = dict(SMALL, dtype=jnp.bfloat16, drop_path_rate=0.3)
    xla, model = (mvj.create_model("mamba_vision_T", **bf16, mlp_impl=impl) for impl in ("xla", "mosaic"))
    exact = mvj.create_model("mamba_vision_T", **SMALL, drop_path_rate=0.3)
    images = jax.random.normal(jax.random.PRNGKey(2), (8, 32, 32, 3))
    variables = exact.init(jax.random.PRNGKey(0), images)
    assert jax.tree.map(jnp.shape, model.init(jax.random.PRNGKey(0), images)) == jax.tree.map(jnp.shape, variables)

    def error(got, want):
        got, want = (np.asarray(a, np.float32) for a in (got, want))
        return np.linalg.norm(got - want) / np.linalg.norm(want)

    def logits_and_gradients(m):  # one program a model
        return m.apply(variables, images), jax.grad(training_loss, argnums=1, has_aux=True)(
            m, variables["params"], variables, images
        )[0]

    outputs = {name: jax.jit(logits_and_gradients, static_argnums=0)(m) for name, m in
               (("mosaic", model), ("xla", xla), ("f32", exact))}
    logits = {name: out[0] for name, out in outputs.items()}
    grads = {name: out[1] for name, out in outputs.items()}
    assert error(logits["mosaic"], logits["f32"]) <= 1.5 * error(logits["xla"], logits["f32"]) + 1e-3
    flat = {name: np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree.leaves(tree)])
            for name, tree in grads.items()}
    assert error(flat["mosaic"], flat["f32"]) <= 1.5 * error(flat["xla"], flat["f32"]) + 1e-3
    for (path, want), got, ref in zip(
        jax.tree_util.tree_leaves_with_path(grads["f32"]), *(jax.tree.leaves(grads[k]) for k in ("mosaic", "xla"))
    ):
        if "mlp" in jax.tree_util.keystr(path):  # the kernels' own parameters, leaf by leaf
            assert error(got, want) <= 1.5 * error(ref, want) + 2e-3, jax.tree_util.keystr(path)
    traced = str(jax.make_jaxpr(model.apply)(variables, images))
    assert traced.count("wgmma_accumulator_deref") == 2  # one fc1 kernel a stage-3 block; stage 4 on XLA


def test_mosaic_mlps_refuse_float32_compute_and_unknown_impls():
    images = jnp.zeros((1, 64, 64, 3))
    with pytest.raises(ValueError, match="mlp_impl='mosaic' needs a 16-bit compute dtype; got float32"):
        mvj.create_model("mamba_vision_T", **SMALL, mlp_impl="mosaic").init(jax.random.PRNGKey(0), images)
    with pytest.raises(ValueError, match="mlp_impl must be one of xla, mosaic"):
        mvj.create_model("mamba_vision_T", **SMALL, mlp_impl="triton").init(jax.random.PRNGKey(0), images)


def test_num_heads_not_dividing_the_channels_is_named():
    """A num_heads override that does not divide a stage's channels is refused naming it (was a reshape error)."""
    model = mvj.create_model("mamba_vision_T", **{**SMALL, "num_heads": (1, 2, 3, 4)})
    with pytest.raises(ValueError, match="num_heads 3 .* 64 channels"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_drop_rate_drops_the_attention_projection_in_training():
    """drop_rate is also the official Attention's proj_drop: in training about that share of each attention mixer's
    outputs is zero, in eval none; the Mamba mixers (blocks_0 of stages 3-4 here) have no dropout."""
    model = mvj.create_model("mamba_vision_T", **SMALL, drop_rate=0.5, drop_path_rate=0.0)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))  # whole windows: no padded (zero) tokens
    variables = model.init(jax.random.PRNGKey(0), images)

    def zero_share(train, level, block):
        _, state = model.apply(
            variables,
            images,
            train=train,
            rngs={"dropout": jax.random.PRNGKey(2)},
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: module.name == "mixer",
        )
        out = state["intermediates"][level][block]["mixer"]["__call__"][0]
        return float(np.mean(np.asarray(out) == 0))

    for level in ("levels_2", "levels_3"):
        assert 0.4 < zero_share(True, level, "blocks_1") < 0.6, level
        assert zero_share(False, level, "blocks_1") == 0 and zero_share(True, level, "blocks_0") == 0, level
