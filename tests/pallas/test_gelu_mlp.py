"""The fused GELU MLP (mambavision_jax.pallas.gelu_mlp): its Pallas kernels in interpret mode against a float64
reference on fresh random inputs, forward and all five gradients; tile fitting and fallback; CUDA lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.pallas import gelu_mlp as gm


def _arrays(seed, m, k, hidden, n, dtype):
    rng = np.random.default_rng(seed)
    arrays = (
        rng.standard_normal((m, k)),
        rng.standard_normal((k, hidden)) / np.sqrt(k),
        0.5 * rng.standard_normal(hidden),
        rng.standard_normal((hidden, n)) / np.sqrt(hidden),
        0.5 * rng.standard_normal(n),
    )
    return [jnp.asarray(a, dtype) for a in arrays], jnp.asarray(rng.standard_normal((m, n)), dtype)


def _reference_in_float64(arrays, cotangent):
    with jax.enable_x64():
        wide = [np.asarray(a, np.float64) for a in arrays]
        y = gm.gelu_mlp_reference(*map(jnp.asarray, wide))
        grads = jax.grad(
            lambda *a: jnp.sum(gm.gelu_mlp_reference(*a) * jnp.asarray(np.asarray(cotangent, np.float64))),
            argnums=(0, 1, 2, 3, 4),
        )(*map(jnp.asarray, wide))
        return np.asarray(y), [np.asarray(g) for g in grads]


def _fused(tiles):
    def f(*a):
        return gm.gelu_mlp(*a, impl="pallas", tiles=tiles, interpret=True)

    return f


@pytest.mark.parametrize(
    "shape, tiles",
    [
        ((48, 32, 48, 80), gm.GemmTiles(32, 32, 16)),  # 3 x 3 tiles of 16 (fitted down), K and N steps of 16
        ((64, 96, 128, 64), gm.GemmTiles(32, 64, 32)),  # several k steps in both GEMMs
    ],
)
def test_fused_forward_and_gradients_match_float64(shape, tiles):
    arrays, cotangent = _arrays(sum(shape), *shape, jnp.float32)
    y_ref, grads_ref = _reference_in_float64(arrays, cotangent)
    fused = _fused(tiles)
    y = jax.jit(fused)(*arrays)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=4e-6 * np.abs(y_ref).max())
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fused(*a) * cotangent), argnums=(0, 1, 2, 3, 4)))(*arrays)
    for name, g, r in zip(("x", "w1", "b1", "w2", "b2"), grads, grads_ref):
        assert g.shape == r.shape and g.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(g), r, atol=4e-6 * np.abs(r).max(), err_msg=name)


def test_bfloat16_stays_close_to_float64():
    arrays, cotangent = _arrays(7, 64, 64, 128, 32, jnp.bfloat16)
    y_ref, grads_ref = _reference_in_float64(arrays, cotangent)
    fused = _fused(gm.GemmTiles(32, 32, 32))
    y = jax.jit(fused)(*arrays)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=2e-2 * np.abs(y_ref).max())
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fused(*a).astype(jnp.float32) * cotangent), argnums=(0, 1, 2, 3, 4)))(
        *arrays
    )
    for name, g, r in zip(("x", "w1", "b1", "w2", "b2"), grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=3e-2 * np.abs(r).max(), err_msg=name)


def test_the_kernels_gelu_matches_xlas_erf_gelu():
    h = jnp.linspace(-9.0, 9.0, 20001, dtype=jnp.float32)
    cdf, pdf = gm._normal_cdf_and_pdf(h)
    np.testing.assert_allclose(np.asarray(h * cdf), np.asarray(gm.gelu(h)), atol=5e-6)
    derivative = jax.vmap(jax.grad(gm.gelu))(h)
    np.testing.assert_allclose(np.asarray(cdf + h * pdf), np.asarray(derivative), atol=2e-6)


def test_tiles_fit_the_shapes_or_fall_back():
    assert gm.fused_tiles(25088, 512, 2048, 512) == gm.GemmTiles(128, 128, 64)
    assert gm.fused_tiles(6272, 320, 1280, 320) == gm.GemmTiles(128, 128, 64)
    assert gm.fused_tiles(392, 320, 1280, 320) is None  # 392 = 8 * 49 rows: no tile of 16 or more
    arrays, _ = _arrays(3, 49, 32, 64, 32, jnp.float32)
    y = gm.gelu_mlp(*arrays, impl="pallas", interpret=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(gm.gelu_mlp_reference(*arrays)), rtol=1e-6, atol=1e-6)


def test_leading_axes_are_flattened_and_restored():
    arrays, _ = _arrays(5, 64, 32, 64, 16, jnp.float32)
    x3 = arrays[0].reshape(4, 16, 32)
    y = gm.gelu_mlp(x3, *arrays[1:], impl="pallas", tiles=gm.GemmTiles(16, 32, 16), interpret=True)
    assert y.shape == (4, 16, 16)
    np.testing.assert_allclose(np.asarray(y).reshape(64, 16), np.asarray(gm.gelu_mlp_reference(*arrays)), atol=1e-5)


def test_bad_arguments_are_named():
    arrays, _ = _arrays(1, 16, 32, 64, 16, jnp.float32)
    with pytest.raises(ValueError, match="unknown gelu_mlp impl 'triton'"):
        gm.gelu_mlp(*arrays, impl="triton")
    with pytest.raises(ValueError, match="shapes do not chain"):
        gm.gelu_mlp(arrays[0], arrays[1], arrays[2], arrays[3].T, arrays[4])


def test_kernels_lower_to_triton_for_cuda():
    m, k, hidden, n = 25088, 512, 2048, 512
    spec = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((m, k), (k, hidden), (hidden,), (hidden, n), (n,))]

    def loss(*a):
        return jnp.sum(gm.gelu_mlp(*a, impl="pallas", interpret=False).astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*spec).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # fc1 + GELU forward, fc2's input gradient + GELU'
