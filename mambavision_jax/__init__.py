"""MambaVision in JAX/Flax: the official variants, their checkpoints, and a Pallas GPU selective scan.

>>> import mambavision_jax as mvj
>>> model, variables = mvj.from_pretrained("mamba_vision_T", "mambavision_tiny_1k.pth.tar")
>>> logits = model.apply(variables, images)  # images: (B, 224, 224, 3) float, normalised, NHWC
"""

from mambavision_jax.models import MambaVision, create_model, list_models, pretrained_cfg
from mambavision_jax.weights import CheckpointError, from_pretrained

__all__ = ["CheckpointError", "MambaVision", "create_model", "from_pretrained", "list_models", "pretrained_cfg"]
__version__ = "0.1.0"
