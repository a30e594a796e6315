"""benchmarks/mosaic_mlp.py, the Mosaic GPU fc1 + bias + GELU prototype, on the CPU: its GELU against exact GELU, its
shape checks, its tiling choice, and its lowering for CUDA at MambaVision's stage-3/4 MLP shapes (the kernel's
layouts and shared-memory plan are resolved there), and its values under Mosaic GPU's interpret mode."""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import mosaic_mlp  # noqa: E402


def test_gelu_matches_exact_gelu_within_a_microunit():
    x = np.linspace(-8.0, 8.0, 20001)
    got = np.asarray(mosaic_mlp.gelu_erf_as(jnp.asarray(x, jnp.float32)), np.float64)
    exact = 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))
    assert np.max(np.abs(got - exact)) < 1e-6


def test_tiling_splits_the_warpgroups_along_m_where_rows_tile_by_256_else_along_n():
    assert mosaic_mlp.default_tiling(25088, 2048).split == "m"  # B stage 3, batch 128
    assert mosaic_mlp.default_tiling(6272, 4096).split == "n"  # B stage 4: 49 rows an image
    assert mosaic_mlp.Tiling(split="n").cta == (128, 256)


@pytest.mark.parametrize(
    "m, k, n, message",
    [
        (6272, 512, 2048, "M=6272 is not a multiple of its tile 256"),
        (25088, 784, 2048, "K=784"),
        (25088, 512, 3136, "N=3136"),
    ],
)
def test_shapes_that_do_not_tile_are_named(m, k, n, message):
    with pytest.raises(ValueError, match=message):
        mosaic_mlp.check_shape(m, k, n, mosaic_mlp.Tiling(split="m"))


def test_mismatched_operands_are_refused():
    x = jnp.zeros((256, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="do not fit together"):
        mosaic_mlp.dense_gelu(x, jnp.zeros((32, 128), jnp.bfloat16), jnp.zeros((128,)))
    with pytest.raises(ValueError, match="share a dtype"):
        mosaic_mlp.dense_gelu(x, jnp.zeros((64, 128), jnp.float16), jnp.zeros((128,)))


@pytest.mark.parametrize("with_preactivation", [False, True])
@pytest.mark.parametrize("m, k, n", [(25088, 512, 2048), (6272, 1024, 4096), (25088, 320, 1280)])
def test_lowers_for_cuda_at_mambavision_shapes(m, k, n, with_preactivation):
    args = (
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((k, n), jnp.bfloat16),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    f = functools.partial(mosaic_mlp.dense_gelu, with_preactivation=with_preactivation, num_sms=132)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert text.count(f"tensor<{m}x{n}xbf16>") >= (2 if with_preactivation else 1)


@pytest.mark.parametrize(
    "m, k, n, split, with_preactivation",
    [(256, 128, 192, "m", True), (192, 192, 256, "n", True), (128, 64, 128, "m", False)],
)
def test_matches_float64_under_interpret_mode(m, k, n, split, with_preactivation):
    """The kernel's values on fresh random inputs, several tiles an SM (2 simulated SMs, 64-wide tiles, 2 stages)
    against x @ w + b and exact GELU in float64: within bf16's rounding of the outputs (half an ulp at |y| < 8)."""
    tiling = mosaic_mlp.Tiling(tile_m=64, tile_n=64, tile_k=64, stages=2, epilogue_n=32, split=split)
    keys = jax.random.split(jax.random.PRNGKey(m + k + n), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
    b = jax.random.normal(keys[2], (n,), jnp.float32)
    interpret = mosaic_mlp.interpret_params()
    out = mosaic_mlp.dense_gelu(
        x, w, b, with_preactivation=with_preactivation, tiling=tiling, num_sms=2, interpret=interpret
    )
    gelu, pre = out if with_preactivation else (out, None)
    want_pre = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    want_gelu = 0.5 * want_pre * (1.0 + np.vectorize(math.erf)(want_pre / np.sqrt(2.0)))
    assert np.max(np.abs(want_pre)) < 8.0
    assert np.max(np.abs(np.asarray(gelu, np.float64) - want_gelu)) <= 2.0**-5 / 2 + 1e-4
    if with_preactivation:
        assert np.max(np.abs(np.asarray(pre, np.float64) - want_pre)) <= 2.0**-5 / 2 + 1e-4
