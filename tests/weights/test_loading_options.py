"""Weights behaviour beyond test_weights.py: the replaced head's initialisation and seed, and converted-directory
overrides (the caller's win over the manifest's; a compute dtype is not stored), and wrapper prefixes stripped only
when every key carries one."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import mambavision_jax as mvj
from mambavision_jax.weights import CheckpointError, save_converted
from official_reference import state_dict_numpy
from mvj_weights_helpers import ARCH, NAME


def test_replaced_head_is_trunc_normal_002_with_zero_bias_and_follows_the_seed(reference):
    """A num_classes other than the checkpoint's gives a fresh head as the official _init_weights: weights from a
    normal of std 0.02 truncated at 2 std, zero bias; ``seed`` picks the draw (same seed, same head)."""
    path = str(reference["dir"] / "state_dict.pth.tar")
    heads = {seed: mvj.from_pretrained(NAME, path, num_classes=300, seed=seed, **ARCH)[1]["params"]["head"]
             for seed in (1, 2)}
    again = mvj.from_pretrained(NAME, path, num_classes=300, seed=1, **ARCH)[1]["params"]["head"]
    np.testing.assert_array_equal(again["kernel"], heads[1]["kernel"])
    assert not np.allclose(heads[1]["kernel"], heads[2]["kernel"]), "the seed must change the fresh head"
    for head in heads.values():
        kernel = np.asarray(head["kernel"])
        assert kernel.shape == (128, 300)
        np.testing.assert_array_equal(head["bias"], np.zeros(300, np.float32))
        assert np.abs(kernel).max() <= 0.04 + 1e-6, "truncated at 2 std of 0.02"
        assert 0.015 < kernel.std() < 0.02, "std of N(0, 0.02²) truncated at ±2σ: 0.0176"


def test_caller_overrides_win_over_the_converted_manifest(reference, tmp_path):
    """Overrides given to from_pretrained replace those stored in a converted directory (and the stored ones apply
    where the caller gives none); a compute dtype given at save time is the caller's choice and is not stored."""
    _, variables = mvj.from_pretrained(NAME, str(reference["dir"] / "state_dict.pth.tar"), **ARCH)
    out = tmp_path / "converted"
    save_converted(str(out), NAME, variables, {**ARCH, "drop_path_rate": 0.1, "dtype": jnp.bfloat16})
    manifest = json.loads((out / "mambavision.json").read_text())
    assert "dtype" not in manifest["overrides"] and manifest["overrides"]["drop_path_rate"] == 0.1
    stored, _ = mvj.from_pretrained(NAME, str(out))
    assert (stored.drop_path_rate, stored.dtype, stored.dim) == (0.1, jnp.float32, ARCH["dim"])
    module, _ = mvj.from_pretrained(NAME, str(out), drop_path_rate=0.0, dtype=jnp.bfloat16)
    assert (module.drop_path_rate, module.dtype, module.dim) == (0.0, jnp.bfloat16, ARCH["dim"])


def test_a_wrapper_prefix_on_some_keys_only_is_not_stripped(reference, tmp_path):
    """The Hugging Face ``model.`` prefix is removed only when every key has it: one stray ``model.`` key beside
    plain official keys is reported as the one unexpected key, and no official key is cut or missing."""
    state = {**state_dict_numpy(reference["model"]), "model.stray": np.zeros(3, np.float32)}
    path = tmp_path / "stray.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        mvj.from_pretrained(NAME, str(path), **ARCH)
    message = str(info.value)
    assert "1 unexpected keys:\n  model.stray" in message and "missing keys" not in message, message[:500]
