"""Converted float32 weights run in bfloat16 compute (``dtype=jnp.bfloat16`` through ``from_pretrained``).

Stated tolerance: max |bf16 - f32| <= 5e-2 * max |f32 logit|, and the same top-1 class wherever the float32
top-1/top-2 margin exceeds that tolerance. Inputs are smooth, natural-image-like fields, not white noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import mambavision_jax as mvj
from official_reference import official_model, state_dict_numpy

TOLERANCE = 5e-2


def natural_looking_images(count, size, seed):
    """Sums of a few random low-frequency sinusoids plus mild noise, normalised like ImageNet images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    images = np.zeros((count, size, size, 3), np.float32)
    for i in range(count):
        for _ in range(6):
            fy, fx, phase = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
            images[i] += rng.normal(0, 1, 3) * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)[..., None]
    images += rng.normal(0, 0.1, images.shape)
    return ((images - images.mean()) / images.std()).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "model.safetensors"
    save_file(state_dict_numpy(official_model("mamba_vision_T", seed=11)), str(path))
    return str(path)


def test_bfloat16_compute_matches_float32(checkpoint):
    images = natural_looking_images(8, 224, seed=12)
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model, variables = mvj.from_pretrained("mamba_vision_T", checkpoint, dtype=dtype)
        assert jax.tree.leaves(variables)[0].dtype == jnp.float32  # weights stay float32
        logits[dtype] = np.asarray(jax.jit(model.apply)(variables, images), np.float32)
    ref, low = logits[jnp.float32], logits[jnp.bfloat16]
    scale = np.abs(ref).max()
    print(f"bf16 vs f32: max|d|/max|logit| = {np.abs(low - ref).max() / scale:.2e}")
    assert np.abs(low - ref).max() <= TOLERANCE * scale
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * TOLERANCE * scale
    assert clear.any(), "no image with a clear top-1: the test would check nothing"
    print(f"clear top-1 on {clear.sum()} of {len(clear)} images")
    np.testing.assert_array_equal(low.argmax(1)[clear], ref.argmax(1)[clear])
