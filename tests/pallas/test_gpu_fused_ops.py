"""On a GPU: the fused residual update + LayerNorm, compiled for the card (not interpreted), against its XLA
reference at MambaVision-B's and -T's stage-3 shapes (25,088 tokens of 512 and of 320 channels, batch 128; 320 is a
padded, masked row), float32 and bfloat16 streams, forward and all gradients.

Skipped without a GPU (CI is CPU-only; run on the device: ``python -m pytest tests/pallas/test_gpu_fused_ops.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.pallas import layer_norm as ln

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
TOKENS = 25088
TOLERANCE = {jnp.float32: 2e-3, jnp.bfloat16: 3e-2}  # of the largest magnitude; float32 GEMMs run as TF32 on GPUs


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape)).astype(dtype)


def _assert_close(got, want, dtype, name):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got - want).max() <= TOLERANCE[dtype] * np.abs(want).max(), name


@pytest.mark.parametrize("dim", [512, 320])
@pytest.mark.parametrize("stream_dtype", [jnp.float32, jnp.bfloat16])
def test_add_layer_norm_on_the_card(stream_dtype, dim):
    k = jax.random.split(jax.random.PRNGKey(1), 8)
    x = _normal(k[0], (TOKENS, dim), stream_dtype)
    branch = _normal(k[1], (TOKENS, dim), jnp.bfloat16)
    gamma = _normal(k[2], (dim,), jnp.float32)
    row_scale = jnp.where(jax.random.bernoulli(k[3], 0.8, (TOKENS,)), 1 / 0.8, 0.0)
    scale, bias = 1 + _normal(k[4], (dim,), jnp.float32, 0.1), _normal(k[5], (dim,), jnp.float32, 0.1)
    cotangents = _normal(k[6], (TOKENS, dim), jnp.float32), _normal(k[7], (TOKENS, dim), jnp.float32)

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
