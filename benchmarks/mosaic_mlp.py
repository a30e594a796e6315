"""Prototype, timed against XLA: the MLP's fc1 + bias + exact GELU as one Pallas Mosaic GPU kernel (Hopper).

    python benchmarks/mosaic_mlp.py [--shapes B3,B4,T3,T4] [--batch 128]

The kernel is a persistent, warp-specialised GEMM: one CTA per SM walks the output tiles; a memory warpgroup
streams the CTA's row block of x and column block of w, tile_k deep, into shared memory by TMA, two compute
warpgroups each accumulate their own (tile_m, tile_n) tile with WGMMA in float32, and the epilogue adds the bias,
applies GELU and stores bf16 tiles by TMA, optionally with the pre-activation as a second output (what GELU's
gradient needs in training). XLA runs the same layer as a cuBLAS GEMM and a separate bias + GELU pass over the
(M, 4C) hidden activations, the pass this kernel removes (benchmarks/NOTES.md session 18: on an H100 at
MambaVision-B's stage-3 shape, Mosaic GPU's GEMM with an activation epilogue took 103 µs against XLA's 166).

Layouts: x (M, K) row-major bf16 (tokens × channels), w (K, N) bf16 (flax's Dense kernel layout), b (N,) float32;
outputs (M, N) bf16. Shapes must tile exactly by the CTA's tile and tile_k (``check_shape`` says which does not).

Status (session 18): not wired into the model, and not yet run on a card. On the CPU it lowers for CUDA at
MambaVision's shapes and matches a float64 reference under Mosaic GPU's interpret mode
(tests/benchmarks/test_mosaic_mlp.py). Each row of this script checks the kernel's output against XLA's on the card
(``*_max_abs_err``).
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from timing import median_seconds

# Abramowitz & Stegun 7.1.26: erf(z) ≈ 1 - (a1 t + ... + a5 t^5) exp(-z^2), t = 1 / (1 + p z), z >= 0;
# |error| <= 1.5e-7.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_LOG2E = 1.4426950408889634


def gelu_erf_as(x: jax.Array) -> jax.Array:
    """Exact GELU, x/2 · (1 + erf(x/√2)), with erf by A&S 7.1.26 (exp2 and one division; no erf primitive needed).
    Float32 in and out; within 1e-6 of ``jax.nn.gelu(approximate=False)``."""
    z = jnp.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + _AS_P * z)
    poly = t * (_AS_A[0] + t * (_AS_A[1] + t * (_AS_A[2] + t * (_AS_A[3] + t * _AS_A[4]))))
    erf_abs = 1.0 - poly * jnp.exp2(-(z * z) * _LOG2E)
    return 0.5 * x + 0.5 * jnp.abs(x) * erf_abs  # = x/2 · (1 + sign(x) · erf(|x|/√2))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Each compute warpgroup owns a (tile_m, tile_n) output tile; the CTA's two warpgroups sit side by side along
    ``split`` ("m": the CTA covers 2·tile_m rows; "n": 2·tile_n columns). tile_k of the reduction a pipeline step,
    ``stages`` steps in flight, ``epilogue_n`` columns a store."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 3
    epilogue_n: int = 64
    split: str = "m"

    @property
    def cta(self) -> tuple[int, int]:
        """The CTA's output tile, (rows, columns)."""
        if self.split == "m":
            return 2 * self.tile_m, self.tile_n
        return self.tile_m, 2 * self.tile_n


def default_tiling(m: int, n: int) -> Tiling:
    """128 x 128 a warpgroup, split along M where M tiles by 256 (MambaVision-B's stage-3 fc1 at batch 128: the
    fastest stock tiling, NOTES session 18), else along N (stage 4: 49 rows an image)."""
    return Tiling(split="m" if m % 256 == 0 or n % 256 else "n")


