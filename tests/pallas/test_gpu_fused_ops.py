"""On a GPU: the fused GELU MLP and the fused residual update + LayerNorm, compiled for the card (not interpreted),
against their XLA references at MambaVision-B's stage-3 shape (25,088 tokens of 512 channels, batch 128), float32
and bfloat16, forward and all gradients.

Skipped without a GPU (CI is CPU-only; run on the device: ``python -m pytest tests/pallas/test_gpu_fused_ops.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.pallas import gelu_mlp as gm
from mambavision_jax.pallas import layer_norm as ln

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
TOKENS, DIM = 25088, 512
TOLERANCE = {jnp.float32: 2e-3, jnp.bfloat16: 3e-2}  # of the largest magnitude; float32 GEMMs run as TF32 on GPUs


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape)).astype(dtype)


def _assert_close(got, want, dtype, name):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got - want).max() <= TOLERANCE[dtype] * np.abs(want).max(), name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_mlp_on_the_card(dtype):
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    args = [
        _normal(k[0], (TOKENS, DIM), dtype),
        _normal(k[1], (DIM, 4 * DIM), dtype, DIM**-0.5),
        _normal(k[2], (4 * DIM,), jnp.float32, 0.5),
        _normal(k[3], (4 * DIM, DIM), dtype, (4 * DIM) ** -0.5),
        _normal(k[4], (DIM,), jnp.float32, 0.5),
    ]
    cotangent = _normal(k[5], (TOKENS, DIM), jnp.float32)

    def run(impl):
        def loss(*a):
            y = gm.gelu_mlp(*a, impl=impl)
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        return jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args)

    (_, y), grads = run("pallas")
    (_, y_ref), grads_ref = run("xla")
    _assert_close(y, y_ref, dtype, "y")
    for name, g, r in zip(("x", "w1", "b1", "w2", "b2"), grads, grads_ref):
        _assert_close(g, r, dtype, name)


@pytest.mark.parametrize("stream_dtype", [jnp.float32, jnp.bfloat16])
def test_add_layer_norm_on_the_card(stream_dtype):
    k = jax.random.split(jax.random.PRNGKey(1), 8)
    x = _normal(k[0], (TOKENS, DIM), stream_dtype)
    branch = _normal(k[1], (TOKENS, DIM), jnp.bfloat16)
    gamma = _normal(k[2], (DIM,), jnp.float32)
    row_scale = jnp.where(jax.random.bernoulli(k[3], 0.8, (TOKENS,)), 1 / 0.8, 0.0)
    scale, bias = 1 + _normal(k[4], (DIM,), jnp.float32, 0.1), _normal(k[5], (DIM,), jnp.float32, 0.1)
    cotangents = _normal(k[6], (TOKENS, DIM), jnp.float32), _normal(k[7], (TOKENS, DIM), jnp.float32)

    def run(impl):
        def loss(x, branch, gamma, row_scale, scale, bias):
            outs = ln.add_layer_norm(
                x, branch, gamma=gamma, row_scale=row_scale, scale=scale, bias=bias, out_dtype=jnp.bfloat16,
                impl=impl,
            )  # fmt: skip
            return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(outs, cotangents)), outs

        return jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))(
            x, branch, gamma, row_scale, scale, bias
        )

    (_, outs), grads = run("pallas")
    (_, outs_ref), grads_ref = run("xla")
    for name, o, r in zip(("x_new", "normed"), outs, outs_ref):
        _assert_close(o, r, jnp.bfloat16, name)
    for name, g, r in zip(("x", "branch", "gamma", "row_scale", "scale", "bias"), grads, grads_ref):
        _assert_close(g, r, jnp.bfloat16, name)
