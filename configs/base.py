"""mamba_vision_B on ImageNet-1K with the official recipe (per-variant deltas: mambavision_jax/train/recipe.py)."""

from mambavision_jax.train.recipe import recipe


def get_config():
    return recipe("mamba_vision_B")
