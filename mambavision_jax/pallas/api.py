"""Public entry point: :func:`selective_scan` and implementation dispatch."""

from __future__ import annotations

import jax

from mambavision_jax.pallas import reference
from mambavision_jax.pallas.vjp import selective_scan_pallas

__all__ = ["IMPLS", "selective_scan", "resolve_impl"]

IMPLS = ("auto", "sequential", "associative", "pallas", "pallas_triton")

# Non-GPU choice of "auto". Measured on the 2-core CPU host (jax 0.10.2, jitted, d_state 8, softplus + bias + D;
# medians of 5, ms, sequential vs associative; see benchmarks/NOTES.md): sequential wins everywhere.
#   b8  L196 d160: fwd 2.3 vs 12.7, fwd+bwd 12.6 vs 45.3    b8  L49 d320: fwd 0.8 vs 2.4, fwd+bwd 5.6 vs 31.5
#   b32 L196 d160: fwd 6.4 vs 95.8, fwd+bwd 102 vs 275      b32 L49 d320: fwd 3.8 vs 36.3, fwd+bwd 48.8 vs 127
_CPU_AUTO = "sequential"


def resolve_impl(impl: str) -> str:
    """Maps ``impl`` to a concrete implementation name ("sequential", "associative" or "pallas")."""
    if impl not in IMPLS:
        raise ValueError(f"unknown selective_scan impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else _CPU_AUTO
    return "pallas" if impl == "pallas_triton" else impl


def selective_scan(
    u, delta, A, B, C, D=None, delta_bias=None, *, delta_softplus=False, impl="auto", interpret: bool | None = None
):
    """Selective scan with mamba_ssm semantics (``z=None``), differentiable in every array argument.

    Args:
      u, delta: (batch, length, dim), float32/bfloat16/float16.
      A: (dim, d_state) float32.
      B, C: (batch, length, d_state), shared by all channels.
      D, delta_bias: (dim,) or None.
      delta_softplus: apply softplus (``x > 20 → x``) to ``delta + delta_bias``.
      impl: "auto" (Pallas on GPU, else the faster pure-JAX scan on CPU), "sequential" (``lax.scan``),
        "associative" (``lax.associative_scan``), "pallas" / "pallas_triton" (Pallas Triton kernels).
      interpret: run the Pallas kernels in interpret mode; None: only off a GPU (as ``add_layer_norm``), so
        ``impl="pallas"`` also runs, slowly, on the CPU.

    Returns:
      y: (batch, length, dim) in u's dtype, with
      ``h_t = exp(Δ_t A)·h_{t-1} + Δ_t B_t u_t`` (h_{-1} = 0, float32) and ``y_t = C_t·h_t + D·u_t``.
    """
    impl = resolve_impl(impl)
    reference.check_arguments(u, delta, A, B, C, D, delta_bias)
    if impl == "pallas":
        return selective_scan_pallas(
            u, delta, A, B, C, D, delta_bias, delta_softplus=delta_softplus, interpret=interpret
        )
    fn = reference.scan_sequential if impl == "sequential" else reference.scan_associative
    return fn(u, delta, A, B, C, D, delta_bias, delta_softplus=delta_softplus)
