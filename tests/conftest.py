"""Test configuration: the PyTorch reference stack (official MambaVision on CPU) and float32 'highest' matmuls.

``tests/ref_shims`` holds test-only stand-ins that the official model needs on CPU: a pure-PyTorch
``mamba_ssm.ops.selective_scan_interface`` and a fix that lets PyPI's torchvision import beside CPU torch.
"""

import importlib.util
import os
import sys

# The tests' programs are small and mostly run once, so XLA's CPU compile time dominates the suite: LLVM's
# optimisation level 0 cuts the suite's time by about a quarter (the programs compute the same values, more slowly).
# Set before the backend starts, on hosts without a JAX plugin (JAX's CUDA plugins live in ``jax_plugins``: GPU
# kernels keep the default); subprocesses that the tests start inherit it. A level already in XLA_FLAGS is kept.
_has_jax_plugin = importlib.util.find_spec("jax_plugins") is not None
if not _has_jax_plugin and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ref_shims"))
sys.path.insert(0, os.path.dirname(__file__))
try:
    import tv_cpu_fix

    tv_cpu_fix.apply()
except ImportError:  # no torch in this environment: reference tests skip themselves
    pass

jax.config.update("jax_default_matmul_precision", "highest")
