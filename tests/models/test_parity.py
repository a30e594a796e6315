"""Logit parity with the official PyTorch MambaVision (every parameter and BN statistic randomised).

Criterion (float32, matmul precision 'highest'): max |JAX - torch| <= 1e-4 * max |torch logit|.
"""

import jax
import numpy as np
import pytest

import mambavision_jax as mvj
from mambavision_jax.weights import load_state_dict
from official_reference import official_model, state_dict_numpy, torch_logits

TOLERANCE = 1e-4
SMALL_VARIANTS = ["mamba_vision_T", "mamba_vision_T2", "mamba_vision_S", "mamba_vision_B", "mamba_vision_B_21k"]
LARGE_VARIANTS = [
    "mamba_vision_L",
    "mamba_vision_L_21k",
    "mamba_vision_L2",
    "mamba_vision_L2_512_21k",
    "mamba_vision_L3_256_21k",
    "mamba_vision_L3_512_21k",
]


def relative_error(name, images, scan_impl="auto", seed=0):
    torch_model = official_model(name, seed=seed)
    reference = torch_logits(torch_model, images)
    model = mvj.create_model(name, scan_impl=scan_impl)
    variables = load_state_dict(state_dict_numpy(torch_model), model)
    del torch_model
    logits = np.asarray(jax.jit(model.apply)(variables, images))
    error = np.abs(logits - reference).max() / np.abs(reference).max()
    print(f"{name} {images.shape} {scan_impl}: max|d|/max|logit| = {error:.2e}")
    return error


def native_images(name, batch=1, seed=0):
    size = mvj.pretrained_cfg(name)["input_size"][1]
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)


@pytest.mark.parametrize("name", SMALL_VARIANTS)
def test_variant_matches_official(name):
    assert relative_error(name, native_images(name, batch=2)) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE_VARIANTS)
def test_large_variant_matches_official(name):
    assert relative_error(name, native_images(name)) <= TOLERANCE


@pytest.mark.parametrize("name", ["mamba_vision_T", "mamba_vision_B"])
@pytest.mark.parametrize("size", [(256, 320), (200, 232)])
def test_resolutions_not_multiple_of_window(name, size):
    images = np.random.default_rng(1).standard_normal((2, *size, 3), dtype=np.float32)
    assert relative_error(name, images, seed=1) <= TOLERANCE


def test_scan_implementations_agree():
    model = mvj.create_model("mamba_vision_T")
    torch_model = official_model("mamba_vision_T", seed=2)
    variables = load_state_dict(state_dict_numpy(torch_model), model)
    images = native_images("mamba_vision_T", batch=2, seed=2)
    outputs = {
        impl: np.asarray(jax.jit(mvj.create_model("mamba_vision_T", scan_impl=impl).apply)(variables, images))
        for impl in ("sequential", "associative")
    }
    scale = np.abs(outputs["sequential"]).max()
    assert np.abs(outputs["sequential"] - outputs["associative"]).max() <= TOLERANCE * scale
