"""selective_scan: every impl (Pallas in interpret mode) against a float64 reference; CUDA lowering; errors.

The seed is fresh per run (printed in every failure message); set SCAN_TEST_SEED to replay one.
"""

from __future__ import annotations

import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambavision_jax.pallas import (
    IMPLS,
    KernelConfig,
    default_config,
    resolve_impl,
    selective_scan,
    selective_scan_pallas,
)
from mambavision_jax.pallas.testing import (
    ARG_NAMES,
    gradient_magnitudes_float64,
    make_inputs,
    reference_float64,
    rel_err,
)
from mambavision_jax.pallas.triton_kernels import gpu_sm_count

SEED = int(os.environ.get("SCAN_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (2e-2, 3e-2), jnp.float16: (3e-3, 5e-3)}  # (forward, grads)
# Every impl accumulates in float32: a gradient may also be off by a few float32 ulps of the terms it sums, which is
# what a relative tolerance cannot allow where they cancel (seed 19170678 left dB of the one-token case 26,000×
# smaller than its terms, and all three impls 5e-4 to 1e-3 off relative to it).
SUM_ROUNDING = 8 * float(np.finfo(np.float32).eps)


@functools.lru_cache(maxsize=None)
def _jitted(impl, softplus, config):
    """One compiled y-and-gradients function per (impl, softplus, config); shapes retrace inside jit."""

    def f(args, dy):
        def scan(*a):
            if impl == "pallas":
                return selective_scan_pallas(*a, delta_softplus=softplus, interpret=True, config=config)
            return selective_scan(*a, delta_softplus=softplus, impl=impl)

        y, vjp = jax.vjp(scan, *args)
        return y, vjp(dy)

    return jax.jit(f)


# (batch, length, dim, d_state, dtype, softplus, with D, with bias): a covering set, not the cross product.
CASES = [
    (1, 1, 24, 8, jnp.float32, True, True, True),
    (3, 7, 40, 8, jnp.float32, False, False, False),
    (1, 49, 160, 8, jnp.float32, True, True, False),
    (3, 196, 24, 8, jnp.float32, True, False, True),
    (1, 197, 392, 8, jnp.float32, True, True, True),
    (2, 49, 40, 5, jnp.float32, False, True, True),
    (2, 9, 40, 16, jnp.float32, True, True, True),  # 2·d_state = 32 channel sums: a full butterfly
    (1, 9, 24, 2, jnp.float32, True, True, True),
    (3, 49, 40, 8, jnp.bfloat16, True, True, True),
    (1, 197, 24, 8, jnp.float16, True, True, True),
]


def _check(impl, case, config=None):
    batch, length, dim, n, dtype, softplus, with_d, with_bias = case
    rng = np.random.default_rng([SEED, zlib.crc32(repr(case).encode())])
    args = make_inputs(rng, batch, length, dim, n, dtype, softplus=softplus, with_d=with_d, with_bias=with_bias)
    dy = jnp.asarray(rng.normal(0.0, 1.0, (batch, length, dim)), dtype)
    present = [i for i, a in enumerate(args) if a is not None]
    y_ref, g_ref = reference_float64(args, dy, softplus)
    magnitudes = gradient_magnitudes_float64(args, dy, softplus)

    y, grads = _jitted(impl, softplus, config)(args, dy)
    fwd_tol, grad_tol = TOL[dtype]
    where = f"impl={impl} case={case} config={config} SCAN_TEST_SEED={SEED}"
    assert y.dtype == dtype and y.shape == (batch, length, dim), where
    assert rel_err(y, y_ref) <= fwd_tol, f"forward rel err {rel_err(y, y_ref):.2e} > {fwd_tol}; {where}"
    for i in present:
        assert grads[i].dtype == args[i].dtype, f"d{ARG_NAMES[i]} dtype {grads[i].dtype}; {where}"
        err = rel_err(grads[i], g_ref[i])
        allowed = grad_tol + SUM_ROUNDING * np.linalg.norm(magnitudes[i]) / max(np.linalg.norm(g_ref[i]), 1e-30)
        assert err <= allowed, f"d{ARG_NAMES[i]} rel err {err:.2e} > {allowed:.2e} (tolerance + rounding); {where}"


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "b{}_L{}_d{}_n{}_{}_sp{}_D{}_bias{}".format(*c[:4], jnp.dtype(c[4]).name, *map(int, c[5:])),
)
@pytest.mark.parametrize("impl", ["pallas", "sequential", "associative"])
def test_matches_float64_reference(impl, case):
    _check(impl, case)


@pytest.mark.parametrize(
    "config",
    [
        KernelConfig(block_d=16, chunk=4),
        KernelConfig(block_d=64, chunk=16),
        KernelConfig(block_d=32, chunk=1),
        KernelConfig(block_d=64, chunk=8, num_warps=2),
        KernelConfig(block_d=32, chunk=4, splits=4),
        KernelConfig(block_d=32, chunk=4, prefetch=False, splits=7),
        KernelConfig(block_d=16, chunk=8, splits=3),
        KernelConfig(block_d=32, chunk=4, prefetch=False, splits=2),
        KernelConfig(block_d=64, chunk=2, prefetch=False, bwd_block_d=16),
    ],
)
def test_pallas_configs(config):
    """Channel-block and chunk tails: dim 40 with blocks 16/32/64; L 197 with chunks 1/2/4/8/16; forward and
    backward split into 2, 3 or 4 parallel segments (the last one shorter); with and without prefetching; a
    backward channel block different from the forward's."""
    _check("pallas", (2, 197, 40, 8, jnp.float32, True, True, True), config)


@functools.lru_cache(maxsize=None)
def _jitted_forward(softplus, config):
    """Forward alone (no vjp), which is where ``state_groups`` applies: the inference kernel."""
    return jax.jit(lambda args: selective_scan_pallas(*args, delta_softplus=softplus, interpret=True, config=config))


# (batch, length, dim, d_state, dtype, softplus, with D, with bias) for the grouped inference forward.
GROUPED_CASES = [
    (1, 1, 24, 8, jnp.float32, True, True, True),
    (3, 7, 40, 8, jnp.float32, False, False, False),
    (1, 49, 160, 8, jnp.float32, True, True, False),
    (3, 196, 24, 8, jnp.float32, True, False, True),
    (1, 197, 392, 8, jnp.float32, True, True, True),
    (2, 49, 40, 5, jnp.float32, True, True, True),
    (2, 9, 40, 16, jnp.float32, True, True, True),
    (3, 49, 40, 8, jnp.bfloat16, True, True, True),
]


@pytest.mark.parametrize(
    "case", GROUPED_CASES, ids=lambda c: "b{}_L{}_d{}_n{}_{}_sp{}".format(*c[:4], jnp.dtype(c[4]).name, int(c[5]))
)
@pytest.mark.parametrize(
    "config",
    [
        KernelConfig(chunk=16, state_groups=2),
        KernelConfig(chunk=4, state_groups=4, prefetch=False),
        KernelConfig(chunk=8, state_groups=8),
        KernelConfig(chunk=16, state_groups=1),
        KernelConfig(chunk=2),
    ],
    ids=lambda c: f"k{c.chunk}g{c.state_groups}{'' if c.prefetch else '-nopf'}",
)
def test_grouped_inference_forward(case, config):
    """The inference forward with G lanes a channel (G = 1: the grouped kernel with one lane a channel; no
    ``state_groups``: the one-lane kernel) against float64: lengths below, at and past whole chunks (static tails of
    1..15 steps), dims that leave partial channel blocks, d_state 5 (padded to 8) and 16, softplus off (no Δ
    sharing) and bfloat16."""
    batch, length, dim, n, dtype, softplus, with_d, with_bias = case
    rng = np.random.default_rng([SEED, zlib.crc32(repr((case, config)).encode())])
    args = make_inputs(rng, batch, length, dim, n, dtype, softplus=softplus, with_d=with_d, with_bias=with_bias)
    y_ref, _ = reference_float64(args, jnp.zeros((batch, length, dim), dtype), softplus)
    y = _jitted_forward(softplus, config)(args)
    where = f"case={case} config={config} SCAN_TEST_SEED={SEED}"
    assert y.dtype == dtype and y.shape == (batch, length, dim), where
    assert rel_err(y, y_ref) <= TOL[dtype][0], f"forward rel err {rel_err(y, y_ref):.2e}; {where}"


def test_default_configs():
    """Inference: the grouped kernel, one lane a channel once that gives more than two one-warp programs a warp
    scheduler (4 a streaming multiprocessor), two lanes a channel otherwise (measured, benchmarks/NOTES.md session
    13); training: the one-lane kernels, in 7 segments from 128 steps."""
    g2, g1 = KernelConfig(chunk=16, state_groups=2), KernelConfig(chunk=16, state_groups=1)
    assert default_config(128, 196, 160, sm_count=132) == g2  # 640 one-lane programs on 528 schedulers
    assert default_config(128, 196, 256, sm_count=132) == g2  # 1,024
    assert default_config(128, 49, 320, sm_count=132) == g1  # 1,280
    assert default_config(128, 196, 392, sm_count=132) == g1  # 1,664
    assert default_config(64, 49, 320, sm_count=132) == g2
    assert default_config(128, 49, 320, sm_count=160) == g2  # a larger GPU keeps two lanes a channel
    assert default_config(128, 196, 160, training=True) == KernelConfig(chunk=4, prefetch=False, splits=7)
    assert default_config(128, 49, 320, training=True) == KernelConfig(chunk=4)
    assert default_config(2, 49, 40, d_state=64).state_groups is None  # beyond 32 states a lane: one-lane kernel
    if jax.default_backend() != "gpu":
        assert gpu_sm_count() == 132


def test_grouped_config_errors():
    args = _small_args(n=2)
    with pytest.raises(ValueError, match="state_groups=4 needs d_state"):
        selective_scan_pallas(*args, interpret=True, config=KernelConfig(state_groups=4))
    with pytest.raises(ValueError, match="state_groups=2 needs a chunk that is a multiple"):
        selective_scan_pallas(
            *_small_args(), delta_softplus=True, interpret=True, config=KernelConfig(chunk=1, state_groups=2)
        )
    with pytest.raises(ValueError, match="state_groups must be a power of two"):
        KernelConfig(state_groups=3)


# ---------------------------------------------------------------------------------------------------------
# CUDA lowering from the CPU host (catches Triton lowering breaks without a GPU).


@pytest.fixture
def verified_triton_modules(monkeypatch):
    """Runs MLIR's verifier on every Triton module lowered during the test (what the GPU's Triton compiler rejects
    first, e.g. an ``scf.for`` whose bounds differ in type, which ``.lower()`` alone lets through); returns the
    verified modules as a list of (kernel name, module text)."""
    from jax._src.pallas.triton import lowering

    original = lowering.lower_jaxpr_to_triton_module
    modules = []

    def verified(*args, **kwargs):
        result = original(*args, **kwargs)
        result.module.operation.verify()  # raises with the verifier's message
        name = str(result.module.body.operations[0].attributes["sym_name"]).strip('"')
        modules.append((name, result.module.operation.get_asm(enable_debug_info=False)))
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", verified)
    return modules


@pytest.mark.parametrize("groups", [2, 1])
def test_grouped_forward_lowers_for_cuda_and_training_keeps_one_lane_kernels(groups, verified_triton_modules):
    """state_groups puts the grouped kernel (per-lane shfl.sync.idx sources) into the inference forward only, with
    two lanes a channel or one; under differentiation the forward that saves states and the backward run as
    before."""
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    args = (spec((2, 196, 160)), spec((2, 196, 160)), spec((160, 8)), spec((2, 196, 8)), spec((2, 196, 8)))
    args += (spec((160,)), spec((160,)))
    config = KernelConfig(chunk=16, state_groups=groups)
    fwd = lambda *a: selective_scan_pallas(*a, delta_softplus=True, config=config, interpret=False)
    text = jax.jit(fwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "selective_scan_fwd_grouped" in text and "shfl.sync.idx.b32 $0, $1, $2" in text
    grad = jax.grad(lambda *a: fwd(*a).sum(), argnums=(0, 3))
    text = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "selective_scan_fwd_grouped" not in text and "selective_scan_bwd" in text
    assert len(verified_triton_modules) == 3
    # The device's Triton pipeline emits mul.rn/add.rn, which ptxas does not fuse: the multiply-adds are spelled out.
    fmas = {name: text.count("fma.rn.f32") for name, text in verified_triton_modules}
    assert fmas["selective_scan_fwd_grouped"] >= 16 * 8, fmas  # per step: 4 state updates, 4 C·h terms (chunk 16)
    assert fmas["selective_scan_fwd"] >= 4 * 16 and fmas["selective_scan_bwd"] >= 4 * 8 * 3, fmas


@pytest.mark.parametrize("batch,length,dim", [(2, 196, 160), (2, 49, 320), (2, 197, 40)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("splits", [1, 4])
def test_lowers_for_cuda(batch, length, dim, dtype, splits, verified_triton_modules):
    n = 8
    spec = lambda shape, t=dtype: jax.ShapeDtypeStruct(shape, t)
    args = (
        spec((batch, length, dim)),
        spec((batch, length, dim)),
        spec((dim, n), jnp.float32),
        spec((batch, length, n)),
        spec((batch, length, n)),
        spec((dim,), jnp.float32),
        spec((dim,), jnp.float32),
    )
    config = KernelConfig(block_d=32, chunk=4, splits=splits)
    fwd = lambda *a: selective_scan_pallas(*a, delta_softplus=True, config=config, interpret=False)
    grad = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=tuple(range(7)))
    # one kernel each for forward and backward; a split adds a summary kernel to each
    extra = int(splits > 1)
    for fn, expected in ((fwd, 1 + extra), (grad, 2 + 2 * extra)):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == expected, text[:2000]
    assert len(verified_triton_modules) == 3 + 3 * extra


@pytest.mark.parametrize("fast_math", [True, False])
def test_fast_math_lowers_to_ptx_approximations(fast_math):
    """fast_math puts PTX ex2/rcp approximations into the GPU kernels (interpret mode, which the numerics tests run,
    computes the same formulas exactly); without it none appear. Either way the backward's dB/dC channel sums
    lower to PTX butterfly shuffles (interpret mode runs the same butterfly as gathers)."""
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    args = (
        spec((2, 49, 40)),
        spec((2, 49, 40)),
        spec((40, 8)),
        spec((2, 49, 8)),
        spec((2, 49, 8)),
        spec((40,)),
        spec((40,)),
    )
    config = KernelConfig(fast_math=fast_math)
    fwd = lambda *a: selective_scan_pallas(*a, delta_softplus=True, config=config, interpret=False)
    text = jax.jit(fwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    for op in ("ex2.approx.ftz.f32", "rcp.approx.ftz.f32"):
        assert (op in text) == fast_math, op
    grad = jax.grad(lambda *a: fwd(*a).sum(), argnums=(0, 3, 4))
    text = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("shfl.sync.bfly.b32") >= 5, "the dB/dC butterfly's shuffles are missing"


# ---------------------------------------------------------------------------------------------------------
# Dispatch and errors.


def _small_args(batch=2, length=5, dim=16, n=8):
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return [
        z(batch, length, dim),
        z(batch, length, dim),
        z(dim, n),
        z(batch, length, n),
        z(batch, length, n),
        z(dim),
        z(dim),
    ]


def test_impl_names():
    assert set(IMPLS) >= {"auto", "sequential", "associative", "pallas", "pallas_triton"}
    assert resolve_impl("pallas_triton") == "pallas"
    if jax.default_backend() != "gpu":
        assert resolve_impl("auto") in ("sequential", "associative")
    with pytest.raises(ValueError, match="valid: .*sequential.*associative"):
        selective_scan(*_small_args(), impl="cuda")


@pytest.mark.parametrize(
    "index,bad_shape,name",
    [
        (0, (2, 5), "u"),
        (1, (2, 5, 8), "delta"),
        (2, (8, 8), "A"),
        (3, (2, 4, 8), "B"),
        (4, (2, 5, 4), "C"),
        (5, (8,), "D"),
        (6, (16, 1), "delta_bias"),
    ],
)
@pytest.mark.parametrize("entry", ["selective_scan", "selective_scan_pallas"])
def test_bad_shapes(index, bad_shape, name, entry):
    """Through either public entry point (selective_scan_pallas used to scan a wrong delta, A or D silently)."""
    args = _small_args()
    args[index] = jnp.zeros(bad_shape, jnp.float32)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        if entry == "selective_scan":
            selective_scan(*args, impl="sequential")
        else:
            selective_scan_pallas(*args, interpret=True)


@pytest.mark.parametrize("index,name", [(0, "u"), (1, "delta"), (3, "B")])
def test_integer_inputs_are_refused(index, name):
    """An integer array would otherwise be scanned with integer arithmetic and return integers."""
    args = _small_args()
    args[index] = args[index].astype(jnp.int32)
    with pytest.raises(TypeError, match=rf"{name} must be floating point, got int32"):
        selective_scan(*args, impl="sequential")


@pytest.mark.parametrize("shape", [(0, 5, 16, 8), (2, 0, 16, 8), (0, 0, 16, 5)], ids=["batch0", "length0", "both0"])
@pytest.mark.parametrize("impl", ["pallas", "sequential", "associative"])
def test_empty_batch_or_length(impl, shape):
    """Nothing to scan: an empty y and zero gradients from every impl (the Pallas kernels' empty grids used to
    fail with a ZeroDivisionError or a gather error)."""
    batch, length, dim, n = shape
    args = _small_args(batch, length, dim, n)

    def scan(*a):
        if impl == "pallas":
            return selective_scan_pallas(*a, delta_softplus=True, interpret=True)
        return selective_scan(*a, delta_softplus=True, impl=impl)

    y, vjp = jax.vjp(scan, *args)
    assert y.shape == (batch, length, dim) and y.dtype == jnp.float32
    for arg, grad in zip(args, vjp(jnp.zeros_like(y))):
        assert grad.shape == arg.shape
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("t0", [-4, 0, 5], ids=["before_step_0", "first_chunk", "past_the_end"])
def test_coefficient_vectors_read_nothing_outside_the_sequence(t0):
    """The one-lane kernels load B/C as (32,) vectors of the flat (batch, length·d_state) rows. Their prefetch asks
    for one chunk beyond the walk: past the end forwards, before step 0 backwards (with float16 B passed to a jitted
    gradient, that read before the buffer was an illegal address on an H100). Every value outside [0, length) must
    be masked off (0 here; in interpret mode an unmasked read of a slice starting below 0 is clamped to the row)."""
    from jax.experimental import pallas as pl

    from mambavision_jax.pallas import triton_kernels as tk

    batch, length, n, chunk = 2, 7, 8, 4
    flat = jnp.arange(1.0, 1.0 + batch * length * n, dtype=jnp.float32).reshape(batch, length * n)

    def kernel(flat_ref, out_ref):
        rows = tk._Rows(pl.program_id(0), 0, jnp.arange(32) < 32, 32, length, chunk)
        coefficients = tk._Coefficients(rows, n, tk._Math(fast=False, gpu=False), vectors=True)
        for v, vector in enumerate(coefficients.load(flat_ref, jnp.int32(t0))):
            out_ref[pl.program_id(0), v, :] = vector

    vectors = chunk * n // 32
    got = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((batch, vectors, 32), jnp.float32), grid=(batch,), interpret=True
    )(flat)
    index = t0 * n + np.arange(vectors * 32)
    inside = (index >= 0) & (index < length * n)
    want = np.where(inside, np.asarray(flat)[:, np.clip(index, 0, length * n - 1)], 0.0).reshape(batch, vectors, 32)
    np.testing.assert_array_equal(np.asarray(got), want)
