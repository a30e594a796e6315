"""benchmarks/mosaic_mlp.py, the Mosaic GPU fc1 + bias + GELU prototype, on the CPU: its GELU against exact GELU, its
shape checks, its tiling choice, and its lowering for CUDA at MambaVision's stage-3/4 MLP shapes (the kernel's
layouts and shared-memory plan are resolved there; its numerics need the card, see the module docstring)."""

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
