"""MambaVision in JAX/Flax: the official variants, their checkpoints, and a Pallas GPU selective scan.

>>> import mambavision_jax as mvj
>>> model, variables = mvj.from_pretrained("mamba_vision_T", "mambavision_tiny_1k.pth.tar")
>>> apply = jax.jit(model.apply, compiler_options=mvj.compiler_options())  # faster XLA options for this platform
>>> logits = apply(variables, images)  # images: (B, 224, 224, 3) float, normalised, NHWC
"""

from mambavision_jax.models import MambaVision, create_model, list_models, pretrained_cfg
from mambavision_jax.weights import CheckpointError, from_pretrained
from mambavision_jax.xla_options import compiler_options

__all__ = [
    "CheckpointError",
    "MambaVision",
    "compiler_options",
    "create_model",
    "from_pretrained",
    "list_models",
    "pretrained_cfg",
]
__version__ = "0.1.0"
