"""Weights: the key map to the official checkpoints, their readers, and the converted-directory format."""

from mambavision_jax.weights.converted import is_converted_dir, load_converted, save_converted
from mambavision_jax.weights.loading import from_pretrained, load_state_dict
from mambavision_jax.weights.params import to_torch_state_dict
from mambavision_jax.weights.readers import CheckpointError, read_checkpoint

__all__ = [
    "CheckpointError",
    "from_pretrained",
    "is_converted_dir",
    "load_converted",
    "load_state_dict",
    "read_checkpoint",
    "save_converted",
    "to_torch_state_dict",
]
