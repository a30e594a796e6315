"""Model behaviour that the parity tests do not cover: layout helpers, input checks, train mode, backbone API."""

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
    tokens, padded = window_partition(x, 2)
    assert padded == (4, 6) and tokens.shape == (6, 4, 1)
    np.testing.assert_array_equal(tokens[0, :, 0], [0, 1, 5, 6])  # window (0,0): rows 0-1, cols 0-1
    np.testing.assert_array_equal(tokens[2, :, 0], [4, 0, 9, 0])  # window (0,2): col 4 then padding
    np.testing.assert_array_equal(tokens[3, :, 0], [10, 11, 0, 0])  # window (1,0): row 2 then padding
    np.testing.assert_array_equal(window_reverse(tokens, 2, padded, (3, 5)), x)


def test_stage_shapes_and_features(small):
    model, variables, images = small
    maps = model.apply(variables, images, method=model.forward_intermediates)
    assert [m.shape for m in maps] == [(4, 16, 16, 16), (4, 8, 8, 32), (4, 4, 4, 64), (4, 2, 2, 128)]
    pooled = model.apply(variables, images, method=model.forward_features)
    assert pooled.shape == (4, 128)
    assert model.apply(variables, images).shape == (4, 5)


def test_headless_model_returns_pooled_features(small):
    _, variables, images = small
    headless = mvj.create_model("mamba_vision_T", **{**SMALL, "num_classes": 0})
    params = {k: v for k, v in variables["params"].items() if k != "head"}
    out = headless.apply({"params": params, "batch_stats": variables["batch_stats"]}, images)
    assert out.shape == (4, 128)


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
    "backend,dtype,head_dim,train,expected",
    [
        ("gpu", jnp.bfloat16, 40, False, "cudnn"),
        ("gpu", jnp.bfloat16, 40, True, "xla"),  # cuDNN's fused backward refuses MambaVision's length-49 windows
        ("gpu", jnp.bfloat16, 49, False, "xla"),  # head_dim not a multiple of 8 (the L variants)
        ("gpu", jnp.float32, 40, False, "xla"),
        ("cpu", jnp.bfloat16, 40, False, "xla"),
    ],
)
def test_attention_auto_implementation(monkeypatch, backend, dtype, head_dim, train, expected):
    from mambavision_jax.models.mamba_vision import Attention

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert Attention(dim=4 * head_dim, num_heads=4, dtype=dtype)._implementation(head_dim, train) == expected
    with pytest.raises(ValueError, match="attention_impl"):
        Attention(dim=8, num_heads=1, attention_impl="flash")._implementation(8, False)
