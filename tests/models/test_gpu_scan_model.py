"""On a GPU: the model with the Pallas scan matches the sequential scan, in logits and in one step's gradients.

Skipped without a GPU (CI is CPU-only; run on the device: ``python -m pytest tests/models/test_gpu_scan_model.py``).
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
    variables = model.init(jax.random.PRNGKey(seed), images)
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) * (1 + jnp.abs(x)) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def setup():
    images = jax.random.normal(jax.random.PRNGKey(7), (4, 224, 224, 3))
    model = mvj.create_model("mamba_vision_T", scan_impl="sequential")
    return images, perturbed_variables(model, images)


def models():
    return {impl: mvj.create_model("mamba_vision_T", scan_impl=impl) for impl in ("pallas", "sequential")}


def test_logits_pallas_match_sequential(setup):
    images, variables = setup
    out = {k: np.asarray(jax.jit(m.apply)(variables, images)) for k, m in models().items()}
    assert np.abs(out["pallas"] - out["sequential"]).max() <= TOLERANCE * np.abs(out["sequential"]).max()


def test_training_gradients_pallas_match_sequential(setup):
    images, variables = setup
    labels = jnp.arange(4) % 1000

    def grads(model):
        def loss(params):
            logits, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                rngs={"dropout": jax.random.PRNGKey(0)},
                mutable=["batch_stats"],
            )
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

        return jax.jit(jax.grad(loss))(variables["params"])

    g = {k: grads(m) for k, m in models().items()}
    flat_p, flat_s = jax.tree.leaves(g["pallas"]), jax.tree.leaves(g["sequential"])
    num = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(flat_p, flat_s)))
    den = np.sqrt(sum(float(jnp.sum(b**2)) for b in flat_s))
    assert num / den <= TOLERANCE
