"""Test configuration: the PyTorch reference stack (official MambaVision on CPU) and float32 'highest' matmuls.

``tests/ref_shims`` holds test-only stand-ins that the official model needs on CPU: a pure-PyTorch
``mamba_ssm.ops.selective_scan_interface`` and a fix that lets PyPI's torchvision import beside CPU torch.
"""

import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ref_shims"))
sys.path.insert(0, os.path.dirname(__file__))
try:
    import tv_cpu_fix

    tv_cpu_fix.apply()
except ImportError:  # no torch in this environment: reference tests skip themselves
    pass

jax.config.update("jax_default_matmul_precision", "highest")
