"""selective_scan with Δ far above softplus' threshold (the random inputs of test_selective_scan stay below it): every
impl, Pallas in interpret mode, against the float64 reference, forward and gradients finite and exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.pallas import selective_scan, selective_scan_pallas
from mambavision_jax.pallas.testing import ARG_NAMES, make_inputs, reference_float64, rel_err


@pytest.mark.parametrize("impl", ["pallas", "sequential", "associative"])
def test_softplus_passes_large_deltas_through_with_finite_gradients(impl):
    """mamba_ssm's softplus returns Δ itself above 20: Δ + bias up to 150 (where exp overflows float32) gives the
    reference's y and gradients, all finite (dΔ = dy-weighted, as for the identity; no NaN from the unselected
    log1p(exp(Δ)) branch)."""
    rng = np.random.default_rng(0)
    args = list(make_inputs(rng, 2, 9, 16, 8, softplus=True))
    pre = rng.choice([-3.0, 0.5, 25.0, 60.0, 100.0, 150.0], size=args[1].shape)  # every regime of softplus
    args[1] = jnp.asarray(pre, jnp.float32)
    args[0] = args[0] * 1e-2  # keeps y = C·h moderate with Δ up to 150
    dy = jnp.asarray(rng.normal(0.0, 1.0, args[0].shape), jnp.float32)

    def scan(*a):
        if impl == "pallas":
            return selective_scan_pallas(*a, delta_softplus=True, interpret=True)
        return selective_scan(*a, delta_softplus=True, impl=impl)

    y, vjp = jax.vjp(scan, *args)
    grads = vjp(dy)
    y_ref, g_ref = reference_float64(args, dy, True)
    assert np.isfinite(np.asarray(y)).all() and rel_err(y, y_ref) <= 1e-5
    for name, grad, want in zip(ARG_NAMES, grads, g_ref):
        assert np.isfinite(np.asarray(grad)).all(), f"d{name} not finite"
        assert rel_err(grad, want) <= 1e-4, f"d{name} rel err {rel_err(grad, want):.2e}"
