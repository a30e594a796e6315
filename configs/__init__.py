"""Training configs (``get_config()`` -> ml_collections.ConfigDict). ``common.py`` holds the official recipe."""
