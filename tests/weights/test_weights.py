"""Weights: key map round trips, both file formats, EMA, the converter CLI, head replacement, and errors."""

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import mambavision_jax as mvj
from mambavision_jax.weights import CheckpointError, load_state_dict, to_torch_state_dict
from mvj_weights_helpers import ARCH, NAME
from official_reference import official_model, state_dict_numpy, torch, torch_logits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jax_logits(module, variables, images):
    return np.asarray(jax.jit(module.apply)(variables, images))


def assert_close(a, b):
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_key_map_round_trip(reference):
    state = state_dict_numpy(reference["model"])
    module = mvj.create_model(NAME, **ARCH)
    back = to_torch_state_dict(load_state_dict(state, module))
    assert back.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)


@pytest.mark.parametrize("layout", ["state_dict", "model", "bare", "module_prefix"])
def test_torch_checkpoint_layouts(reference, layout):
    state = reference["model"].state_dict()
    if layout == "module_prefix":
        payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:
        payload = state if layout == "bare" else {layout: state, "epoch": 3}
    path = reference["dir"] / f"{layout}.pth.tar"
    torch.save(payload, path)
    module, variables = mvj.from_pretrained(NAME, str(path), **ARCH)
    assert_close(jax_logits(module, variables, reference["images"]), reference["logits"])


def test_ema_weights(reference):
    path = reference["dir"] / "train_ckpt.pth.tar"
    torch.save(
        {
            "state_dict": reference["model"].state_dict(),
            "state_dict_ema": reference["ema_model"].state_dict(),
            "epoch": 9,
        },
        path,
    )
    module, variables = mvj.from_pretrained(NAME, str(path), ema=True, **ARCH)
    assert_close(jax_logits(module, variables, reference["images"]), reference["ema_logits"])
    with pytest.raises(CheckpointError, match="state_dict_ema"):
        mvj.from_pretrained(NAME, str(reference["dir"] / "state_dict.pth.tar"), ema=True, **ARCH)


def test_training_checkpoint_with_args_namespace(reference):
    """What timm's CheckpointSaver writes for the official train.py: 'args' is an argparse.Namespace (with a
    torch dtype in it), next to the optimizer and AMP scaler states; torch.load(weights_only=True) must accept it."""
    model = reference["model"]
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(model=NAME, lr=0.005, scale=[0.08, 1.0], mean=None, dtype=torch.float16)
    path = reference["dir"] / "train_args.pth.tar"
    torch.save(
        {
            "epoch": 309,
            "arch": NAME,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "args": args,
            "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            "state_dict_ema": reference["ema_model"].state_dict(),
            "metric": 82.3,
        },
        path,
    )
    module, variables = mvj.from_pretrained(NAME, str(path), **ARCH)
    assert_close(jax_logits(module, variables, reference["images"]), reference["logits"])
    module, variables = mvj.from_pretrained(NAME, str(path), ema=True, **ARCH)
    assert_close(jax_logits(module, variables, reference["images"]), reference["ema_logits"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_safetensors(reference, dtype):
    import ml_dtypes

    half = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    state = {k: v.astype(half) for k, v in state_dict_numpy(reference["model"]).items()}
    path = reference["dir"] / f"model_{dtype}.safetensors"
    save_file({f"model.{k}": v for k, v in state.items()}, str(path))
    _, variables = mvj.from_pretrained(NAME, str(path), **ARCH)
    back = to_torch_state_dict(variables)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], value.astype(np.float32), err_msg=key)


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_safetensors_without_torch(reference, prefix, monkeypatch):
    path = reference["dir"] / f"model{prefix or '_bare'}.safetensors"
    save_file({prefix + k: v for k, v in state_dict_numpy(reference["model"]).items()}, str(path))
    monkeypatch.setitem(sys.modules, "torch", None)  # any torch import now fails
    module, variables = mvj.from_pretrained(NAME, str(path), **ARCH)
    assert_close(jax_logits(module, variables, reference["images"]), reference["logits"])


