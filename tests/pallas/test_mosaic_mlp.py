"""mambavision_jax.pallas.mosaic_mlp, the MLP with GELU fused into Mosaic GPU GEMMs, on the CPU: its GELU and GELU'
against exact ones, its tiling choice and shape errors, its lowering for CUDA at MambaVision's stage-3/4 MLP shapes
(the kernels' layouts and shared-memory plans are resolved there), and the kernels' values and the MLP's gradients
under Mosaic GPU's interpret mode against float64."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.pallas import mosaic_mlp

SMALL = mosaic_mlp.Tiling(tile_m=64, tile_n=64, tile_k=64, stages=2, epilogue_n=32, snake=2)
BF16_HALF_ULP_BELOW_8 = 2.0**-5 / 2
_erf = np.vectorize(math.erf)


def _gelu64(x):
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _gelu_grad64(x):
    return 0.5 * (1.0 + _erf(x / np.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def test_gelu_and_its_gradient_match_exact_ones_within_a_microunit():
    x = np.linspace(-8.0, 8.0, 20001)
    x32 = jnp.asarray(x, jnp.float32)
    assert np.max(np.abs(np.asarray(mosaic_mlp.gelu_erf_as(x32), np.float64) - _gelu64(x))) < 1e-6
    assert np.max(np.abs(np.asarray(mosaic_mlp.gelu_erf_grad_as(x32), np.float64) - _gelu_grad64(x))) < 1e-6


def test_tiling_splits_the_warpgroups_along_m_where_rows_tile_by_256_else_along_n():
    assert mosaic_mlp.default_tiling(25088, 2048).split == "m"  # B stage 3, batch 128
    assert mosaic_mlp.default_tiling(6272, 4096).split == "n"  # B stage 4: 49 rows an image
    assert mosaic_mlp.Tiling(split="n").cta == (128, 256)


def test_tiling_error_names_the_mlps_that_do_not_tile():
    def error(rows, dim, hidden, backward=False):
        return mosaic_mlp.tiling_error(rows, dim, hidden, mosaic_mlp.default_tiling(rows, hidden, backward))

    for backward in (False, True):
        assert error(128 * 196, 512, 2048, backward) is None  # B stage 3 at batch 128
        assert error(128 * 49, 640, 2560, backward) is None  # T stage 4
    assert "M=1568" in error(8 * 196, 512, 2048)  # 8 images: neither 128 nor 256 divides the rows
    assert "K=196" in error(128 * 196, 196, 1024)  # L-like channels


@pytest.mark.parametrize(
    "m, k, n, message",
    [
        (6272, 512, 2048, "M=6272 is not a multiple of its tile 256"),
        (25088, 784, 2048, "K=784"),
        (25088, 512, 3136, "N=3136"),
    ],
)
def test_shapes_that_do_not_tile_are_named(m, k, n, message):
    x = jnp.zeros((m, k), jnp.bfloat16)
    with pytest.raises(ValueError, match=message):
        mosaic_mlp.dense_gelu(x, jnp.zeros((k, n), jnp.bfloat16), jnp.zeros((n,)), tiling=mosaic_mlp.Tiling())


def test_mismatched_operands_are_refused():
    x = jnp.zeros((256, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="do not fit together"):
        mosaic_mlp.dense_gelu(x, jnp.zeros((32, 128), jnp.bfloat16), jnp.zeros((128,)))
    with pytest.raises(ValueError, match="share a 16-bit dtype"):
        mosaic_mlp.dense_gelu(x, jnp.zeros((64, 128), jnp.float16), jnp.zeros((128,)))
    with pytest.raises(ValueError, match="does not fit w"):
        mosaic_mlp.dense_gelu(x, jnp.zeros((64, 128), jnp.bfloat16), jnp.zeros((64,)))
    with pytest.raises(ValueError, match="h .* does not fit"):
        mosaic_mlp.matmul_gelu_grad(x, jnp.zeros((64, 128), jnp.bfloat16), jnp.zeros((256, 64), jnp.bfloat16))


def _lowered(f, *shapes):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("m, k, n", [(25088, 512, 2048), (6272, 1024, 4096), (25088, 320, 1280), (6272, 640, 2560)])
def test_both_kernels_lower_for_cuda_at_mambavision_shapes(m, k, n):
    bf16 = jnp.bfloat16
    for pre in (False, True):
        f = functools.partial(mosaic_mlp.dense_gelu, with_preactivation=pre, num_sms=132)
        text = _lowered(f, ((m, k), bf16), ((k, n), bf16), ((n,), jnp.float32))
        assert "mosaic_gpu" in text
        assert text.count(f"tensor<{m}x{n}xbf16>") >= (2 if pre else 1)
    f = functools.partial(mosaic_mlp.matmul_gelu_grad, num_sms=132)
    text = _lowered(f, ((m, k), bf16), ((k, n), bf16), ((m, n), bf16))
    assert "mosaic_gpu" in text
    assert f"tensor<{m}x{n}xbf16>" in text


def _normal(key, shape, scale=1.0):
    return (scale * jax.random.normal(key, shape)).astype(jnp.bfloat16)


@pytest.mark.parametrize(
    "m, k, n, split, with_preactivation",
    [(256, 128, 192, "m", True), (192, 192, 256, "n", True), (128, 64, 128, "m", False)],
)
def test_dense_gelu_matches_float64_under_interpret_mode(m, k, n, split, with_preactivation):
    """Values on fresh random inputs, several tiles an SM (2 simulated SMs, 64-wide tiles, 2 stages), against
    x @ w + b and exact GELU in float64: within bf16's rounding of the outputs (half an ulp at |y| < 8)."""
    keys = jax.random.split(jax.random.PRNGKey(m + k + n), 3)
    x, w = _normal(keys[0], (m, k)), _normal(keys[1], (k, n), 1 / np.sqrt(k))
    b = jax.random.normal(keys[2], (n,), jnp.float32)
    tiling = SMALL if split == "m" else mosaic_mlp.Tiling(**{**SMALL.__dict__, "split": "n"})
    out = mosaic_mlp.dense_gelu(x, w, b, with_preactivation=with_preactivation, tiling=tiling, num_sms=2,
                                interpret=mosaic_mlp.interpret_params())
    gelu, pre = out if with_preactivation else (out, None)
    want_pre = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    assert np.max(np.abs(want_pre)) < 8.0
    assert np.max(np.abs(np.asarray(gelu, np.float64) - _gelu64(want_pre))) <= BF16_HALF_ULP_BELOW_8 + 1e-4
    if with_preactivation:
        assert np.max(np.abs(np.asarray(pre, np.float64) - want_pre)) <= BF16_HALF_ULP_BELOW_8 + 1e-4


