"""Loading a training config file (configs/*.py) for the benchmarks, as ``main.py --config=...`` does."""

import importlib.util
import os


def load_config(path: str):
    """``get_config()`` of the config file at ``path``."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
