"""Parity with the official PyTorch MambaVision (every parameter and BN statistic randomised): eval logits for every
variant, and a training-mode forward and backward (logits, every parameter's gradient, the updated BN statistics).

Criterion (float32, matmul precision 'highest'): max |JAX - torch| <= 1e-4 * max |torch value|, per logit array,
gradient leaf and statistic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import mambavision_jax as mvj
from mambavision_jax.weights import load_state_dict
from official_reference import official_model, state_dict_numpy, torch, torch_logits

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


@pytest.fixture
def one_large_model_at_a_time(tmp_path_factory):
    """Under pytest-xdist (``-n 2``) the workers' temporary directories share a parent; a file lock there keeps two
    workers from holding the largest variants at once (an L3 test alone peaks near 12 GB of memory)."""
    from filelock import FileLock  # in the reference extra (and a dependency of torch)

    with FileLock(tmp_path_factory.getbasetemp().parent / "large_variants.lock"):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE_VARIANTS)
def test_large_variant_matches_official(name, one_large_model_at_a_time):
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


# A small MambaVision with layer scale in both the conv blocks and the token blocks (as in the L3 variants), so that
# every kind of parameter gets a gradient; heads and windows as T's.
LAYER_SCALED = dict(depths=[1, 1, 2, 2], dim=32, in_dim=16, layer_scale=0.5, layer_scale_conv=0.5)


@pytest.mark.parametrize("architecture", [{}, LAYER_SCALED], ids=["T", "small_layer_scaled"])
def test_training_forward_and_backward_match_official(architecture):
    """Train mode, drop path off: logits, the gradient of every parameter (mapped through the weights' key map like
    the weights themselves) and the running statistics after the step (torch's unbiased variance update) match.
    Biases that feed a training BatchNorm directly (the conv blocks', the last block's fc2) cancel: their gradients
    are zero up to rounding on both sides (torch's under 1e-6 of the largest), so those are checked against the
    largest gradient."""
    name, images = "mamba_vision_T", np.random.default_rng(4).standard_normal((2, 64, 96, 3), dtype=np.float32)
    torch_model = official_model(name, seed=4, drop_path_rate=0.0, **architecture).train()
    before = {k: v.copy() for k, v in state_dict_numpy(torch_model).items()}  # numpy views alias torch's buffers
    logits_torch = torch_model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    (logits_torch**2).mean().backward()
    parameters = dict(torch_model.named_parameters())
    torch_grads = {k: parameters[k].grad.numpy() if k in parameters else v for k, v in before.items()}

    model = mvj.create_model(name, drop_path_rate=0.0, **architecture)
    variables = load_state_dict(before, model)
    if architecture:
        leaves = {path[-1] for path in traverse_util.flatten_dict(variables["params"])}
        assert {"gamma", "gamma_1", "gamma_2"} <= leaves, "layer scale in the conv blocks and the token blocks"

    def loss(params):
        logits, new = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return jnp.mean(logits**2), (logits, new["batch_stats"])

    (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    logits_torch = logits_torch.detach().numpy()
    assert np.abs(np.asarray(logits) - logits_torch).max() <= TOLERANCE * np.abs(logits_torch).max()

    want = traverse_util.flatten_dict(load_state_dict(torch_grads, model)["params"])
    got = traverse_util.flatten_dict(grads)
    largest = max(np.abs(g).max() for g in want.values())
    for path, g in want.items():
        scale = np.abs(g).max() if np.abs(g).max() >= 1e-6 * largest else largest
        assert np.abs(np.asarray(got[path]) - g).max() <= TOLERANCE * scale, "/".join(path)

    want_stats = traverse_util.flatten_dict(load_state_dict(state_dict_numpy(torch_model), model)["batch_stats"])
    for path, s in traverse_util.flatten_dict(stats).items():
        assert np.abs(np.asarray(s) - want_stats[path]).max() <= TOLERANCE * np.abs(want_stats[path]).max(), path
