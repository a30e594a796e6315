"""mamba_vision_T on ImageNet-1K with the official recipe (deltas live in configs/common.py VARIANTS)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "mambavision_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config():
  return common.get_config("mamba_vision_T")
