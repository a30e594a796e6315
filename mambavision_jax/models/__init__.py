"""The MambaVision model family (linen modules) and its registry."""

from mambavision_jax.models.mamba_vision import MambaVision
from mambavision_jax.models.registry import create_model, list_models, pretrained_cfg, resolve_name

__all__ = ["MambaVision", "create_model", "list_models", "pretrained_cfg", "resolve_name"]