def test_converted_directory_round_trip(reference):
    from mambavision_jax.weights import save_converted

    module, variables = mvj.from_pretrained(NAME, str(reference["dir"] / "state_dict.pth.tar"), **ARCH)
    out = reference["dir"] / "converted_small"
    save_converted(str(out), NAME, variables, ARCH)
    module2, variables2 = mvj.from_pretrained(NAME, str(out))
    assert module2 == module
    assert_close(jax_logits(module2, variables2, reference["images"]), reference["logits"])
    with pytest.raises(CheckpointError, match="holds mamba_vision_T, not mamba_vision_S"):
        mvj.from_pretrained("mamba_vision_S", str(out))
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_converted(str(out), NAME, variables, ARCH)
    save_converted(str(out), NAME, variables, ARCH, overwrite=True)  # an earlier conversion is replaced
    assert_close(jax_logits(*mvj.from_pretrained(NAME, str(out)), reference["images"]), reference["logits"])


def test_overwrite_deletes_nothing_but_converted_weights(tmp_path):
    """A non-empty directory that holds no converted weights (a project folder, '.') is refused even with
    overwrite=True, and its files stay."""
    from mambavision_jax.weights import save_converted

    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(FileExistsError, match="holds no converted weights"):
        save_converted(str(tmp_path), NAME, {"params": {}}, overwrite=True)
    assert keep.read_text() == "mine"


def test_converter_cli_tiny_with_ema(tmp_path):
    official = official_model(NAME, seed=6)
    ema = official_model(NAME, seed=7)
    src = tmp_path / "mambavision_tiny_1k.pth.tar"
    torch.save({"state_dict": official.state_dict(), "state_dict_ema": ema.state_dict()}, src)
    images = np.random.default_rng(8).standard_normal((1, 224, 224, 3), dtype=np.float32)
    for flag, reference_model in (([], official), (["--ema"], ema)):
        out = tmp_path / f"converted{''.join(flag)}"
        result = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "convert_torch_weights.py"),
                "--model",
                "mambavision_tiny",
                "--input",
                str(src),
                "--output",
                str(out),
                *flag,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        assert "31,794,248 parameters" in result.stdout
        module, variables = mvj.from_pretrained(None, str(out))
        assert_close(jax_logits(module, variables, images), torch_logits(reference_model, images))
    bad = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "convert_torch_weights.py"),
            "--model",
            "mamba_vision_S",
            "--input",
            str(src),
            "--output",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 1 and "missing keys" in bad.stderr and not (tmp_path / "bad").exists()


def test_new_class_count_keeps_everything_but_the_head(reference, caplog):
    path = str(reference["dir"] / "state_dict.pth.tar")
    _, full = mvj.from_pretrained(NAME, path, **ARCH)
    with caplog.at_level(logging.WARNING):
        module, variables = mvj.from_pretrained(NAME, path, num_classes=3, **ARCH)
    assert "initialising a new head" in caplog.text
    assert variables["params"]["head"]["kernel"].shape == (128, 3)
    np.testing.assert_array_equal(
        variables["params"]["levels_2"]["blocks_0"]["mixer"]["A_log"],
        full["params"]["levels_2"]["blocks_0"]["mixer"]["A_log"],
    )
    features = module.apply(variables, reference["images"], method=module.forward_features)
    full_module = mvj.create_model(NAME, **ARCH)
    np.testing.assert_allclose(
        features, full_module.apply(full, reference["images"], method=full_module.forward_features), rtol=1e-6
    )


