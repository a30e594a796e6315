"""The transformer MLP ``fc2(GELU(fc1(x)))`` (exact erf GELU) with the GELU fused into the GEMMs around it.

XLA runs the GELU, its derivative and fc1's bias gradient as separate memory-bound passes over the (tokens, hidden)
activations (B's stage-3 MLPs: 2.1 ms of a 37 ms training step on an H200, ``benchmarks/NOTES.md`` session 14).
Here two Pallas-Triton GEMMs carry them in their epilogues:

- forward: ``fc1`` writes ``h = x @ w1 + b1`` (kept for the backward) and ``g = GELU(h)`` from the same accumulator;
  fc2 is an ordinary GEMM on ``g``.
- backward: ``dg = dy @ w2ᵀ`` is computed tile by tile and leaves the kernel as ``dh = dg · GELU'(h)`` together with
  per-tile partial sums of ``dh`` over tokens (fc1's bias gradient); the other four GEMMs are ordinary ones.

Measured on an H200 (session 15): 10-25 % slower than XLA's cuBLAS GEMMs with the separate passes at MambaVision's
stage-3/4 shapes, so the model's default stays ``mlp_impl="xla"``.

Layouts: tokens (M, K) row-major, ``w1`` (K, H), ``w2`` (H, N) as ``nn.Dense`` stores them (in, out). The GEMMs take
the compute dtype (bf16/fp16/f32) and accumulate in float32; ``h`` and ``g`` are stored in the compute dtype.
``impl="xla"`` is the same math in plain JAX (the reference).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mambavision_jax.pallas.partitioning import batch_parallel
from mambavision_jax.pallas.tiles import largest_tile

IMPLS = ("xla", "pallas")
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def gelu(h: jax.Array) -> jax.Array:
    """Exact GELU in float32 with XLA's erf: h/2 · (1 + erf(h/√2)) (the reference)."""
    return 0.5 * h * (1.0 + jax.lax.erf(h * _SQRT_HALF))


def gelu_derivative(h: jax.Array) -> jax.Array:
    """d GELU / dh in float32 with XLA's erf: Φ(h) + h·φ(h)."""
    return 0.5 * (1.0 + jax.lax.erf(h * _SQRT_HALF)) + h * _INV_SQRT_2PI * jnp.exp(-0.5 * h * h)


# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t·P(t)·exp(-x²), t = 1 / (1 + p·x), x >= 0; |error| <= 1.5e-7 in exact
# arithmetic, 5.3e-7 in float32 over [-8, 8] (checked against math.erf; XLA's float32 erf: 6.7e-7). Pallas'
# Triton lowering has no erf, and this form's exp(-x²) = exp(-h²/2) is the exp GELU's derivative needs anyway.
_AS_P = 0.3275911
_AS_COEFFICIENTS = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def _normal_cdf_and_pdf(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Φ(h), φ(h)) in float32 from one exp, for the kernels."""
    x = jnp.abs(h) * _SQRT_HALF
    t = 1.0 / (1.0 + _AS_P * x)
    poly = _AS_COEFFICIENTS[0]
    for c in _AS_COEFFICIENTS[1:]:
        poly = poly * t + c
    e = jnp.exp(-x * x)
    erf_abs = 1.0 - poly * t * e
    erf = jnp.where(h < 0, -erf_abs, erf_abs)
    return 0.5 * (1.0 + erf), _INV_SQRT_2PI * e


def gelu_mlp_reference(x, w1, b1, w2, b2):
    """``GELU(x @ w1 + b1) @ w2 + b2`` in plain JAX, GEMMs in x's dtype with float32 accumulation. (M, K) -> (M, N)."""
    h = jnp.dot(x, w1, preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
    g = gelu(h).astype(x.dtype)
    return (jnp.dot(g, w2, preferred_element_type=jnp.float32) + b2.astype(jnp.float32)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """Tile sizes of the fused GEMMs: rows (tokens) ``block_m``, output columns ``block_n``, reduction ``block_k``."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


def _largest_tile(size: int, limit: int) -> int | None:
    """The largest power-of-two tile of at least 16 and at most ``limit`` dividing ``size`` (None if none)."""
    return largest_tile(size, limit, smallest=16)


def fused_tiles(m: int, k: int, hidden: int, n: int, preferred: GemmTiles = GemmTiles()) -> GemmTiles | None:
    """Tiles that divide every dimension of the two fused GEMMs (fc1: (m, k) @ (k, hidden); fc2's input gradient:
    (m, n) @ (n, hidden)), or None when a dimension has no power-of-two tile of at least 16 (then the MLP runs
    as XLA ops)."""
    tiles = [_largest_tile(m, preferred.block_m), _largest_tile(hidden, preferred.block_n)]
    tiles += [_largest_tile(k, preferred.block_k), _largest_tile(n, preferred.block_k)]
    if None in tiles:
        return None
    block_m, block_n, block_k1, block_k2 = tiles
    return dataclasses.replace(preferred, block_m=block_m, block_n=block_n, block_k=min(block_k1, block_k2))


def _fc1_gelu_kernel(x_ref, w_ref, b_ref, h_ref, g_ref, *, block_k: int, k_steps: int):
    """One (block_m, block_n) tile: h = x @ w + b and g = GELU(h) from one float32 accumulator."""

    def step(i, acc):
        xs = x_ref[:, pl.ds(i * block_k, block_k)]
        ws = w_ref[pl.ds(i * block_k, block_k), :]
        return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

    acc = jnp.zeros(h_ref.shape, jnp.float32)
    h = jax.lax.fori_loop(0, k_steps, step, acc) + b_ref[...].astype(jnp.float32)[None, :]
    h_ref[...] = h.astype(h_ref.dtype)
    g_ref[...] = (h * _normal_cdf_and_pdf(h)[0]).astype(g_ref.dtype)


def _dgelu_kernel(dy_ref, w_ref, h_ref, dh_ref, db_ref, *, block_k: int, k_steps: int):
    """One (block_m, block_n) tile of dh = (dy @ w2ᵀ) · GELU'(h), and its column sums (fc1's bias gradient)."""

    def step(i, acc):
        d = dy_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[:, pl.ds(i * block_k, block_k)]
        return acc + jax.lax.dot_general(d, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    dg = jax.lax.fori_loop(0, k_steps, step, jnp.zeros(dh_ref.shape, jnp.float32))
    h = h_ref[...].astype(jnp.float32)
    cdf, pdf = _normal_cdf_and_pdf(h)
    dh = dg * (cdf + h * pdf)
    dh_ref[...] = dh.astype(dh_ref.dtype)
    db_ref[...] = jnp.sum(dh, axis=0, keepdims=True)


def _compiler_params(tiles: GemmTiles):
    return plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _local_tiles(m: int, tiles: GemmTiles) -> GemmTiles | None:
    """``tiles`` with block_m refitted to the rows one device holds (None if no tile of 16 or more divides them)."""
    block_m = _largest_tile(m, tiles.block_m)
    return None if block_m is None else dataclasses.replace(tiles, block_m=block_m)


def fc1_gelu(x, w1, b1, tiles: GemmTiles, interpret: bool = False):
    """(M, K) @ (K, H) + b1 -> (h, GELU(h)), both (M, H) in x's dtype."""
    local = _local_tiles(x.shape[0], tiles)
    if local is None:  # this device's rows fit no tile: the same math in XLA
        h = jnp.dot(x, w1, preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
        return h.astype(x.dtype), gelu(h).astype(x.dtype)
    tiles = local
    m, k = x.shape
    hidden = w1.shape[1]
    grid = (m // tiles.block_m, hidden // tiles.block_n)
    kernel = functools.partial(_fc1_gelu_kernel, block_k=tiles.block_k, k_steps=k // tiles.block_k)
    out_block = pl.BlockSpec((tiles.block_m, tiles.block_n), lambda i, j: (i, j))
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, hidden), x.dtype), jax.ShapeDtypeStruct((m, hidden), x.dtype)),
        grid=grid,
        in_specs=[
            pl.BlockSpec((tiles.block_m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k, tiles.block_n), lambda i, j: (0, j)),
            pl.BlockSpec((tiles.block_n,), lambda i, j: (j,)),
        ],
        out_specs=(out_block, out_block),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name="gelu_mlp_fc1",
    )(x, w1, b1)


