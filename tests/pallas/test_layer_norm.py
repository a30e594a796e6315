"""The fused residual update + LayerNorm (mambavision_jax.pallas.layer_norm): its Pallas kernels in interpret mode
against a float64 reference on fresh random inputs, both outputs and every gradient, with and without the branch,
layer scale and per-row (drop path) factors, power-of-two and padded (masked) row widths; CUDA lowering; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.pallas import layer_norm as ln


def _inputs(seed, rows, channels, branch, gamma, row_scale, stream_dtype):
    rng = np.random.default_rng(seed)
    arrays = dict(
        x=rng.standard_normal((rows, channels)) * 2 + 0.7,
        branch=rng.standard_normal((rows, channels)) if branch else None,
        gamma=rng.standard_normal(channels) if gamma else None,
        row_scale=rng.choice([0.0, 1.0 / 0.7], rows) if row_scale else None,
        scale=1 + 0.3 * rng.standard_normal(channels),
        bias=0.3 * rng.standard_normal(channels),
    )
    cotangents = rng.standard_normal((rows, channels)), rng.standard_normal((rows, channels))
    dtypes = dict(x=stream_dtype, branch=jnp.bfloat16)
    cast = {k: None if v is None else jnp.asarray(v, dtypes.get(k, jnp.float32)) for k, v in arrays.items()}
    return cast, [jnp.asarray(c, jnp.float32) for c in cotangents]


def _float64_reference(x, branch, *, scale, bias, gamma=None, row_scale=None, eps=1e-5):
    """(x_new, normed) in float64 throughout (the library's "xla" impl computes in float32)."""
    x = x.astype(jnp.float64)
    if branch is not None:
        update = branch.astype(jnp.float64)
        update = update if gamma is None else update * gamma.astype(jnp.float64)
        update = update if row_scale is None else update * row_scale.astype(jnp.float64)[:, None]
        x = x + update
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return x, (x - mean) / jnp.sqrt(var + eps) * scale.astype(jnp.float64) + bias.astype(jnp.float64)


def _loss(impl, names, fixed, cotangents, out_dtype):
    def f(*values):
        kwargs = dict(fixed, **dict(zip(names, values)))
        if impl == "float64":
            x_new, normed = _float64_reference(kwargs.pop("x"), kwargs.pop("branch"), **kwargs)
        else:
            x_new, normed = ln.add_layer_norm(
                kwargs.pop("x"), kwargs.pop("branch"), **kwargs, out_dtype=out_dtype, impl=impl, interpret=True
            )
        wide = cotangents[0].dtype  # float64 for the reference: no float32 rounding in its loss or gradients
        loss = jnp.sum(x_new.astype(wide) * cotangents[0]) + jnp.sum(normed.astype(wide) * cotangents[1])
        return loss, (x_new, normed)

    return f


@pytest.mark.parametrize(
    "rows, channels, branch, gamma, row_scale",
    [
        (64, 512, True, True, True),  # B stage 3's channels: an unpadded row, 16 rows a program
        (48, 320, True, True, True),  # T stage 3's: rows padded to 512, masked
        (36, 96, True, False, True),  # padded to 128, 4 rows a program
        (32, 320, False, False, False),  # a plain LayerNorm
        (40, 128, True, False, False),  # a plain residual update
    ],
)
def test_fused_matches_float64(rows, channels, branch, gamma, row_scale):
    arrays, cotangents = _inputs(rows + channels, rows, channels, branch, gamma, row_scale, jnp.float32)
    names = [k for k, v in arrays.items() if v is not None]
    fixed = {k: v for k, v in arrays.items() if v is None}
    values = [arrays[k] for k in names]
    fused = jax.jit(jax.value_and_grad(_loss("pallas", names, fixed, cotangents, jnp.float32), range(len(names)), True))
    (_, (x_new, normed)), grads = fused(*values)
    with jax.enable_x64():
        wide = [jnp.asarray(np.asarray(v, np.float64)) for v in values]
        wide_cot = [jnp.asarray(np.asarray(c, np.float64)) for c in cotangents]
        reference = jax.value_and_grad(_loss("float64", names, fixed, wide_cot, jnp.float64), range(len(names)), True)
        (_, (x_ref, normed_ref)), grads_ref = reference(*wide)
        x_ref, normed_ref, grads_ref = np.asarray(x_ref), np.asarray(normed_ref), [np.asarray(g) for g in grads_ref]
    assert x_new.dtype == jnp.float32 and normed.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(x_new), x_ref, atol=1e-5 * np.abs(x_ref).max())
    np.testing.assert_allclose(np.asarray(normed), normed_ref, atol=2e-5 * np.abs(normed_ref).max())
    for name, g, r in zip(names, grads, grads_ref):
        assert g.shape == r.shape, name
        tolerance = 1e-2 if name == "branch" else 2e-5  # branch and its gradient are bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=tolerance * np.abs(r).max(), err_msg=name)


