"""The recipe's model overrides reach the model: unset ones leave MambaVision's defaults, set ones (as
``--config.model.<name>=...`` sets them) become its fields. The configs evaluate with the official yamls' crop."""

import importlib.util
import os

import pytest

from mambavision_jax.data.config_utils import preprocess_settings
from mambavision_jax.train import loop
from mambavision_jax.train.recipe import recipe


def test_unset_model_overrides_leave_the_model_defaults():
    model = loop.build_model(recipe("mamba_vision_T"))
    assert (model.scan_impl, model.attention_impl, model.norm_impl, model.mlp_impl) == ("auto", "auto", "xla", "xla")
    assert model.drop_path_rate == 0.2


def test_implementation_choices_and_drop_path_reach_the_model():
    config = recipe("mamba_vision_T")
    config.model.mlp_impl = "mosaic"
    config.model.scan_impl = "sequential"
    config.model.drop_path_rate = 0.05
    model = loop.build_model(config)
    assert (model.mlp_impl, model.scan_impl, model.drop_path_rate) == ("mosaic", "sequential", 0.05)


# The training run's eval crop: each official yaml's crop_pct (NVlabs/MambaVision mambavision/configs/
# mambavision_*_1k.yaml at 7860a506b2eb: crop_pct 1.0, S 0.875), which timm's resolve_data_config(vars(args), model)
# in the official train.py prefers to the model's pretrained_cfg (T2 0.98, S 0.93). Mode and
# interpolation stay the pretrained_cfg's (center, bicubic): train.py has no --crop-mode and --interpolation is ''.
@pytest.mark.parametrize(
    "config_name,model_name,crop_pct",
    [
        ("tiny", "mamba_vision_T", 1.0),
        ("tiny2", "mamba_vision_T2", 1.0),
        ("small", "mamba_vision_S", 0.875),
        ("base", "mamba_vision_B", 1.0),
        ("large", "mamba_vision_L", 1.0),
        ("large2", "mamba_vision_L2", 1.0),
    ],
)
def test_configs_evaluate_with_the_official_yaml_crop_pct(config_name, model_name, crop_pct):
    config = _load_config(config_name)
    assert config.model_name == model_name
    pre = preprocess_settings(config)
    assert (pre.crop_pct, pre.crop_mode, pre.interpolation) == (crop_pct, "center", "bicubic")


def _load_config(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    spec = importlib.util.spec_from_file_location(f"mambavision_configs_{name}", os.path.join(path, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_overrides_set_fields_and_name_a_key_the_recipe_lacks():
    config = recipe("mamba_vision_T", **{"optimizer.lr": 1e-3, "mesa": 0.0, "model.depths": (1, 1, 1, 1)})
    assert (config.optimizer.lr, config.mesa, config.model.depths) == (1e-3, 0.0, (1, 1, 1, 1))
    for key in ("optimizer.lrr", "optimiser.lr", "eval_preprocess.crop_pct.x"):
        with pytest.raises(ValueError, match=f"recipe override '{key}' names no field"):
            recipe("mamba_vision_T", **{key: 1.0})
