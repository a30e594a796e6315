"""custom_vjp wiring of the Pallas-Triton selective scan (forward and backward are both Pallas kernels).

Shapes as in :mod:`mambavision_jax.pallas.triton_kernels`. Each kernel call is batch-parallel under SPMD
(:mod:`mambavision_jax.pallas.partitioning`): with the batch sharded, every device scans its own rows. Absent
``D``/``delta_bias`` become zero vectors (their gradients are dropped by the caller); a ``d_state`` that is not a
power of two is zero-padded (padded states stay exactly 0 and contribute nothing; their gradients are sliced away
by autodiff of the pad).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mambavision_jax.pallas import reference, triton_kernels
from mambavision_jax.pallas.partitioning import batch_parallel
from mambavision_jax.pallas.triton_kernels import KernelConfig

__all__ = ["selective_scan_pallas"]


def _config(config, u, A, training):
    """``config``, or the default for u's (batch, length, dim) shape and A's d_state; inference (the primal alone)
    and training (the forward that saves states and its backward, which must agree) have separate defaults."""
    return config or triton_kernels.default_config(*u.shape, training=training, d_state=A.shape[1])


def _forward_kernels(training, u, delta, A, B, C, D, delta_bias, delta_softplus, config, interpret):
    """The forward kernel(s): ``(y,)`` for inference, ``(y, chunk-entry states)`` for training (the states its
    backward needs)."""
    y, states = triton_kernels.scan_forward(
        u,
        delta,
        A,
        B,
        C,
        D,
        delta_bias,
        delta_softplus=delta_softplus,
        save_states=training,
        config=_config(config, u, A, training),
        interpret=interpret,
    )
    return (y, states) if training else (y,)


def _backward_kernels(u, delta, A, B, C, D, delta_bias, states, dy, delta_softplus, config, interpret):
    """``(du, ddelta, dA, dB, dC, dD, d(delta_bias))``, dA/dD/d(delta_bias) summed over this call's batch rows."""
    return triton_kernels.scan_backward(
        u,
        delta,
        A,
        B,
        C,
        D,
        delta_bias,
        states,
        dy,
        delta_softplus=delta_softplus,
        config=_config(config, u, A, True),
        interpret=interpret,
    )


# Factors: b batch, l length, d dim, n d_state, c chunks. Each device scans its own batch rows.
_ARRAYS = "b l d, b l d, d n, b l n, b l n, d, d"
_forward_inference = batch_parallel(functools.partial(_forward_kernels, False), f"{_ARRAYS} -> b l d", num_static=3)
_forward_training = batch_parallel(
    functools.partial(_forward_kernels, True), f"{_ARRAYS} -> b l d, b c n d", num_static=3
)
_backward = batch_parallel(
    _backward_kernels,
    f"{_ARRAYS}, b c n d, b l d -> b l d, b l d, d n, b l n, b l n, d, d",
    num_static=3,
    summed_results=(2, 5, 6),
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _scan(u, delta, A, B, C, D, delta_bias, delta_softplus, config, interpret):
    return _forward_inference(u, delta, A, B, C, D, delta_bias, delta_softplus, config, interpret)[0]


def _scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, config, interpret):
    arrays = (u, delta, A, B, C, D, delta_bias)
    y, states = _forward_training(*arrays, delta_softplus, config, interpret)
    return y, (*arrays, states)


def _scan_bwd(delta_softplus, config, interpret, residuals, dy):
    u, delta, A, B, C, D, delta_bias, states = residuals
    du, ddelta, dA, dB, dC, dD, dbias = _backward(
        u, delta, A, B, C, D, delta_bias, states, dy, delta_softplus, config, interpret
    )
    return (
        du,
        ddelta,
        dA.astype(A.dtype),
        dB.astype(B.dtype),
        dC.astype(C.dtype),
        dD.astype(D.dtype),
        dbias.astype(delta_bias.dtype),
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_pallas(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    delta_bias=None,
    *,
    delta_softplus=False,
    interpret=None,
    config: KernelConfig | None = None,
):
    """Pallas-Triton selective scan, differentiable. ``config=None`` picks :func:`default_config` for inference
    or, under differentiation, for training. ``interpret=None`` runs the kernels in Pallas' interpreter off a GPU
    only (slow; for tests); pass False to lower them for CUDA from another backend."""
    reference.check_arguments(u, delta, A, B, C, D, delta_bias)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if any(isinstance(size, int) and size == 0 for size in u.shape):
        # nothing to scan, and the kernels' grids would be empty: the pure-JAX scan gives the empty y, zero gradients
        return reference.scan_sequential(u, delta, A, B, C, D, delta_bias, delta_softplus=delta_softplus)
    dim = u.shape[2]
    D = jnp.zeros((dim,), jnp.float32) if D is None else D
    delta_bias = jnp.zeros((dim,), jnp.float32) if delta_bias is None else delta_bias
    n = A.shape[1]
    n_pad = pl.next_power_of_2(n) - n
    if n_pad:
        A = jnp.pad(A, ((0, 0), (0, n_pad)))
        B, C = (jnp.pad(x, ((0, 0), (0, 0), (0, n_pad))) for x in (B, C))
    return _scan(u, delta, A, B, C, D, delta_bias, delta_softplus, config, interpret)
