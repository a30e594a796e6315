"""The recipe's model overrides reach the model: unset ones leave MambaVision's defaults, set ones (as
``--config.model.<name>=...`` sets them) become its fields."""

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
