"""On a Hopper GPU: MambaVision-T with the fused Mosaic GPU MLPs (``mlp_impl="mosaic"``) against the XLA MLPs, in
bf16 logits and in one training step's parameter gradients, at batch 128 (every stage-3 and stage-4 MLP on the
kernels: 25,088 and 6,272 token rows) and at batch 64 (stage 4's 3,136 rows do not tile: XLA there).

Skipped without a GPU (CI is CPU-only; run on the device: ``python -m pytest tests/models/test_gpu_mosaic_mlp.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mambavision_jax as mvj
from test_gpu_scan_model import logits_and_gradients, perturbed_variables

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@pytest.mark.parametrize("batch", [128, 64])
def test_mosaic_mlps_match_xla_mlps_in_logits_and_gradients(batch):
    images = jax.random.normal(jax.random.PRNGKey(batch), (batch, 224, 224, 3))
    labels = jnp.arange(batch) % 1000
    models = {impl: mvj.create_model("mamba_vision_T", dtype=jnp.bfloat16, mlp_impl=impl) for impl in ("xla", "mosaic")}
    variables = perturbed_variables(models["xla"], images[:2])
    (ref_logits, ref_grads), (logits, grads) = (
        logits_and_gradients(models[k], variables, images, labels) for k in ("xla", "mosaic")
    )
    ref_logits, logits = np.asarray(ref_logits, np.float32), np.asarray(logits, np.float32)
    # bf16 everywhere: the two differ by roundings (the kernels round once where XLA rounds the GEMM, then GELU)
    assert np.abs(logits - ref_logits).max() <= 0.05 * np.abs(ref_logits).max()
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).mean() >= 0.9
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.linalg.norm(got - want) <= 0.1 * np.linalg.norm(want) + 1e-6, jax.tree_util.keystr(path)
