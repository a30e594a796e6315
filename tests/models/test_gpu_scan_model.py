"""On a GPU: the model with the Pallas scan matches the sequential scan, in logits and in one step's gradients.

Skipped without a GPU (CI is CPU-only; run on the device: ``python -m pytest tests/models/test_gpu_scan_model.py``;
it compiles MambaVision-T twice, logits and gradients in one program per scan implementation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mambavision_jax as mvj

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
TOLERANCE = 1e-4


def perturbed_variables(model, images, seed=0):
    """Initial variables with every leaf perturbed (BN stats, dt biases, A_log and D away from their inits)."""
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), images)
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) * (1 + jnp.abs(x)) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def logits_and_gradients(model, variables, images, labels):
    """Eval-mode logits and the training-mode cross-entropy gradient w.r.t. the params, in one jitted program."""

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            rngs={"dropout": jax.random.PRNGKey(0)},
            mutable=["batch_stats"],
        )
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    def both(variables):
        return model.apply(variables, images), jax.grad(loss)(variables["params"])

    return jax.jit(both)(variables)


@pytest.fixture(scope="module")
def outputs():
    images = jax.random.normal(jax.random.PRNGKey(7), (4, 224, 224, 3))
    labels = jnp.arange(4) % 1000
    variables = perturbed_variables(mvj.create_model("mamba_vision_T", scan_impl="sequential"), images)
    return {
        impl: logits_and_gradients(mvj.create_model("mamba_vision_T", scan_impl=impl), variables, images, labels)
        for impl in ("pallas", "sequential")
    }


def test_logits_pallas_match_sequential(outputs):
    ours, ref = (np.asarray(outputs[k][0]) for k in ("pallas", "sequential"))
    assert np.abs(ours - ref).max() <= TOLERANCE * np.abs(ref).max()


def test_training_gradients_pallas_match_sequential(outputs):
    flat_p, flat_s = (jax.tree.leaves(outputs[k][1]) for k in ("pallas", "sequential"))
    num = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(flat_p, flat_s)))
    den = np.sqrt(sum(float(jnp.sum(b**2)) for b in flat_s))
    assert num / den <= TOLERANCE