@pytest.mark.parametrize("m, k, n, split", [(256, 128, 192, "m"), (192, 64, 256, "n")])
def test_matmul_gelu_grad_matches_float64_under_interpret_mode(m, k, n, split):
    """(dy @ w_t) ⊙ GELU'(h), several tiles an SM, so that each tile's prefetched h lands in the buffer the tile
    before stored from: within bf16's rounding of the output."""
    keys = jax.random.split(jax.random.PRNGKey(7 * m + n), 3)
    dy, w_t, h = _normal(keys[0], (m, k)), _normal(keys[1], (k, n), 1 / np.sqrt(k)), _normal(keys[2], (m, n), 2.0)
    tiling = SMALL if split == "m" else mosaic_mlp.Tiling(**{**SMALL.__dict__, "split": "n"})
    want = (np.asarray(dy, np.float64) @ np.asarray(w_t, np.float64)) * _gelu_grad64(np.asarray(h, np.float64))
    assert np.max(np.abs(want)) < 8.0
    got = mosaic_mlp.matmul_gelu_grad(dy, w_t, h, tiling=tiling, num_sms=2, interpret=mosaic_mlp.interpret_params())
    assert np.max(np.abs(np.asarray(got, np.float64) - want)) <= BF16_HALF_ULP_BELOW_8 + 1e-4


def test_gelu_mlp_value_and_gradients_match_float64_under_interpret_mode(monkeypatch):
    """The whole MLP, its custom VJP included, against the float64 MLP's value and gradients of a random linear
    functional: bf16 operands and outputs, so within a few bf16 ulps relative to each result's scale."""
    monkeypatch.setattr(mosaic_mlp, "default_tiling", lambda m, n, backward=False: SMALL)
    m, c, hidden = 128, 64, 256
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    x = _normal(keys[0], (m, c))
    w1, w2 = _normal(keys[1], (c, hidden), 1 / np.sqrt(c)), _normal(keys[2], (hidden, c), 1 / np.sqrt(hidden))
    b1 = jax.random.normal(keys[3], (hidden,), jnp.float32)
    b2 = jax.random.normal(keys[4], (c,), jnp.float32)
    probe = jax.random.normal(keys[5], (m, c), jnp.float32)
    interpret = mosaic_mlp.interpret_params()

    def loss(x, w1, b1, w2, b2):
        y = mosaic_mlp.gelu_mlp(x, w1, b1, w2, b2, interpret)
        return jnp.sum(y.astype(jnp.float32) * probe)

    value, grads = jax.value_and_grad(loss, argnums=range(5))(x, w1, b1, w2, b2)

    def loss64(x, w1, b1, w2, b2):
        y = _gelu_mlp64(x, w1, b1, w2, b2)
        return jnp.sum(y * probe.astype(jnp.float64))

    with jax.enable_x64():
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, w1, b1, w2, b2)]
        want_value, want_grads = jax.value_and_grad(loss64, argnums=range(5))(*args64)
    # the outputs' bf16 roundings (under 0.03 each) add up like a random walk over the probe: 0.02·‖probe‖₂ (1.8;
    # 0.2 measured), not 0.02·‖probe‖₁ (130, which a forward without b2, 117 off, passed)
    assert abs(float(value) - float(want_value)) <= 0.02 * float(jnp.linalg.norm(probe))
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), grads, want_grads):
        assert got.dtype == (jnp.float32 if name in ("b1", "b2") else jnp.bfloat16), name
        got, want = np.asarray(got, np.float64), np.asarray(want)
        assert np.max(np.abs(got - want)) <= 0.03 * np.max(np.abs(want)), name


def _gelu_mlp64(x, w1, b1, w2, b2):
    h = x @ w1 + b1
    return (0.5 * h * (1.0 + jax.scipy.special.erf(h / np.sqrt(2.0)))) @ w2 + b2
