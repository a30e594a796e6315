"""Registry: names, aliases, parameter counts of every official variant, pretrained configs, errors."""

import jax
import numpy as np
import pytest

import mambavision_jax as mvj
from mambavision_jax.weights.loading import abstract_variables

OFFICIAL_PARAM_COUNTS = {  # official PyTorch models built with mambavision==1.2.0 (reference §1)
    "mamba_vision_T": 31_794_248,
    "mamba_vision_T2": 35_104_008,
    "mamba_vision_S": 50_140_584,
    "mamba_vision_B": 97_685_288,
    "mamba_vision_B_21k": 97_685_288,
    "mamba_vision_L": 227_961_048,
    "mamba_vision_L_21k": 227_961_048,
    "mamba_vision_L2": 241_554_824,
    "mamba_vision_L2_512_21k": 241_554_824,
    "mamba_vision_L3_256_21k": 739_570_472,
    "mamba_vision_L3_512_21k": 739_570_472,
}


def test_list_models_has_the_eleven_official_names():
    assert mvj.list_models() == list(OFFICIAL_PARAM_COUNTS)


@pytest.mark.parametrize("name", list(OFFICIAL_PARAM_COUNTS))
def test_parameter_count_equals_official(name):
    abstract = abstract_variables(mvj.create_model(name))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"])) == OFFICIAL_PARAM_COUNTS[name]


@pytest.mark.parametrize(
    "alias,name",
    [
        ("mambavision_tiny", "mamba_vision_T"),
        ("mambavision_large3_512_21k", "mamba_vision_L3_512_21k"),
        ("nvidia/MambaVision-B-21K", "mamba_vision_B_21k"),
        ("MambaVision-T2-1K", "mamba_vision_T2"),
    ],
)
def test_aliases_resolve(alias, name):
    assert mvj.models.resolve_name(alias) == name
    assert mvj.create_model(alias) == mvj.create_model(name)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="mamba_vision_T2") as info:
        mvj.create_model("mamba_vision_L3")
    assert "Valid names" in str(info.value) and "mamba_vision_L3_512_21k" in str(info.value)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="num_class"):
        mvj.create_model("mamba_vision_T", num_class=10)


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(num_classes=-1), "num_classes must be >= 0"),
        (dict(window_size=[8, 8, 0, 7]), "window_size must be >= 1"),
        (dict(num_heads=[2, 4, 0, 16]), "num_heads must be >= 1"),
    ],
)
def test_out_of_range_overrides_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        mvj.create_model("mamba_vision_T", **override)


def test_overrides_apply():
    model = mvj.create_model("mamba_vision_T", num_classes=7, window_size=[8, 8, 7, 7], drop_path_rate=0.0)
    assert (model.num_classes, model.window_size, model.drop_path_rate) == (7, (8, 8, 7, 7), 0.0)


@pytest.mark.parametrize(
    "name,size,crop_pct,crop_mode",
    [
        ("mamba_vision_T", 224, 1.0, "center"),
        ("mamba_vision_T2", 224, 0.98, "center"),
        ("mamba_vision_S", 224, 0.93, "center"),
        ("mamba_vision_L2_512_21k", 512, 0.93, "squash"),
        ("mamba_vision_L3_256_21k", 256, 1.0, "center"),
    ],
)
def test_pretrained_cfg(name, size, crop_pct, crop_mode):
    cfg = mvj.pretrained_cfg(name)
    assert cfg["input_size"] == (3, size, size)
    assert (cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"]) == (crop_pct, crop_mode, "bicubic")
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_list_models_filters_like_timm():
    """A positional pattern filters, as timm.list_models('mamba_vision_L*'); it used to be taken as
    include_aliases=True and return every name and alias."""
    assert mvj.list_models("mamba_vision_L3*") == ["mamba_vision_L3_256_21k", "mamba_vision_L3_512_21k"]
    assert mvj.list_models("*tiny*", include_aliases=True) == ["mambavision_tiny", "mambavision_tiny2"]
    assert len(mvj.list_models(include_aliases=True)) == 22
    with pytest.raises(TypeError, match="filter must be a name pattern"):
        mvj.list_models(True)
