"""A tiny MambaVision on digits (32x32) for the training tests: ``get_config()`` (also usable as --config)."""

import importlib.util
import os

import ml_collections

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("mambavision_configs_demo", os.path.join(_ROOT, "configs", "demo.py"))
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)

TINY_MODEL = dict(
    depths=(1, 1, 1, 1),
    dim=16,
    in_dim=8,
    num_heads=(1, 1, 2, 2),
    window_size=(4, 4, 2, 1),
    drop_path_rate=0.1,
    mlp_ratio=2.0,
)


def get_config():
    c = _demo.get_config()
    c.model = ml_collections.ConfigDict(TINY_MODEL)
    c.data.image_size = 32
    c.data.num_workers = 1
    c.batch_size_per_device = 16
    c.eval_batch_size_per_device = 128
    c.compute_dtype = "float32"
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
    c.progress_bar = False
    c.async_checkpointing = True
    return c