@pytest.mark.parametrize(
    "edit,named",
    [
        (lambda s: s.pop("levels.2.blocks.0.mixer.A_log"), "missing keys:\n  levels.2.blocks.0.mixer.A_log"),
        (
            lambda s: s.update({"levels.2.blocks.0.mixer.extra": np.zeros(3, np.float32)}),
            "unexpected keys:\n  levels.2.blocks.0.mixer.extra",
        ),
        (
            lambda s: s.update({"head.weight": np.zeros((1000, 7), np.float32)}),
            "head.weight: checkpoint (1000, 7) vs model (1000, 128)",
        ),
    ],
)
def test_bad_checkpoints_name_every_offending_key(reference, edit, named):
    state = state_dict_numpy(reference["model"])
    edit(state)
    state["levels.0.blocks.0.conv1.bias"] = np.zeros(5, np.float32)  # a second, different problem
    path = reference["dir"] / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        mvj.from_pretrained(NAME, str(path), **ARCH)
    message = str(info.value)
    assert named in message and "levels.0.blocks.0.conv1.bias: checkpoint (5,) vs model (16,)" in message
    assert "nothing was loaded" in message


@pytest.mark.parametrize(
    "content,message",
    [
        (b"just some text, not a checkpoint", "neither a PyTorch checkpoint"),
        (b"PK\x03\x04 truncated zip", "could not read .* as a PyTorch checkpoint"),
        (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": broken json}', "could not read .* as safetensors"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        mvj.from_pretrained(NAME, str(path))


def test_missing_file():
    with pytest.raises(CheckpointError, match="does not exist"):
        mvj.from_pretrained(NAME, "/nonexistent/weights.pth")


def test_torch_checkpoint_without_torch_says_how_to_install(reference, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # any torch import now fails
    with pytest.raises(ImportError, match=r"pip install 'mambavision-jax\[torch\]'"):
        mvj.from_pretrained(NAME, str(reference["dir"] / "state_dict.pth.tar"), **ARCH)


class FakeHub:
    """``huggingface_hub.hf_hub_download`` stand-in: serves ``files`` ({filename: local path}), raises ``errors``
    ({filename: exception}), and records every (repo_id, filename) asked for."""

    def __init__(self, files=None, errors=None):
        self.files, self.errors, self.calls = files or {}, errors or {}, []

    def __call__(self, repo_id, filename, **kwargs):
        self.calls.append((repo_id, filename))
        if filename in self.errors:
            raise self.errors[filename]
        if filename not in self.files:
            raise AssertionError(f"unexpected download of {repo_id}/{filename}")
        return self.files[filename]


@pytest.fixture
def hub_safetensors(reference):
    path = reference["dir"] / "hub_model.safetensors"
    save_file({f"model.{k}": v for k, v in state_dict_numpy(reference["model"]).items()}, str(path))
    return str(path)


@pytest.mark.parametrize("source", [None, "hf-hub"])
def test_official_weights_download_from_the_hub(reference, hub_safetensors, source, monkeypatch):
    import huggingface_hub

    hub = FakeHub(files={"model.safetensors": hub_safetensors})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    module, variables = mvj.from_pretrained("mambavision_tiny", source, **ARCH)
    assert hub.calls == [("nvidia/MambaVision-T-1K", "model.safetensors")]
    assert_close(jax_logits(module, variables, reference["images"]), reference["logits"])
    with pytest.raises(ValueError, match="name is required"):
        mvj.from_pretrained(None, source)


def test_hub_download_falls_back_to_the_official_pth_tar(reference, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    hub = FakeHub(
        files={"mambavision_tiny_1k.pth.tar": str(reference["dir"] / "state_dict.pth.tar")},
        errors={"model.safetensors": errors.EntryNotFoundError("404: no such file")},
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    module, variables = mvj.from_pretrained(NAME, **ARCH)
    assert [f for _, f in hub.calls] == ["model.safetensors", "mambavision_tiny_1k.pth.tar"]
    assert_close(jax_logits(module, variables, reference["images"]), reference["logits"])


@pytest.mark.parametrize(
    "error, message",
    [
        ("offline", r"nvidia/MambaVision-B-1K/model.safetensors is not in the Hugging Face cache"),
        ("http", r"could not download nvidia/MambaVision-B-1K/model.safetensors: 401"),
        ("neither", r"nvidia/MambaVision-B-1K holds none of model.safetensors, mambavision_base_1k.pth.tar"),
    ],
)
def test_hub_failures_name_the_repository_and_file(error, message, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    missing = errors.EntryNotFoundError("404")
    response = types.SimpleNamespace(headers={}, request=None)  # what HfHubHTTPError reads of an HTTP response
    raised = {
        "offline": {"model.safetensors": errors.LocalEntryNotFoundError("no connection")},
        "http": {"model.safetensors": errors.HfHubHTTPError("401 Client Error: Unauthorized", response=response)},
        "neither": {"model.safetensors": missing, "mambavision_base_1k.pth.tar": missing},
    }[error]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub(errors=raised))
    with pytest.raises(CheckpointError, match=message):
        mvj.from_pretrained("mamba_vision_B")


def test_hub_download_without_huggingface_hub_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any huggingface_hub import now fails
    with pytest.raises(ImportError, match=r"pip install 'mambavision-jax\[hub\]'"):
        mvj.from_pretrained(NAME)


def test_converter_cli_downloads_without_input(reference, hub_safetensors, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.syspath_prepend(ROOT)
    import convert_torch_weights

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub(files={"model.safetensors": hub_safetensors}))
    # The CLI converts registered architectures only: register the small test architecture as T for this test.
    variants = mvj.models.registry.VARIANTS
    monkeypatch.setitem(variants, NAME, dataclasses.replace(variants[NAME], **ARCH))
    out = tmp_path / "from_hub"
    assert convert_torch_weights.main(["--model", NAME, "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "mambavision.json").read_text())["source"] == os.path.basename(hub_safetensors)
    module, variables = mvj.from_pretrained(None, str(out))
    assert_close(jax_logits(module, variables, reference["images"]), reference["logits"])


def test_headless_load_says_the_head_is_dropped(reference, caplog):
    """num_classes=0 drops the checkpoint's head and the log says so (it used to say a new head was initialised)."""
    path = str(reference["dir"] / "state_dict.pth.tar")
    with caplog.at_level(logging.WARNING):
        module, variables = mvj.from_pretrained(NAME, path, num_classes=0, **ARCH)
    assert "dropping the head" in caplog.text and "new head" not in caplog.text
    assert "head" not in variables["params"]
    assert module.apply(variables, reference["images"]).shape == (2, 128)


def test_unknown_override_or_name_is_refused_before_reading(monkeypatch, tmp_path):
    """A misspelt keyword (num_class for num_classes) or model name is named before the checkpoint is fetched or
    read, not after a download or torch.load of up to 3 GB."""
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(ValueError, match=r"Unknown override\(s\) \['num_class'\]"):
        mvj.from_pretrained("mamba_vision_L3_512_21k", num_class=10)
    assert hub.calls == []
    unreadable = tmp_path / "mambavision_L3_21k_740m_512.pth.tar"
    unreadable.write_bytes(b"not read")
    with pytest.raises(ValueError, match="Unknown MambaVision model 'mamba_vision_L3'"):
        mvj.from_pretrained("mamba_vision_L3", str(unreadable))


def test_a_fine_tuned_checkpoint_loads_with_its_own_class_count(tmp_path):
    """A checkpoint whose head has 10 classes (a model fine-tuned with the official train.py) loads without
    num_classes: the model takes the head's class count and gives the official logits."""
    model = official_model(NAME, seed=6, num_classes=10, **ARCH)
    path = str(tmp_path / "fine_tuned.pth.tar")
    torch.save({"state_dict": model.state_dict()}, path)
    module, variables = mvj.from_pretrained(NAME, path, **ARCH)
    assert module.num_classes == 10
    images = np.random.default_rng(7).standard_normal((2, 64, 64, 3), dtype=np.float32)
    assert_close(jax_logits(module, variables, images), torch_logits(model, images))