def check_shape(m: int, k: int, n: int, tiling: Tiling) -> None:
    """Raises ValueError naming the dimension that does not tile."""
    if tiling.split not in ("m", "n"):
        raise ValueError(f"Tiling.split must be 'm' or 'n'; got {tiling.split!r}")
    cta_m, cta_n = tiling.cta
    for name, size, tile in (("M", m, cta_m), ("N", n, cta_n), ("K", k, tiling.tile_k)):
        if size % tile:
            raise ValueError(f"mosaic dense_gelu: {name}={size} is not a multiple of its tile {tile}")
    if tiling.tile_n % tiling.epilogue_n:
        raise ValueError(f"epilogue_n={tiling.epilogue_n} must divide tile_n={tiling.tile_n}")


def _swizzled(minor: int, dtype) -> tuple:
    """TMA transforms for a shared-memory tile whose minor dimension holds ``minor`` elements of ``dtype``."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(x_gmem, w_gmem, b_gmem, *refs, tiling: Tiling, with_preactivation: bool):
    """Kernel body. ``refs``: the outputs, (gelu,) or (gelu, pre-activation), then the scratch of
    :func:`dense_gelu`'s ``scratch_types``: a (2, tile_n) float32 bias buffer and a barrier per compute warpgroup.
    Runs on 3 warpgroups named "wg": 0-1 compute, 2 the pipeline's memory thread."""
    *out_gmems, bias_smem, bias_barrier = refs
    m, k = x_gmem.shape
    n = w_gmem.shape[1]
    tm, tn, tk, en = tiling.tile_m, tiling.tile_n, tiling.tile_k, tiling.epilogue_n
    cta_m, cta_n = tiling.cta
    m_tiles, n_tiles = m // cta_m, n // cta_n
    out_dtype = out_gmems[0].dtype

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // tk,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, tk), lambda s: (0, s), transforms=_swizzled(tk, x_gmem.dtype),
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tk, cta_n), lambda s: (s, 0), transforms=_swizzled(tk, w_gmem.dtype),
                                memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=tiling.stages,
            compute_context=context,
        )

    def noop(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(noop, noop).get_allocations(x_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, len(out_gmems), tm, en), out_dtype, transforms=_swizzled(en, out_dtype)),
        collective_axes="wg",
    )
    def _scope(allocations, out_smem):
        wg = jax.lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles, n_tiles), collective_axes="sm")
        def _tile(info):
            mi, ni = info.index
            rows, cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
            by_m = tiling.split == "m"
            first_row = mi * cta_m + (wg * tm if by_m else 0)  # this warpgroup's output tile
            first_col = ni * cta_n + (0 if by_m else wg * tn)

            def mma(_, x_smem, w_smem, acc_ref):
                x_part = x_smem.at[pl.ds(wg * tm, tm)] if by_m else x_smem
                w_part = w_smem if by_m else w_smem.at[:, pl.ds(wg * tn, tn)]
                plgpu.wgmma(acc_ref, x_part, w_part)
                plgpu.wgmma_wait(0)
                return acc_ref

            def context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                def _acc(acc_ref):
                    run_pipeline(acc_ref)
                    plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(first_col, tn)], bias_smem.at[wg], bias_barrier.at[wg])
                    plgpu.barrier_wait(bias_barrier.at[wg])
                    bias = bias_smem[wg]
                    pre = acc_ref[...] + jax.lax.broadcast_in_dim(bias, (tm, tn), [1])
                    results = (gelu_erf_as(pre), pre) if with_preactivation else (gelu_erf_as(pre),)
                    for j in range(tn // en):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for o, value in enumerate(results):
                            out_smem[wg, o] = value[:, j * en : (j + 1) * en].astype(out_dtype)
                        plgpu.commit_smem()
                        for o, out in enumerate(out_gmems):
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, o], out.at[pl.ds(first_row, tm), pl.ds(first_col + j * en, en)]
                            )

            pipeline(mma, context)(x_gmem.at[rows, :], w_gmem.at[:, cols], allocations=allocations)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def dense_gelu(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    with_preactivation: bool = False,
    tiling: Optional[Tiling] = None,
    num_sms: Optional[int] = None,
    interpret: Any = None,
):
    """GELU(x @ w + b) as one kernel: x (M, K), w (K, N) in the same 16-bit dtype, b (N,) float32 -> (M, N) in x's
    dtype, and with ``with_preactivation`` also x @ w + b (rounded to x's dtype). ``tiling`` defaults to
    :func:`default_tiling`; ``num_sms`` (CTAs of the persistent grid) to the card's SM count. ``interpret``: Mosaic
    GPU's interpret-mode parameters (:func:`interpret_params`), to run the kernel on the CPU."""
    m, k = x.shape
    k2, n = w.shape
    if k != k2 or b.shape != (n,):
        raise ValueError(f"dense_gelu: x {x.shape}, w {w.shape} and b {b.shape} do not fit together")
    if x.dtype != w.dtype:
        raise ValueError(f"dense_gelu: x and w must share a dtype; got {x.dtype} and {w.dtype}")
    tiling = tiling or default_tiling(m, n)
    check_shape(m, k, n, tiling)
    if num_sms is None:
        num_sms = jax.devices()[0].core_count if jax.default_backend() == "gpu" else 2
    outputs = 2 if with_preactivation else 1
    call = plgpu.kernel(
        functools.partial(_kernel, tiling=tiling, with_preactivation=with_preactivation),
        out_type=tuple(jax.ShapeDtypeStruct((m, n), x.dtype) for _ in range(outputs)),
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        # The bias's buffer and barriers are kernel scratch: allocated beside the pipeline's buffers (run_scoped),
        # they hung Mosaic GPU's interpret mode in the pipeline's barrier waits (jax 0.10.2).
        scratch_types=(plgpu.SMEM((2, tiling.tile_n), jnp.float32), plgpu.Barrier(num_barriers=2)),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    out = call(x, w, b.astype(jnp.float32))
    return out if with_preactivation else out[0]


def interpret_params():
    """Parameters for Mosaic GPU's interpret mode, which simulates TMA, barriers and WGMMA on the CPU (private in
    jax 0.10)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


SHAPES = {  # name: (rows a batch image, C, hidden): the stage-3/4 MLPs at 224x224 (14x14 and 7x7 tokens an image)
    "T3": (196, 320, 1280),
    "T4": (49, 640, 2560),
    "B3": (196, 512, 2048),
    "B4": (49, 1024, 4096),
}


def _time_us(f, *args) -> float:
    """Median µs a call of ``f(*args)`` (``timing.median_seconds``: warm-up excluded, windows of at least 0.2 s)."""
    return 1e6 * median_seconds(f, [args])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="B3,B4,T3,T4")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from mambavision_jax.models.layers import gelu_erf

    results = {}
    for name in args.shapes.split(","):
        rows, c, hidden = SHAPES[name]
        m = rows * args.batch
        x = jax.random.normal(jax.random.PRNGKey(0), (m, c), jnp.bfloat16)
        w = (jax.random.normal(jax.random.PRNGKey(1), (c, hidden)) / np.sqrt(c)).astype(jnp.bfloat16)
        b = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (hidden,))
        xla = jax.jit(lambda x, w, b: gelu_erf(jnp.dot(x, w) + b.astype(x.dtype)))
        row = dict(m=m, k=c, n=hidden, xla_us=_time_us(xla, x, w, b))
        want = xla(x, w, b).astype(jnp.float32)
        for label, pre in (("mosaic_us", False), ("mosaic_with_preactivation_us", True)):
            try:
                f = jax.jit(functools.partial(dense_gelu, with_preactivation=pre))
                row[label] = _time_us(f, x, w, b)
                got = f(x, w, b)[0] if pre else f(x, w, b)
                row[label.replace("_us", "_max_abs_err")] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
            except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and goes on
                row[label] = f"{type(e).__name__}: {str(e)[:300]}"
        results[name] = row
        print(name, json.dumps(row), flush=True)
    path = args.out or os.path.join(os.environ.get("OUT", "/tmp"), "mosaic_mlp.json")
    with open(path, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
