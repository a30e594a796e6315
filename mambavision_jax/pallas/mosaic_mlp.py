"""The transformer blocks' MLP, fc1 -> exact GELU -> fc2, with GELU fused into Pallas Mosaic GPU GEMMs (Hopper).

XLA runs each of the MLP's GEMMs on cuBLAS and GELU, its gradient and the bias add as separate passes over the
(tokens, 4C) hidden activations. Here two persistent, warp-specialised GEMM kernels carry them in their epilogues:

- forward, :func:`dense_gelu`: g = GELU(x·w1 + b1), and in training also the pre-activation h = x·w1 + b1;
- backward, :func:`matmul_gelu_grad`: fc2's input gradient with GELU's backward, dh = (dy·w2ᵀ) ⊙ GELU'(h), where
  each output tile's h is fetched by TMA while the tile's main loop runs.

:func:`gelu_mlp` is the whole MLP with a custom VJP around them: fc2, the weight gradients, fc1's input gradient
and the bias gradients stay XLA's. Layouts: tokens (M, C) row-major, kernels as flax's Dense holds them (in, out),
biases (out,); 16-bit activations and weights, float32 accumulation and epilogue math.

The kernels need M, the token rows, to be a multiple of the CTA's row tile (128 or 256) and C and 4C multiples of
its column tiles (:func:`tiling_error` names what does not fit). Each CTA (one per SM) walks its output tiles in a
snake order; a memory warpgroup streams x's row block and w's column block through shared memory by TMA; two
compute warpgroups each accumulate a (tile_m, tile_n) float32 tile with WGMMA, then apply the epilogue and store
16-bit chunks of ``epilogue_n`` columns by TMA (the forward from a ring of two staging buffers, the backward from
h's own buffer, which each chunk's result overwrites).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mambavision_jax.models.layers import gelu_erf
from mambavision_jax.pallas.partitioning import batch_parallel

__all__ = [
    "Tiling",
    "default_tiling",
    "dense_gelu",
    "gelu_erf_as",
    "gelu_erf_grad_as",
    "gelu_mlp",
    "gelu_mlp_xla",
    "interpret_params",
    "matmul_gelu_grad",
    "matmul_gelu_grad_xla",
    "tiling_error",
]

# Abramowitz & Stegun 7.1.26: erf(z) ≈ 1 - (a1 t + ... + a5 t^5) exp(-z^2), t = 1 / (1 + p z), z >= 0;
# |error| <= 1.5e-7. Pallas' Mosaic GPU lowering of erf leaves it to MLIR's math dialect; this form is an exp2, a
# division and a polynomial, and its exp(-z^2) is also the Gaussian density GELU's gradient needs.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_LOG2E = 1.4426950408889634
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _erf_abs_and_gaussian(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(erf(|x|/√2), exp(-x²/2)) for float32 x."""
    z = jnp.abs(x) * _INV_SQRT2
    t = 1.0 / (1.0 + _AS_P * z)
    poly = t * (_AS_A[0] + t * (_AS_A[1] + t * (_AS_A[2] + t * (_AS_A[3] + t * _AS_A[4]))))
    gaussian = jnp.exp2(-(z * z) * _LOG2E)
    return 1.0 - poly * gaussian, gaussian


def gelu_erf_as(x: jax.Array) -> jax.Array:
    """Exact GELU, x/2 · (1 + erf(x/√2)), float32 in and out; within 1e-6 of ``jax.nn.gelu(approximate=False)``."""
    erf_abs, _ = _erf_abs_and_gaussian(x)
    return 0.5 * x + 0.5 * jnp.abs(x) * erf_abs  # = x/2 · (1 + sign(x) · erf(|x|/√2))


def gelu_erf_grad_as(x: jax.Array) -> jax.Array:
    """d GELU / dx = Φ(x) + x·φ(x) (Φ, φ: the standard normal's CDF and density), float32 in and out."""
    erf_abs, gaussian = _erf_abs_and_gaussian(x)
    return 0.5 + 0.5 * jnp.sign(x) * erf_abs + _INV_SQRT_2PI * x * gaussian


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Each compute warpgroup owns a (tile_m, tile_n) output tile; the CTA's two warpgroups sit side by side along
    ``split`` ("m": the CTA covers 2·tile_m rows; "n": 2·tile_n columns). tile_k of the reduction a pipeline step,
    ``stages`` steps in flight, ``epilogue_n`` columns a store, ``snake`` tiles a band of the CTA's walk over the
    output tiles (L2 reuse)."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 3
    epilogue_n: int = 64
    split: str = "m"
    snake: int = 8

    @property
    def cta(self) -> tuple[int, int]:
        """The CTA's output tile, (rows, columns)."""
        if self.split == "m":
            return 2 * self.tile_m, self.tile_n
        return self.tile_m, 2 * self.tile_n