def dgelu(dy, w2, h, tiles: GemmTiles, interpret: bool = False):
    """dy (M, N), w2 (H, N), h (M, H) -> (dh (M, H) in h's dtype, db1 (H,) float32)."""
    local = _local_tiles(dy.shape[0], tiles)
    if local is None:  # this device's rows fit no tile: the same math in XLA
        dg = jax.lax.dot_general(dy, w2, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dh = dg * gelu_derivative(h.astype(jnp.float32))
        return dh.astype(h.dtype), jnp.sum(dh, axis=0)
    tiles = local
    m, n = dy.shape
    hidden = w2.shape[0]
    grid = (m // tiles.block_m, hidden // tiles.block_n)
    kernel = functools.partial(_dgelu_kernel, block_k=tiles.block_k, k_steps=n // tiles.block_k)
    dh, partial_sums = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((m, hidden), h.dtype),
            jax.ShapeDtypeStruct((grid[0], hidden), jnp.float32),
        ),
        grid=grid,
        in_specs=[
            pl.BlockSpec((tiles.block_m, n), lambda i, j: (i, 0)),
            pl.BlockSpec((tiles.block_n, n), lambda i, j: (j, 0)),
            pl.BlockSpec((tiles.block_m, tiles.block_n), lambda i, j: (i, j)),
        ],
        out_specs=(
            pl.BlockSpec((tiles.block_m, tiles.block_n), lambda i, j: (i, j)),
            pl.BlockSpec((1, tiles.block_n), lambda i, j: (i, j)),
        ),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name="gelu_mlp_dgelu",
    )(dy, w2, h)
    return dh, jnp.sum(partial_sums, axis=0)


# Batch-parallel over the token rows (:mod:`mambavision_jax.pallas.partitioning`): with the rows sharded, every device
# runs the kernels on its own and fc1's bias gradient is psum-ed; the weights are replicated.
_fc1_gelu_rows = batch_parallel(fc1_gelu, "b k, k h, h -> b h, b h", num_static=2)
_dgelu_rows = batch_parallel(dgelu, "b n, h n, b h -> b h, h", num_static=2, summed_results=(1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(x, w1, b1, w2, b2, tiles, interpret):
    return _fused_forward(x, w1, b1, w2, b2, tiles, interpret)[0]


def _fused_forward(x, w1, b1, w2, b2, tiles, interpret):
    h, g = _fc1_gelu_rows(x, w1, b1, tiles, interpret)
    y = (jnp.dot(g, w2, preferred_element_type=jnp.float32) + b2.astype(jnp.float32)).astype(x.dtype)
    return y, (x, w1, b1, w2, b2, h, g)


def _fused_backward(tiles, interpret, residuals, dy):
    x, w1, b1, w2, b2, h, g = residuals
    dy = dy.astype(x.dtype)
    dw2 = jnp.dot(g.T, dy, preferred_element_type=jnp.float32).astype(w2.dtype)
    db2 = jnp.sum(dy.astype(jnp.float32), axis=0).astype(b2.dtype)
    dh, db1 = _dgelu_rows(dy, w2, h, tiles, interpret)
    dw1 = jnp.dot(x.T, dh, preferred_element_type=jnp.float32).astype(w1.dtype)
    dx = jnp.dot(dh, w1.T, preferred_element_type=jnp.float32).astype(x.dtype)
    return dx, dw1, db1.astype(b1.dtype), dw2, db2


_fused.defvjp(_fused_forward, _fused_backward)


def gelu_mlp(
    x, w1, b1, w2, b2, *, impl: str = "xla", tiles: GemmTiles | None = None, interpret: bool | None = None
):
    """``GELU(x @ w1 + b1) @ w2 + b2`` (exact GELU), differentiable in every argument.

    Args:
      x: (..., K) tokens in the compute dtype; leading axes are flattened into M rows.
      w1: (K, H), b1: (H,), w2: (H, N), b2: (N,): weights in the compute dtype, biases in any float dtype.
      impl: "xla" (plain JAX) or "pallas" (the fused Pallas-Triton GEMMs; falls back to "xla" when a dimension
        has no power-of-two tile of at least 16, see :func:`fused_tiles`).
      tiles: tile sizes for "pallas" (default :class:`GemmTiles`, shrunk to fit the shapes).
      interpret: run the Pallas kernels in interpret mode; None: only off a GPU (so that CPU tests run them).

    Returns:
      (..., N) in x's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown gelu_mlp impl {impl!r}; valid: {', '.join(IMPLS)}")
    lead, k = x.shape[:-1], x.shape[-1]
    if w1.shape[0] != k or w2.shape[0] != w1.shape[1] or b1.shape != w1.shape[1:] or b2.shape != w2.shape[1:]:
        raise ValueError(
            f"gelu_mlp: shapes do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, "
            f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}"
        )
    rows = x.reshape(math.prod(lead), k)
    fitted = fused_tiles(rows.shape[0], k, w1.shape[1], w2.shape[1], tiles or GemmTiles()) if impl == "pallas" else None
    if fitted is None:
        y = gelu_mlp_reference(rows, w1, b1, w2, b2)
    else:
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        y = _fused(rows, w1, b1, w2, b2, fitted, bool(interpret))
    return y.reshape(*lead, w2.shape[1])
