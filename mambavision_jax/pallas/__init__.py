"""Selective scan (Mamba S6) for MambaVision: pure-JAX scans and Pallas-Triton GPU kernels.

``selective_scan(u, delta, A, B, C, D=None, delta_bias=None, *, delta_softplus=False, impl="auto",
interpret=None)`` (None: interpret the Pallas kernels off a GPU); ``IMPLS`` lists the valid ``impl`` names.
"""

from mambavision_jax.pallas.api import IMPLS, resolve_impl, selective_scan
from mambavision_jax.pallas.triton_kernels import KernelConfig, default_config
from mambavision_jax.pallas.vjp import selective_scan_pallas

__all__ = ["IMPLS", "KernelConfig", "default_config", "resolve_impl", "selective_scan", "selective_scan_pallas"]