def default_tiling(m: int, n: int, backward: bool = False) -> Tiling:
    """128 x 128 a warpgroup, the warpgroups split along M where M tiles by 256, else along N (stage 4: 49 rows an
    image), 32 columns a store, bands of 16 tiles: the fastest or within 2 % of it at every MambaVision-T/B shape
    (benchmarks/NOTES.md session 19). The forward pipelines 4 steps (with its 32 KB staging ring the pipeline's
    192 KB fill shared memory); the backward, whose prefetched h takes 64 KB, pipelines 3."""
    split = "m" if m % 256 == 0 or n % 256 else "n"
    return Tiling(split=split, stages=3 if backward else 4, epilogue_n=32, snake=16)


def tiling_error(m: int, k: int, n: int, tiling: Tiling) -> Optional[str]:
    """Why (M, K) x (K, N) does not tile by ``tiling``, or None when it does."""
    if tiling.split not in ("m", "n"):
        return f"Tiling.split must be 'm' or 'n'; got {tiling.split!r}"
    if tiling.tile_n % tiling.epilogue_n:
        return f"epilogue_n={tiling.epilogue_n} must divide tile_n={tiling.tile_n}"
    cta_m, cta_n = tiling.cta
    for name, size, tile in (("M", m, cta_m), ("N", n, cta_n), ("K", k, tiling.tile_k)):
        if size % tile:
            return f"{name}={size} is not a multiple of its tile {tile}"
    return None


