"""On a Hopper GPU: the fused Mosaic GPU MLPs (``mlp_impl="mosaic"``) against the XLA MLPs.

- One MLP at MambaVision-B's stage-3 shape (batch 128: 25,088 token rows, 512 -> 2048 -> 512) and at a batch whose
  rows do not tile (XLA there): bf16 output and every gradient as close to the float32 MLP's as the XLA MLP's are.
- MambaVision-T in eval mode at batch 128 (every stage-3 and stage-4 MLP on the kernels): bf16 logits as close to
  the float32 model's as the XLA MLPs' bf16 logits are, and the same top-1 class for nearly every image.

Skipped without a GPU (CI is CPU-only; run on the device: ``python -m pytest tests/models/test_gpu_mosaic_mlp.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mambavision_jax as mvj
from mambavision_jax.models.mamba_vision import Mlp
from test_gpu_scan_model import perturbed_variables

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def relative_error(got, want):
    got, want = (np.asarray(a, np.float32) for a in (got, want))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("images", [128, 100])
def test_mosaic_mlp_matches_the_float32_mlp_as_closely_as_xla(images):
    tokens = jax.random.normal(jax.random.PRNGKey(images), (images, 196, 512))
    probe = jax.random.normal(jax.random.PRNGKey(1), tokens.shape)
    mlps = {
        "mosaic": Mlp(512, 2048, dtype=jnp.bfloat16, impl="mosaic"),
        "xla": Mlp(512, 2048, dtype=jnp.bfloat16),
        "f32": Mlp(512, 2048),
    }
    params = mlps["f32"].init(jax.random.PRNGKey(0), tokens, False)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)

    def value_and_grads(mlp, params, tokens, probe):
        def loss(params, tokens):
            return jnp.sum(mlp.apply(params, tokens, True).astype(jnp.float32) * probe)

        return mlp.apply(params, tokens, True), jax.grad(loss, argnums=(0, 1))(params, tokens)

    run = jax.jit(value_and_grads, static_argnums=0)
    results = {name: run(mlp, params, tokens, probe) for name, mlp in mlps.items()}
    for got, xla, want in zip(*(jax.tree.leaves(results[k]) for k in ("mosaic", "xla", "f32"))):
        assert relative_error(got, want) <= 1.5 * relative_error(xla, want) + 1e-3


def test_mosaic_mlps_keep_mambavision_t_logits():
    images = jax.random.normal(jax.random.PRNGKey(7), (128, 224, 224, 3))
    exact = mvj.create_model("mamba_vision_T")
    variables = perturbed_variables(exact, images[:2])
    logits = {
        name: np.asarray(jax.jit(model.apply)(variables, images), np.float32)
        for name, model in (
            ("mosaic", mvj.create_model("mamba_vision_T", dtype=jnp.bfloat16, mlp_impl="mosaic")),
            ("xla", mvj.create_model("mamba_vision_T", dtype=jnp.bfloat16)),
            ("f32", exact),
        )
    }
    assert relative_error(logits["mosaic"], logits["f32"]) <= 1.5 * relative_error(logits["xla"], logits["f32"]) + 1e-3
    assert (logits["mosaic"].argmax(-1) == logits["f32"].argmax(-1)).mean() >= 0.95