def test_bfloat16_stream_and_output():
    arrays, cotangents = _inputs(5, 32, 128, True, False, False, jnp.bfloat16)
    x_new, normed = ln.add_layer_norm(
        arrays["x"], arrays["branch"], scale=arrays["scale"], bias=arrays["bias"], impl="pallas", interpret=True
    )
    ref_x, ref_n = ln.add_layer_norm_reference(
        arrays["x"], arrays["branch"], None, None, arrays["scale"], arrays["bias"], eps=1e-5, out_dtype=jnp.bfloat16
    )
    assert x_new.dtype == jnp.bfloat16 and normed.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), np.asarray(ref_x, np.float32))
    np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(ref_n, np.float32), atol=3e-2)


@pytest.mark.parametrize("channels", [24, ln.MAX_WIDTH + 8])  # a padded row; wider than a program: XLA
def test_narrow_and_too_wide_rows_keep_their_leading_axes(channels):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, channels)), jnp.float32)
    scale, bias = jnp.ones(channels), jnp.zeros(channels)
    x_new, normed = ln.add_layer_norm(x, scale=scale, bias=bias, impl="pallas", interpret=True)
    assert normed.shape == (2, 7, channels)
    ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(normed), np.asarray(ref), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(x_new), np.asarray(x))


def test_bad_arguments_are_named():
    x, c = jnp.zeros((4, 8, 64)), jnp.ones(64)
    with pytest.raises(ValueError, match="unknown add_layer_norm impl 'cuda'"):
        ln.add_layer_norm(x, scale=c, bias=c, impl="cuda")
    with pytest.raises(ValueError, match="branch"):
        ln.add_layer_norm(x, jnp.zeros((4, 8, 32)), scale=c, bias=c)
    with pytest.raises(ValueError, match="gamma must have shape"):
        ln.add_layer_norm(x, x, scale=c, bias=c, gamma=jnp.ones(32))
    with pytest.raises(ValueError, match=r"row_scale must have shape \(32,\)"):
        ln.add_layer_norm(x, x, scale=c, bias=c, row_scale=jnp.ones(4))
    with pytest.raises(ValueError, match="there is none"):
        ln.add_layer_norm(x, scale=c, bias=c, row_scale=jnp.ones(32))


@pytest.mark.parametrize("channels", [512, 320])  # B and T stage 3 at batch 128 (320: a padded, masked row)
def test_kernels_lower_to_triton_for_cuda(channels):
    rows = 25088
    f32 = jnp.float32
    specs = [
        jax.ShapeDtypeStruct((rows, channels), f32),
        jax.ShapeDtypeStruct((rows, channels), jnp.bfloat16),
        jax.ShapeDtypeStruct((channels,), f32),
        jax.ShapeDtypeStruct((rows,), f32),
        jax.ShapeDtypeStruct((channels,), f32),
        jax.ShapeDtypeStruct((channels,), f32),
    ]

    def loss(x, branch, gamma, row_scale, scale, bias):
        x_new, normed = ln.add_layer_norm(
            x, branch, gamma=gamma, row_scale=row_scale, scale=scale, bias=bias, out_dtype=jnp.bfloat16,
            impl="pallas", interpret=False,
        )  # fmt: skip
        return jnp.sum(x_new) + jnp.sum(normed.astype(f32))

    grad = jax.jit(jax.grad(loss, argnums=range(6)))
    text = grad.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel
