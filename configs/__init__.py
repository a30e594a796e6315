"""Training configs (``get_config()`` -> ml_collections.ConfigDict); the official recipe lives in
``mambavision_jax/train/recipe.py``."""
