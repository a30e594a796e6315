"""Pure-JAX selective scans (mamba_ssm semantics, ``z=None``) and the shared prologue.

Layout everywhere: ``u``, ``delta``, ``y``: (batch, length, dim); ``A``: (dim, d_state);
``B``, ``C``: (batch, length, d_state); ``D``, ``delta_bias``: (dim,). State ``h``: (batch, dim, d_state),
always float32.

Both scans are differentiated by JAX autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_arguments", "delta_transform", "softplus", "scan_sequential", "scan_associative"]

SOFTPLUS_THRESHOLD = 20.0


def check_arguments(u, delta, A, B, C, D, delta_bias):
    """Raises a ValueError naming the argument and its shape unless the shapes are as in this module's layout, or a
    TypeError for a non-floating-point array (which would be scanned in integer arithmetic)."""

    def fail(name, arr, expected):
        raise ValueError(
            f"selective_scan: {name} must have shape {expected}, got {tuple(arr.shape)} "
            f"(u: {tuple(u.shape)}, A: {tuple(A.shape)})"
        )

    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must be (batch, length, dim), got shape {tuple(u.shape)}")
    for name, arr in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias)):
        if arr is not None and not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"selective_scan: {name} must be floating point, got {arr.dtype}")
    batch, length, dim = u.shape
    if A.ndim != 2 or A.shape[0] != dim:
        fail("A", A, "(dim, d_state)")
    n = A.shape[1]
    if delta.shape != u.shape:
        fail("delta", delta, (batch, length, dim))
    for name, arr in (("B", B), ("C", C)):
        if arr.shape != (batch, length, n):
            fail(name, arr, (batch, length, n))
    for name, arr in (("D", D), ("delta_bias", delta_bias)):
        if arr is not None and arr.shape != (dim,):
            fail(name, arr, (dim,))


def softplus(x: jax.Array) -> jax.Array:
    """mamba_ssm's softplus: ``log1p(exp(x))``, and ``x`` itself for ``x > 20`` (no overflow)."""
    safe = jnp.minimum(x, SOFTPLUS_THRESHOLD)
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(safe)))


def delta_transform(delta, delta_bias, delta_softplus: bool):
    """Δ prologue shared by every implementation: float32 ``delta (+ bias)``, then optional softplus.

    ``delta``: (..., dim) any float dtype; ``delta_bias``: (dim,) or None. Returns float32 (..., dim).
    """
    dt = delta.astype(jnp.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(jnp.float32)
    if delta_softplus:
        dt = softplus(dt)
    return dt


def _epilogue(y, u, D):
    """Adds the ``D·u`` skip and casts to u's dtype. ``y``: (batch, length, dim) float32."""
    if D is not None:
        y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
    return y.astype(u.dtype)


def scan_sequential(u, delta, A, B, C, D=None, delta_bias=None, *, delta_softplus=False):
    """``jax.lax.scan`` over time; only the (batch, dim, d_state) state is carried (no (b,l,d,n) tensor)."""
    dt = delta_transform(delta, delta_bias, delta_softplus)
    A32 = A.astype(jnp.float32)
    batch, _, dim = u.shape
    # Time-major views: (length, batch, ...).
    xs = (
        jnp.swapaxes(dt, 0, 1),
        jnp.swapaxes(u.astype(jnp.float32), 0, 1),
        jnp.swapaxes(B.astype(jnp.float32), 0, 1),
        jnp.swapaxes(C.astype(jnp.float32), 0, 1),
    )

    def step(h, x):
        dt_t, u_t, b_t, c_t = x  # (batch, dim), (batch, dim), (batch, n), (batch, n)
        decay = jnp.exp(dt_t[:, :, None] * A32)
        h = decay * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    h0 = jnp.zeros((batch, dim, A.shape[1]), jnp.float32)
    _, ys = jax.lax.scan(step, h0, xs)
    return _epilogue(jnp.swapaxes(ys, 0, 1), u, D)


def scan_associative(u, delta, A, B, C, D=None, delta_bias=None, *, delta_softplus=False):
    """``jax.lax.associative_scan`` over (decay, input) pairs; materialises (batch, length, dim, d_state)."""
    dt = delta_transform(delta, delta_bias, delta_softplus)
    decay = jnp.exp(dt[..., None] * A.astype(jnp.float32))
    inp = (dt * u.astype(jnp.float32))[..., None] * B.astype(jnp.float32)[:, :, None, :]

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    _, h = jax.lax.associative_scan(combine, (decay, inp), axis=1)
    y = jnp.einsum("bldn,bln->bld", h, C.astype(jnp.float32))
    return _epilogue(y, u, D)