def _swizzled(minor: int, dtype) -> tuple:
    """TMA transforms for a shared-memory tile whose minor dimension holds ``minor`` elements of ``dtype``."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


_OUTPUTS = {"gelu": 1, "gelu_pre": 2, "gelu_grad": 1}


def _kernel(a_gmem, b_gmem, e_gmem, *refs, tiling: Tiling, epilogue: str):
    """out = epilogue(a @ b) over the output tiles of this SM. Runs on 3 warpgroups named "wg": 0-1 compute, 2 the
    pipeline's memory thread.

    ``epilogue``: "gelu" (e_gmem: the bias (N,) float32; outputs GELU(acc + bias)), "gelu_pre" (the same and
    acc + bias as a second output) or "gelu_grad" (e_gmem: the pre-activation h (M, N); output acc ⊙ GELU'(h)).
    ``refs``: the outputs, then the kernel's scratch (:func:`_scratch`): the epilogue operand's shared-memory buffer
    and its barriers.
    """
    out_gmems, (e_smem, e_barrier) = refs[: _OUTPUTS[epilogue]], refs[_OUTPUTS[epilogue] :]
    backward = epilogue == "gelu_grad"
    m, k = a_gmem.shape
    n = b_gmem.shape[1]
    tm, tn, tk, en = tiling.tile_m, tiling.tile_n, tiling.tile_k, tiling.epilogue_n
    cta_m, cta_n = tiling.cta
    chunks = tn // en
    out_dtype = out_gmems[0].dtype
    by_m = tiling.split == "m"

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // tk,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, tk), lambda s: (0, s), transforms=_swizzled(tk, a_gmem.dtype),
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tk, cta_n), lambda s: (s, 0), transforms=_swizzled(tk, b_gmem.dtype),
                                memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=tiling.stages,
            compute_context=context,
        )

    def noop(*_, **__):
        return None

    staging = () if backward else (2, tm, en)  # the backward stores from e_smem, in place

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(noop, noop).get_allocations(a_gmem, b_gmem),
        out_smem=plgpu.SMEM((2, *staging), out_dtype, transforms=_swizzled(en, out_dtype)) if staging else None,
        collective_axes="wg",
    )
    def _scope(allocations, out_smem):
        wg = jax.lax.axis_index("wg")

        @plgpu.nd_loop((m // cta_m * (n // cta_n),), collective_axes="sm")
        def _tile(info):
            (linear,) = info.index
            mi, ni = plgpu.planar_snake(linear, (m // cta_m, n // cta_n), 1, tiling.snake)
            first_row = mi * cta_m + (wg * tm if by_m else 0)  # this warpgroup's output tile
            first_col = ni * cta_n + (0 if by_m else wg * tn)
            wg_rows = pl.ds(first_row, tm)

            def mma(_, a_smem, b_smem, acc_ref):
                a_part = a_smem.at[pl.ds(wg * tm, tm)] if by_m else a_smem
                b_part = b_smem if by_m else b_smem.at[:, pl.ds(wg * tn, tn)]
                plgpu.wgmma(acc_ref, a_part, b_part)
                plgpu.wgmma_wait(0)
                return acc_ref

            def chunk_cols(j):
                return pl.ds(first_col + j * en, en)

            def context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                def _acc(acc_ref):
                    # Fetch the epilogue's operand while the main loop runs.
                    if backward:
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores left e_smem
                        for j in range(chunks):
                            plgpu.copy_gmem_to_smem(
                                e_gmem.at[wg_rows, chunk_cols(j)], e_smem.at[wg, j], e_barrier.at[wg * chunks + j]
                            )
                    else:
                        plgpu.copy_gmem_to_smem(e_gmem.at[pl.ds(first_col, tn)], e_smem.at[wg], e_barrier.at[wg])
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]
                    if backward:
                        _store_gelu_grad(acc, e_smem, e_barrier, wg, out_gmems[0], wg_rows, chunk_cols, chunks, en)
                    else:
                        plgpu.barrier_wait(e_barrier.at[wg])
                        pre = acc + jax.lax.broadcast_in_dim(e_smem[wg], (tm, tn), [1])
                        results = [gelu_erf_as(pre)] + ([pre] if epilogue == "gelu_pre" else [])
                        _store_chunks(results, out_smem.at[wg], out_gmems, wg_rows, chunk_cols, chunks, en)

            pipeline(mma, context)(a_gmem.at[pl.ds(mi * cta_m, cta_m), :],
                                   b_gmem.at[:, pl.ds(ni * cta_n, cta_n)], allocations=allocations)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _store_chunks(results, staging, out_gmems, rows, chunk_cols, chunks: int, en: int):
    """Stores each (tm, tn) float32 result to its output, ``en`` columns a TMA store, through a ring of two staging
    buffers: before a buffer is refilled, only the store issued last may still be reading."""
    stores = chunks * len(results)
    if stores % 2:  # the previous tile's last store used buffer 0, which this tile's first store refills
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for j in range(chunks):
        for o, (value, out) in enumerate(zip(results, out_gmems)):
            buffer = (j * len(results) + o) % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            staging[buffer] = value[:, j * en : (j + 1) * en].astype(out.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(staging.at[buffer], out.at[rows, chunk_cols(j)])


def _store_gelu_grad(acc, h_smem, h_barrier, wg, out, rows, chunk_cols, chunks: int, en: int):
    """dh = acc ⊙ GELU'(h) for each prefetched chunk of h, written over that chunk in shared memory and stored."""
    for j in range(chunks):
        plgpu.barrier_wait(h_barrier.at[wg * chunks + j])
        h = h_smem[wg, j].astype(jnp.float32)
        dh = acc[:, j * en : (j + 1) * en] * gelu_erf_grad_as(h)
        h_smem[wg, j] = dh.astype(out.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_smem.at[wg, j], out.at[rows, chunk_cols(j)])


def _scratch(epilogue: str, tiling: Tiling, dtype) -> tuple:
    """The epilogue operand's buffer and barriers, as kernel scratch (allocated by ``run_scoped`` beside the
    pipeline's buffers, the bias's hung Mosaic GPU's interpret mode in the pipeline's barrier waits, jax 0.10.2)."""
    if epilogue == "gelu_grad":
        chunks = tiling.tile_n // tiling.epilogue_n
        return (
            plgpu.SMEM((2, chunks, tiling.tile_m, tiling.epilogue_n), dtype,
                       transforms=_swizzled(tiling.epilogue_n, dtype)),
            plgpu.Barrier(num_barriers=2 * chunks),
        )
    return plgpu.SMEM((2, tiling.tile_n), jnp.float32), plgpu.Barrier(num_barriers=2)


def _gemm(a, b, e, *, epilogue: str, tiling: Optional[Tiling], num_sms: Optional[int], interpret: Any):
    """Checks the operands and runs :func:`_kernel` on a persistent grid of ``num_sms`` CTAs; a tuple of outputs."""
    m, k = a.shape
    k2, n = b.shape
    if k != k2:
        raise ValueError(f"mosaic_mlp: a {a.shape} and b {b.shape} do not fit together")
    if a.dtype != b.dtype or jnp.dtype(a.dtype).itemsize != 2:
        raise ValueError(f"mosaic_mlp: a and b must share a 16-bit dtype; got {a.dtype} and {b.dtype}")
    tiling = tiling or default_tiling(m, n, backward=epilogue == "gelu_grad")
    error = tiling_error(m, k, n, tiling)
    if error:
        raise ValueError(f"mosaic_mlp: {error}")
    if num_sms is None:
        num_sms = jax.devices()[0].core_count if jax.default_backend() == "gpu" else 2
    out_type = (jax.ShapeDtypeStruct((m, n), a.dtype),) * _OUTPUTS[epilogue]
    call = plgpu.kernel(
        functools.partial(_kernel, tiling=tiling, epilogue=epilogue),
        out_type=out_type,
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        scratch_types=_scratch(epilogue, tiling, a.dtype),
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
        interpret=interpret,
    )
    return call(a, b, e)


def dense_gelu(x, w, b, *, with_preactivation: bool = False, tiling: Optional[Tiling] = None,
               num_sms: Optional[int] = None, interpret: Any = None):
    """GELU(x @ w + b) as one kernel: x (M, K), w (K, N) in one 16-bit dtype, b (N,) -> (M, N) in x's dtype; with
    ``with_preactivation`` the tuple (GELU(h), h), h = x @ w + b rounded to x's dtype. ``tiling`` defaults to
    :func:`default_tiling`; ``num_sms`` (CTAs of the persistent grid) to the card's SM count. ``interpret``: Mosaic
    GPU's interpret-mode parameters (:func:`interpret_params`), to run the kernel on the CPU."""
    if b.shape != (w.shape[1],):
        raise ValueError(f"dense_gelu: b {b.shape} does not fit w {w.shape}")
    out = _gemm(x, w, b.astype(jnp.float32), epilogue="gelu_pre" if with_preactivation else "gelu",
                tiling=tiling, num_sms=num_sms, interpret=interpret)
    return out if with_preactivation else out[0]


def matmul_gelu_grad(dy, w_t, h, *, tiling: Optional[Tiling] = None, num_sms: Optional[int] = None,
                     interpret: Any = None):
    """dh = (dy @ w_t) ⊙ GELU'(h) as one kernel: dy (M, K), w_t (K, N), h (M, N), one 16-bit dtype -> (M, N)."""
    if h.shape != (dy.shape[0], w_t.shape[1]) or h.dtype != dy.dtype:
        raise ValueError(f"matmul_gelu_grad: h {h.shape} {h.dtype} does not fit dy {dy.shape} and w_t {w_t.shape}")
    return _gemm(dy, w_t, h, epilogue="gelu_grad", tiling=tiling, num_sms=num_sms, interpret=interpret)[0]


def interpret_params():
    """Parameters for Mosaic GPU's interpret mode, which simulates TMA, barriers and WGMMA on the CPU (public as
    ``plgpu.InterpretGPUParams`` in newer JAX, private in jax 0.10)."""
    public = getattr(plgpu, "InterpretGPUParams", None)
    if public is not None:
        return public()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def gelu_mlp_xla(x, w1, b1, w2, b2):
    """The MLP as XLA runs it in the model: fc1 (+ b1) -> exact GELU -> fc2 (+ b2), every step rounded to x's
    dtype. x (M, C); w1 (C, H), b1 (H,); w2 (H, C), b2 (C,); biases cast to x's dtype."""
    return jnp.dot(gelu_erf(jnp.dot(x, w1) + b1.astype(x.dtype)), w2) + b2.astype(x.dtype)


def matmul_gelu_grad_xla(dy, w_t, h):
    """:func:`matmul_gelu_grad` as XLA ops: (dy @ w_t) ⊙ GELU'(h), GELU' from ``lax.erf``, in dy's dtype."""
    h32 = h.astype(jnp.float32)
    grad = 0.5 * (1.0 + jax.lax.erf(h32 * _INV_SQRT2)) + _INV_SQRT_2PI * h32 * jnp.exp(-0.5 * h32 * h32)
    return (jnp.dot(dy, w_t, preferred_element_type=jnp.float32) * grad).astype(dy.dtype)


def _fc1_gelu_local(x, w1, b1, with_preactivation, interpret):
    """:func:`dense_gelu` on this device's rows, or its XLA equivalent where they do not tile."""
    m, c = x.shape
    if tiling_error(m, c, w1.shape[1], default_tiling(m, w1.shape[1])) is None:
        out = dense_gelu(x, w1, b1, with_preactivation=with_preactivation, interpret=interpret)
        return out if with_preactivation else (out,)
    h = jnp.dot(x, w1, preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
    g = gelu_erf(h).astype(x.dtype)
    return (g, h.astype(x.dtype)) if with_preactivation else (g,)


def _gelu_grad_local(dy, w_t, h, interpret):
    """(:func:`matmul_gelu_grad`,) on this device's rows, or its XLA equivalent where they do not tile."""
    m, c = dy.shape
    if tiling_error(m, c, w_t.shape[1], default_tiling(m, w_t.shape[1], backward=True)) is None:
        return (matmul_gelu_grad(dy, w_t, h, interpret=interpret),)
    return (matmul_gelu_grad_xla(dy, w_t, h),)


# Both kernels are independent per token row: under SPMD each device runs them on its own rows.
_PARTITIONED = {
    "fc1_gelu": batch_parallel(_fc1_gelu_local, "b c, c h, h -> b h", num_static=2),
    "fc1_gelu_pre": batch_parallel(_fc1_gelu_local, "b c, c h, h -> b h, b h", num_static=2),
    "gelu_grad": batch_parallel(_gelu_grad_local, "b c, c h, b h -> b h", num_static=1),
}


def _fc1_gelu(x, w1, b1, with_preactivation, interpret):
    if interpret is not None:  # the interpreter's callbacks cannot be lowered inside custom_partitioning
        return _fc1_gelu_local(x, w1, b1, with_preactivation, interpret)
    return _PARTITIONED["fc1_gelu_pre" if with_preactivation else "fc1_gelu"](x, w1, b1, with_preactivation, None)


def _gelu_grad(dy, w_t, h, interpret):
    if interpret is not None:
        return _gelu_grad_local(dy, w_t, h, interpret)[0]
    return _PARTITIONED["gelu_grad"](dy, w_t, h, None)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gelu_mlp(x, w1, b1, w2, b2, interpret=None):
    """fc1 -> exact GELU -> fc2 on (M, C) tokens (shapes as :func:`gelu_mlp_xla`; x, w1 and w2 in one 16-bit
    dtype; output in x's dtype), with :func:`dense_gelu` and, in the backward, :func:`matmul_gelu_grad` wherever
    the rows (each device's, under SPMD) tile, and their XLA equivalents elsewhere. Differentiable in every array
    argument; each cotangent comes back in its argument's dtype. (fc1's bias gradient stays XLA's reduction over
    dh: column sums in the backward kernel's epilogue measured no faster on an H100 and wrong there while right
    under the interpreter; benchmarks/NOTES.md, session 20.)"""
    (g,) = _fc1_gelu(x, w1, b1, False, interpret)
    return jnp.dot(g, w2) + b2.astype(x.dtype)


def _gelu_mlp_forward(x, w1, b1, w2, b2, interpret):
    g, h = _fc1_gelu(x, w1, b1, True, interpret)
    return jnp.dot(g, w2) + b2.astype(x.dtype), (x, w1, w2, g, h, b1, b2)


def _gelu_mlp_backward(interpret, residuals, dy):
    x, w1, w2, g, h, b1, b2 = residuals
    dw2 = jnp.dot(g.T, dy)
    db2 = jnp.sum(dy, axis=0, dtype=jnp.float32).astype(b2.dtype)
    dh = _gelu_grad(dy, w2.T, h, interpret)
    db1 = jnp.sum(dh, axis=0, dtype=jnp.float32)
    return jnp.dot(dh, w1.T), jnp.dot(x.T, dh), db1.astype(b1.dtype), dw2, db2


gelu_mlp.defvjp(_gelu_mlp_forward, _gelu_mlp_backward)
