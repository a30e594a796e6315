"""Test and benchmark helpers: realistic random inputs and a float64 reference (forward + all gradients).

The reference is written independently of the implementations under test: its own ``lax.scan`` in float64
under a local ``enable_x64`` (nothing leaks to other code), differentiated by JAX autodiff, run on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ARG_NAMES", "gradient_magnitudes_float64", "make_inputs", "reference_float64", "rel_err"]

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def make_inputs(
    rng: np.random.Generator, batch, length, dim, n=8, dtype=jnp.float32, *, softplus=True, with_d=True, with_bias=True
):
    """Arguments of ``selective_scan`` (u, delta, A, B, C, D, delta_bias) on the default device.

    Realistic ranges: A = -exp(A_log), A_log ~ log U(1, 16); pre-softplus Δ ~ N(-0.5, 1), so decays are spread
    over (0, 1). Without softplus, Δ is passed already positive (softplus applied here) with a small positive
    bias. u, Δ, B, C in ``dtype``; A, D, delta_bias float32; D/delta_bias None when not wanted.
    """
    pre = rng.normal(-0.5, 1.0, (batch, length, dim))
    delta = pre if softplus else np.log1p(np.exp(pre))
    A = -np.exp(np.log(rng.uniform(1.0, 16.0, (dim, n))))
    bias = (rng.normal(0.0, 0.5, dim) if softplus else rng.uniform(0.0, 0.1, dim)) if with_bias else None
    D = rng.normal(0.0, 1.0, dim) if with_d else None
    cast = lambda x, t=dtype: None if x is None else jnp.asarray(x, t)
    return (
        cast(rng.normal(0.0, 1.0, (batch, length, dim))),
        cast(delta),
        cast(A, jnp.float32),
        cast(rng.normal(0.0, 1.0, (batch, length, n))),
        cast(rng.normal(0.0, 1.0, (batch, length, n))),
        cast(D, jnp.float32),
        cast(bias, jnp.float32),
    )


def _x64():
    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # older spelling
        from jax.experimental import enable_x64 as enable  # pylint: disable=g-import-not-at-top
    return enable(True)


def _forward64(u, delta, A, B, C, D, bias, softplus):
    dt = delta + bias
    if softplus:
        dt = jnp.where(dt > 20.0, dt, jnp.log1p(jnp.exp(jnp.minimum(dt, 20.0))))

    def step(h, x):
        dt_t, u_t, b_t, c_t = x
        h = jnp.exp(dt_t[:, :, None] * A) * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (dt, u, B, C))
    _, ys = jax.lax.scan(step, jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), A.dtype), xs)
    return jnp.swapaxes(ys, 0, 1) + D * u


@functools.cache
def _vjp64(softplus):
    def f(args, dy):
        y, vjp = jax.vjp(functools.partial(_forward64, softplus=softplus), *args)
        return y, vjp(dy)

    return jax.jit(f)


def reference_float64(args, dy, softplus: bool):
    """(y, [du, ddelta, dA, dB, dC, dD, d_delta_bias]) as float64 numpy for cotangent ``dy``.

    ``args`` as returned by :func:`make_inputs`; None D/delta_bias are treated as zeros.
    """
    dim = args[0].shape[2]
    host = [np.zeros(dim) if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in args]
    dy = np.asarray(jnp.asarray(dy, jnp.float32), np.float64)
    with _x64(), jax.default_device(jax.devices("cpu")[0]):
        y, grads = _vjp64(softplus)([jnp.asarray(a) for a in host], jnp.asarray(dy))
        return np.asarray(y), [np.asarray(g) for g in grads]


def gradient_magnitudes_float64(args, dy, softplus: bool):
    """Gradients of the same scan with the signs taken out (``|u|, |B|, |C|, |D|, |dy|``), as float64 numpy.

    Each is the size of the terms its gradient sums. Where those terms cancel (dB and dC of a one-token scan are
    one sum over channels), float32 rounding is bounded by this magnitude, not by the small true gradient.
    """
    signless = [None if a is None else (jnp.abs(a) if name in "uBCD" else a) for name, a in zip(ARG_NAMES, args)]
    return reference_float64(signless, jnp.abs(dy), softplus)[1]


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
