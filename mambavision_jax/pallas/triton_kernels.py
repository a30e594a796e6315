"""Pallas (Triton backend) selective-scan kernels: forward and backward.

Layout: the kernels read the caller's arrays in place, with no transposes or padding:
  u, delta, y, du, ddelta: (batch, length, dim), any float dtype (computed in float32);
  A: (dim, d_state) float32 (handed to the kernels transposed, (d_state, dim)); B, C: (batch, length, d_state);
  D, delta_bias: (dim,) float32; d_state must be a power of two here (the vjp wrapper pads it otherwise).

Grid: ``(cdiv(dim, block_d), batch, segments)``; program (j, b, s) owns channels ``[j*block_d, (j+1)*block_d)``
of batch row b for segment s of the sequence (the whole sequence unless ``KernelConfig.splits`` > 1). The state is
held as d_state separate (block_d,) float32 vectors, so a lane owns a channel with its d_state values in registers
and the recurrence is lane-local: no layout conversions in the dependent chain (a (d_state, block_d) tile
formulation of the same kernel measured 2.3-2.9x slower at T stage 3 on an H200, benchmarks/NOTES.md). With one
warp of 32 channels, B_t and C_t of a chunk are loaded as whole (32,) vectors of the flat (batch, length·d_state)
arrays and each value reaches the lanes by ``shfl.sync.idx`` (``_Coefficients``: K/2 registers a chunk for d_state
8 instead of 16·K scalars); otherwise they are read as scalars. The refs are whole arrays (no BlockSpecs): every
row load/store is a contiguous row of ``block_d`` channels at one time step, masked on ``channel < dim`` so any
``dim`` works with power-of-two ``block_d``.

The inference forward (no states saved) with ``KernelConfig.state_groups`` G set runs
:func:`_grouped_forward_kernel` instead: G lanes a channel, d_state/G states each (G times the warps of G = 1), one
pass over full chunks without clamps or masks.

Time runs as a ``fori_loop`` over chunks of ``chunk`` (K) steps whose K rows of u, Δ, B, C (and dy in the
backward) are loaded together; with ``prefetch`` the *next* chunk's rows are loaded at the top of each iteration
and handed over in the loop carry (software double buffering: latency hidden with registers), otherwise other
warps hide it. Row indices outside the sequence are clamped into it; the matching stores are masked, so any
``length`` works.

Forward, per step: Δ = softplus(delta + bias) (optional), a = exp2(Δ·A·log2e), h = a·h + (Δ·u)·B,
y = Σ_n C·h + D·u (exp2 and reciprocals as PTX approximations with ``fast_math``, see ``_Math``). When training
it also stores the state entering every chunk, ``states`` (batch, n_chunks, d_state, dim) float32 (≈ d_state/K
floats per (b, l, d) element).

Backward (mamba_ssm / axlearn style, recompute instead of store): chunks in reverse; per chunk, the K states
are recomputed from the saved chunk-entry state (K separate values, Python-unrolled), then the K steps are
walked backwards carrying ``g = a_{t+1}·dh_{t+1}``, with dh_t = g + C_t·dy_t. Outputs: du, dΔ (through
softplus and bias) in the inputs' dtypes; float32 partial sums reduced outside the kernel:
dA, dD, d(delta_bias) per batch row (batch, d_state, dim)/(batch, dim); dC and dB side by side per channel block
(n_blocks, batch, length, 2·d_state). With one warp of 32 channels the 2·d_state channel sums of a step go through
one butterfly transpose-reduction (``_transpose_sums``: 16 shuffles for d_state 8 instead of 80).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import struct

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mambavision_jax.pallas.reference import SOFTPLUS_THRESHOLD

__all__ = ["KernelConfig", "default_config", "scan_forward", "scan_backward"]

_LOG2E = math.log2(math.e)
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. ``block_d``: channels per program (power of two; more than 32 a warp puts several
    channels in a lane); ``chunk``: time steps whose row loads are issued together; ``num_warps``/``num_stages``:
    Triton's; ``splits``: segments of the sequence that run in parallel, forward and backward (1: one pass; more:
    a summary pass, then a main pass that chains each segment's true entry value from the summaries and reruns the
    segment); ``prefetch``: load the next chunk's rows while computing the current one (hides latency with
    registers; without it, other warps hide it); ``fast_math``: PTX ex2/rcp approximations (about 2 ulp) on the GPU
    (interpret mode always computes exactly); ``bwd_block_d``: the backward kernels' channel block (None: the
    forward's; the backward reads the forward's chunk-entry states, so it keeps the forward's chunk);
    ``state_groups`` (G, a power of two): the inference forward (no saved states) runs
    :func:`_grouped_forward_kernel`, G lanes a channel each holding d_state/G of its states, 32/G channels a one-warp
    program, in one pass (``block_d``, ``num_warps`` and ``splits`` then apply to the training kernels only); None:
    the inference forward runs the one-lane kernel with this config's ``block_d``, ``num_warps`` and ``splits``."""

    block_d: int = 32
    chunk: int = 4
    num_warps: int = 1
    num_stages: int = 1
    splits: int = 1
    prefetch: bool = True
    fast_math: bool = True
    bwd_block_d: int | None = None
    state_groups: int | None = None

    def __post_init__(self):
        for name in ("block_d", "chunk", "num_warps", "num_stages", "splits", "bwd_block_d", "state_groups"):
            value = getattr(self, name)
            if value is None and name in ("bwd_block_d", "state_groups"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"KernelConfig.{name} must be an integer, got {value!r}")
        for name in ("block_d", "chunk", "num_warps", "bwd_block_d", "state_groups"):
            value = getattr(self, name)
            if value is not None and (value < 1 or value & (value - 1)):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.splits < 1:
            raise ValueError(f"KernelConfig.splits must be >= 1, got {self.splits}")
        if self.state_groups is not None and self.state_groups > 32:
            raise ValueError(f"KernelConfig.state_groups must be at most 32, got {self.state_groups}")

    def backward(self) -> KernelConfig:
        """The configuration the backward kernels run with."""
        return dataclasses.replace(self, block_d=self.bwd_block_d or self.block_d, bwd_block_d=None)


_DEFAULT_SM_COUNT = 132  # H100 SXM / H200: the SM count assumed off a GPU (e.g. lowering for CUDA from a CPU host)


def gpu_sm_count() -> int:
    """Streaming multiprocessors of the default device if it is a GPU (its ``core_count``), else 132."""
    device = jax.devices()[0]
    count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(count) if count else _DEFAULT_SM_COUNT


def default_config(
    batch: int, length: int, dim: int, training: bool = False, d_state: int = 8, sm_count: int | None = None
) -> KernelConfig:
    """Inference (the forward alone), wherever d_state (padded to a power of two) is 2 to 32: the grouped kernel in
    one prefetched pass in chunks of 16 steps, with one lane a channel (``state_groups=1``: the fewest instructions
    a channel, no Δ or y shuffles) when that already gives more than two one-warp programs to each of the GPU's
    4·``sm_count`` warp schedulers (default: :func:`gpu_sm_count`), otherwise two lanes a channel
    (``state_groups=2``: twice the warps, to hide each warp's dependent chain). Training (the forward that saves
    chunk states, and the backward) and other d_state: one warp of 32 channels, a lane a channel with its d_state
    values in registers; long sequences (>= 128 steps) as 7 parallel segments without prefetching (fewer
    registers, more warps), short ones as one prefetched pass in chunks of 4 steps (2 for very short ones).

    Measured on an H200 (132 SMs; benchmarks/NOTES.md session 13), float32, forward kernel µs, G = 1 / G = 2
    (one-lane programs in brackets; G = 2 at L 49 b128 in chunks of 8, its faster chunk there): b128 T stage 3
    31.6 / 28.7 (640), B stage 3 40.3 / 39.1 (1,024), T stage 4 12.4 / 13.1 (1,280), L stage 3 58.3 / 61.7
    (1,664), B stage 4 16.6 / 20.5 (2,048), L stage 4 25.5 / 27.5 (3,136); L 49 dim 320 at b64 9.4 / 8.6 (640),
    b8 5.9 / 4.3. T stage 3 forward+backward 153.7 µs with 7
    segments (162.0 with 4, 163.9 with 10)."""
    if not training and 2 <= pl.next_power_of_2(d_state) <= 32:
        one_lane_programs = batch * pl.cdiv(dim, 32)
        schedulers = 4 * (sm_count or gpu_sm_count())
        return KernelConfig(chunk=16, state_groups=1 if one_lane_programs > 2 * schedulers else 2)
    if length >= 128:
        return KernelConfig(block_d=32, chunk=4, prefetch=False, splits=7)
    return KernelConfig(block_d=32, chunk=2 if length <= 16 else 4)


class _Math:
    """The kernels' transcendental functions and lane shuffles on float32 (block_d,) rows. ``fast``: PTX
    ``ex2.approx.ftz`` and ``rcp.approx.ftz`` (relative error about 2^-22) through inline assembly; otherwise exact
    jnp. Softplus and its derivative are built from these, so both modes run the same formulas. ``gpu``: lane
    shuffles as PTX ``shfl.sync``; otherwise (interpret mode) as the equivalent gather."""

    def __init__(self, fast: bool, gpu: bool):
        self.fast, self.gpu = fast, gpu

    @staticmethod
    def _asm(text, *args):
        """One PTX instruction on (32-bit) operands ``args``, elementwise, returning ``args[0]``'s shape and dtype."""
        out = jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)
        constraints = ",".join(["=r"] + ["r"] * len(args))
        return plt.elementwise_inline_asm(
            text, args=list(args), constraints=constraints, pack=1, result_shape_dtypes=[out]
        )[0]

    def exp2(self, x):
        return self._asm("ex2.approx.ftz.f32 $0, $1;", x) if self.fast else jnp.exp2(x)

    def fma(self, a, b, c):
        """a·b + c on float32 rows, rounded once (PTX ``fma.rn.f32``) on the GPU; ``c`` may be a Python float (an
        immediate operand). Spelled out because the device's Triton pipeline emits ``mul.rn``/``add.rn``, which
        ptxas does not contract: the grouped forward's SASS on the card had no FFMA at all (benchmarks/NOTES.md,
        session 10)."""
        if not self.gpu:
            return a * b + c
        if isinstance(c, float):
            bits = struct.unpack("<I", struct.pack("<f", c))[0]
            return self._asm(f"fma.rn.f32 $0, $1, $2, 0f{bits:08X};", *jnp.broadcast_arrays(a, b))
        return self._asm("fma.rn.f32 $0, $1, $2, $3;", *jnp.broadcast_arrays(a, b, c))

    def rcp(self, x):
        return self._asm("rcp.approx.ftz.f32 $0, $1;", x) if self.fast else 1.0 / x

    def lane_xor(self, x, offset):
        """Lane l of a one-warp (32,) vector receives lane ``l ^ offset``'s value (PTX ``shfl.sync.bfly``; a gather
        in interpret mode)."""
        if not self.gpu:
            return x[jnp.arange(x.shape[0]) ^ offset]
        return self._asm(f"shfl.sync.bfly.b32 $0, $1, {offset}, 31, -1;", x)

    def lane_broadcast(self, x, source):
        """Every lane of a one-warp (32,) vector receives lane ``source``'s value (PTX ``shfl.sync.idx``)."""
        if not self.gpu:
            return jnp.broadcast_to(x[source], x.shape)
        return self._asm(f"shfl.sync.idx.b32 $0, $1, {source}, 31, -1;", x)

    def lane_gather(self, x, source):
        """Lane l of a one-warp (32,) vector receives lane ``source[l]``'s value, ``source`` an int32 (32,) vector
        (PTX ``shfl.sync.idx`` with a per-lane source register)."""
        if not self.gpu:
            return x[source]
        return self._asm("shfl.sync.idx.b32 $0, $1, $2, 31, -1;", x, source)

    def softplus(self, x):
        """log(1 + e^x), x above the threshold passed through (mamba_ssm's). log1p(e) for e = e^-|x| in (0, 1] is
        2·atanh(s) with s = e / (2 + e) in [0, 1/3], a 7-term odd series (truncation < 1e-8 relative)."""
        e = self.exp2(-jnp.abs(x) * _LOG2E)
        s = e * self.rcp(2.0 + e)
        s2 = s * s
        series = jnp.full_like(s, 2.0 / 13.0)  # 2·atanh(s)/s = Σ_k 2/k·s^(k-1), k odd
        for k in (11, 9, 7, 5, 3, 1):
            series = self.fma(series, s2, 2.0 / k)
        return jnp.where(x > SOFTPLUS_THRESHOLD, x, self.fma(s, series, jnp.maximum(x, 0.0)))

    def softplus_grad(self, x):
        """d softplus / dx = sigmoid(x) (1 above the threshold)."""
        return jnp.where(x > SOFTPLUS_THRESHOLD, 1.0, self.rcp(1.0 + self.exp2(-x * _LOG2E)))


class _Rows:
    """Loads the K time-step rows of one chunk for program (channel block, batch row)."""

    def __init__(self, batch_idx, d0, dmask, block_d, length, chunk):
        self.b, self.d0, self.dmask = batch_idx, d0, dmask
        self.block_d, self.length, self.chunk = block_d, length, chunk

    def times(self, t0):
        """Clamped row index and validity of each step of the chunk starting at ``t0``."""
        return [(jnp.clip(t0 + k, 0, self.length - 1), t0 + k < self.length) for k in range(self.chunk)]

    def channels(self, ref, t0, valid_only=False):
        """K rows ``ref[b, t, d0:d0+block_d]`` (float32, zero outside ``dim``; also outside ``length`` if
        ``valid_only``)."""
        out = []
        for t, valid in self.times(t0):
            mask = jnp.logical_and(self.dmask, valid) if valid_only else self.dmask
            out.append(plt.load(ref.at[self.b, t, pl.ds(self.d0, self.block_d)], mask=mask, other=0.0).astype(_F32))
        return out


class _Coefficients:
    """B or C rows (d_state values per time step) of a chunk, for the forward kernels, from the array flattened to
    (batch, length·d_state).

    With one channel per lane of one warp (``vectors``), the chunk's K·d_state contiguous values are loaded as
    cdiv(K·d_state, 32) (32,) vectors and each value is broadcast to all lanes where it is used (one
    ``shfl.sync.idx``): K/2 registers a chunk for d_state 8 instead of 16·K for scalars held in registers, which
    lets chunks of 16 steps be prefetched. Otherwise (several channels a lane) K lists of d_state scalars."""

    def __init__(self, rows, n_state, math_, vectors):
        self.rows, self.n, self.math, self.vectors = rows, n_state, math_, vectors

    def load(self, flat_ref, t0):
        rows, n = self.rows, self.n
        if not self.vectors:
            return [[flat_ref[rows.b, t * n + i].astype(_F32) for i in range(n)] for t, _ in rows.times(t0)]
        lane = jnp.arange(32)
        out = []
        for v in range(pl.cdiv(rows.chunk * n, 32)):
            start = t0 * n + 32 * v
            # Both ends: the backward walks down to step 0, then prefetches the chunk before it
            index = start + lane
            mask = jnp.logical_and(index >= 0, index < rows.length * n)
            out.append(plt.load(flat_ref.at[rows.b, pl.ds(start, 32)], mask=mask, other=0.0).astype(_F32))
        return out

    def step(self, loaded, k):
        """The d_state values of step k of the chunk, each a scalar or a (32,) broadcast vector."""
        if not self.vectors:
            return loaded[k]
        return [self.math.lane_broadcast(loaded[(k * self.n + i) // 32], (k * self.n + i) % 32) for i in range(self.n)]


def _program(u_ref, block_d, chunk):
    """Program coordinates shared by both kernels."""
    _, length, dim = u_ref.shape
    d0 = pl.program_id(0) * block_d
    dmask = d0 + jnp.arange(block_d) < dim
    rows = _Rows(pl.program_id(1), d0, dmask, block_d, length, chunk)
    return rows, pl.cdiv(length, chunk)


def _lane_params(A_ref, D_ref, bias_ref, rows):
    """A as d_state (block_d,) vectors, plus D and the bias (float32, zero outside ``dim``)."""
    A = [
        plt.load(A_ref.at[jnp.int32(i), pl.ds(rows.d0, rows.block_d)], mask=rows.dmask, other=0.0).astype(_F32)
        for i in range(A_ref.shape[0])
    ]
    D = plt.load(D_ref.at[pl.ds(rows.d0, rows.block_d)], mask=rows.dmask, other=0.0).astype(_F32)
    bias = plt.load(bias_ref.at[pl.ds(rows.d0, rows.block_d)], mask=rows.dmask, other=0.0).astype(_F32)
    return A, D, bias


def _discretise(math_, delta_raw, bias, A2, delta_softplus):
    """(pre-softplus Δ, Δ, decays exp(Δ·A_n)) of one (block_d,) row; ``A2`` is A·log2(e)."""
    pre = delta_raw + bias
    dt = math_.softplus(pre) if delta_softplus else pre
    return pre, dt, [math_.exp2(dt * A2_n) for A2_n in A2]


def _lane_step(math_, delta_raw, bias, A2, h, u, B, delta_softplus):
    """One recurrence step on (block_d,) rows: returns (pre-softplus Δ, Δ, decays, new state)."""
    pre, dt, a = _discretise(math_, delta_raw, bias, A2, delta_softplus)
    dtu = dt * u
    return pre, dt, a, tuple(math_.fma(a_n, h_n, dtu * B_n) for a_n, h_n, B_n in zip(a, h, B))


def _chunk_loop(count, first_t0, step_t0, load, body, carry, prefetch):
    """``carry = body(t0, carry, rows)`` for the chunks starting at ``first_t0 + i * step_t0``, i < count, where
    ``rows = load(t0)``. With ``prefetch`` the next chunk's rows are loaded before the current one is computed and
    handed over in the loop carry (their latency overlaps the compute); otherwise each chunk loads its own."""
    if not prefetch:
        return jax.lax.fori_loop(
            0, count, lambda i, c: body(first_t0 + i * step_t0, c, load(first_t0 + i * step_t0)), carry
        )

    def pipelined(i, state):
        carry, rows = state
        t0 = first_t0 + i * step_t0
        upcoming = load(t0 + step_t0)  # after the last chunk: past an end, clamped or masked by the loaders, unused
        return body(t0, carry, rows), upcoming

    return jax.lax.fori_loop(0, count, pipelined, (carry, load(first_t0)))[0]


def _butterfly_pair(math_, lo, hi, offset):
    """One butterfly round for a pair of (32,) one-warp vectors: lanes with bit ``offset`` clear keep ``lo`` and
    receive their partner's (lane ``l ^ offset``) ``lo``; the others do the same with ``hi``. One shuffle."""
    upper = (jnp.arange(32) & offset) != 0
    return jnp.where(upper, hi, lo) + math_.lane_xor(jnp.where(upper, lo, hi), offset)


def _transpose_sums(math_, values, offset=16):
    """Sums of m (32,) one-warp vectors over their lanes, m a power of two <= 32, in m - 1 + log2(32/m) shuffles
    instead of 5·m: each butterfly round halves the vectors a lane keeps, then the last one is summed. Returns one
    (32,) vector whose lane l holds the sum of ``values[l >> (5 - log2 m)]``. With ``offset`` < 16, ``values``
    are what the rounds for the larger offsets already produced (the caller ran them, e.g. to free registers)."""
    values = list(values)
    while len(values) > 1:
        half = len(values) // 2
        values = [_butterfly_pair(math_, lo, hi, offset) for lo, hi in zip(values[:half], values[half:])]
        offset //= 2
    total = values[0]
    while offset >= 1:
        total = total + math_.lane_xor(total, offset)
        offset //= 2
    return total


def _forward_kernel(
    u_ref,
    delta_ref,
    A_ref,
    B_ref,
    C_ref,
    D_ref,
    bias_ref,
    *refs,
    config,
    math_,
    delta_softplus,
    chunks_per_segment,
    summarize,
    chained,
    save_states,
):
    """Program (j, b, s) runs chunks ``[s * chunks_per_segment, (s + 1) * chunks_per_segment)`` of batch row b.

    ``summarize=False``: writes y (refs: [ends, delta_sums,] y [, states]), starting from zeros or, when
    ``chained``, from the state entering segment s, chained here from the summary pass's ends and Δ sums; with
    ``save_states`` also the state entering each chunk. ``summarize=True`` (pass 1 of a split scan; refs: ends,
    delta_sums): starts from zeros and writes the segment's end state and the sum of Δ over its valid steps.
    """
    refs = list(refs)
    summary_refs = (refs.pop(0), refs.pop(0)) if chained else None
    block_d, chunk = config.block_d, config.chunk
    rows, n_chunks = _program(u_ref, block_d, chunk)
    segment = pl.program_id(2)
    A, D, bias = _lane_params(A_ref, D_ref, bias_ref, rows)
    A2 = [A_n * _LOG2E for A_n in A]

    coefficients = _Coefficients(rows, A_ref.shape[0], math_, block_d == 32 and config.num_warps == 1)

    def load(t0):
        Cs = None if summarize else coefficients.load(C_ref, t0)
        return rows.channels(u_ref, t0), rows.channels(delta_ref, t0), coefficients.load(B_ref, t0), Cs

    def body(t0, carry, chunk_rows):
        h, delta_sum = carry
        us, deltas, Bs, Cs = chunk_rows
        if save_states:
            c = t0 // chunk
            chunk_mask = jnp.logical_and(rows.dmask, c < n_chunks)
            for n, h_n in enumerate(h):
                plt.store(refs[1].at[rows.b, c, jnp.int32(n), pl.ds(rows.d0, block_d)], h_n, mask=chunk_mask)
        for k, (t, valid) in enumerate(rows.times(t0)):
            B_k = coefficients.step(Bs, k)
            _, dt, _, h_next = _lane_step(math_, deltas[k], bias, A2, h, us[k], B_k, delta_softplus)
            if summarize:  # steps past the end must not move the segment's end state
                h = tuple(jnp.where(valid, new, old) for new, old in zip(h_next, h))
                delta_sum = delta_sum + jnp.where(valid, dt, 0.0)
                continue
            h = h_next
            y = D * us[k]
            for h_n, C_n in zip(h, coefficients.step(Cs, k)):
                y = math_.fma(C_n, h_n, y)
            plt.store(
                refs[0].at[rows.b, t, pl.ds(rows.d0, block_d)],
                y.astype(refs[0].dtype),
                mask=jnp.logical_and(rows.dmask, valid),
            )
        return h, delta_sum

    zeros = jnp.zeros((block_d,), _F32)
    h = _chained_entry(math_, *summary_refs, A2, rows, segment, reverse=False) if chained else tuple(zeros for _ in A)
    first = segment * chunks_per_segment * chunk
    h, delta_sum = _chunk_loop(chunks_per_segment, first, chunk, load, body, (h, zeros), config.prefetch)
    if summarize:
        ends_ref, sums_ref = refs
        for n, h_n in enumerate(h):
            plt.store(ends_ref.at[rows.b, segment, jnp.int32(n), pl.ds(rows.d0, block_d)], h_n, mask=rows.dmask)
        plt.store(sums_ref.at[rows.b, segment, pl.ds(rows.d0, block_d)], delta_sum, mask=rows.dmask)


def _grouped_forward_kernel(
    u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, y_ref, *, config, math_, delta_softplus
):
    """Inference forward (y only) with G = ``config.state_groups`` lanes a channel: program (j, b) runs the whole
    sequence of channels ``[j·W, (j+1)·W)``, W = 32/G, of batch row b in one warp whose lane l holds channel
    ``j·W + l mod W`` and its states ``g·S .. g·S+S-1``, g = l div W, S = d_state/G.

    Compared with one lane a channel this gives G times the warps (the one-lane kernel leaves most schedulers with
    one warp at MambaVision's stage-3 shapes, stalled on its own dependent chain) for a few extra instructions a
    step: B and C reach each lane by ``shfl.sync.idx`` from (32,) vectors of the chunk's flat B/C values, y's G
    partial sums meet by ``shfl.sync.bfly``. With softplus, the G lanes of a channel each compute Δ for one of G
    consecutive steps and pass it round (one softplus per G steps). The time loop runs over the full chunks only,
    without clamps or masks (addresses are affine in the step, so loads and stores take immediate offsets); the
    ``length mod chunk`` last steps are the end of the chunk that finishes at the last step, whose rows the last
    iteration prefetched.
    """
    _, length, dim = u_ref.shape
    n = A_ref.shape[0]
    groups = config.state_groups
    width, per_lane = 32 // groups, n // groups
    lane = jnp.arange(32, dtype=jnp.int32)
    group = lane // width
    d0 = pl.program_id(0) * width
    batch_idx = pl.program_id(1)
    channel = jnp.minimum(d0 + lane % width, dim - 1)  # loads clamp; stores are masked on the true channel
    store_mask = jnp.logical_and(d0 + lane % width < dim, group == 0)
    A2 = [plt.load(A_ref.at[group * per_lane + i, channel]).astype(_F32) * _LOG2E for i in range(per_lane)]
    D = jnp.where(group == 0, plt.load(D_ref.at[channel]).astype(_F32), 0.0)  # D·u counted once in the group sum
    bias = plt.load(bias_ref.at[channel]).astype(_F32)
    share = delta_softplus and groups > 1

    def row(ref, t):  # u and Δ are read once: evicted first (B, C: read by every channel block of the row: last)
        return plt.load(ref.at[batch_idx, t, channel], eviction_policy="evict_first").astype(_F32)

    def load(t0, steps, shared):
        """u rows, Δ rows (with ``shared``, lane group g's row of each G-step group: step k + g), and the B and C
        values of steps [t0, t0 + steps) as (32,) vectors (the last one masked when it runs past the chunk)."""
        us = [row(u_ref, t0 + k) for k in range(steps)]
        if shared:
            deltas = [row(delta_ref, t0 + k + group) for k in range(0, steps, groups)]
        else:
            deltas = [row(delta_ref, t0 + k) for k in range(steps)]
        vectors = []
        for ref in (B_ref, C_ref):
            out = []
            for v in range(pl.cdiv(steps * n, 32)):
                window = ref.at[batch_idx, pl.ds(t0 * n + 32 * v, 32)]
                if steps * n >= 32 * (v + 1):
                    out.append(plt.load(window, eviction_policy="evict_last").astype(_F32))
                else:
                    mask = lane < steps * n - 32 * v
                    out.append(plt.load(window, mask=mask, other=0.0, eviction_policy="evict_last").astype(_F32))
            vectors.append(out)
        return us, deltas, *vectors

    def body(t0, h, chunk_rows, steps, shared, first=0):
        """Steps ``first .. steps-1`` of the chunk of rows loaded at ``t0``."""
        us, deltas, Bs, Cs = chunk_rows
        dts = {}
        if shared:  # lane group g computed Δ of step k + g; lane (j·W + c) hands step k + j's to every group
            for p in range(first // groups, steps // groups):
                own = math_.softplus(deltas[p] + bias)
                for j in range(groups):
                    dts[p * groups + j] = math_.lane_gather(own, j * width + lane % width)
        else:
            for k in range(first, steps):
                dts[k] = math_.softplus(deltas[k] + bias) if delta_softplus else deltas[k] + bias
        for k in range(first, steps):
            vector, offset = divmod(k * n, 32)  # step k's B/C values: lanes offset .. offset+n-1 of that vector
            source = [offset + group * per_lane + i for i in range(per_lane)]
            dtu = dts[k] * us[k]
            h = tuple(
                math_.fma(math_.exp2(dts[k] * A2_i), h_i, dtu * math_.lane_gather(Bs[vector], src))
                for A2_i, h_i, src in zip(A2, h, source)
            )
            y = D * us[k]
            for h_i, src in zip(h, source):
                y = math_.fma(math_.lane_gather(Cs[vector], src), h_i, y)
            offset_bits = width
            while offset_bits < 32:
                y = y + math_.lane_xor(y, offset_bits)
                offset_bits *= 2
            if math_.gpu:
                y_row = y_ref.at[batch_idx, t0 + k, channel]
                plt.store(y_row, y.astype(y_ref.dtype), mask=store_mask, eviction_policy="evict_first")
            else:  # interpret mode stores the first W lanes: a masked store to repeated addresses is undefined there
                plt.store(
                    y_ref.at[batch_idx, t0 + k, pl.ds(d0, width)],
                    y[:width].astype(y_ref.dtype),
                    mask=d0 + jnp.arange(width) < dim,
                )
        return h

    chunk = config.chunk
    h = tuple(jnp.zeros((32,), _F32) for _ in range(per_lane))
    full_chunks, tail = divmod(length, chunk)
    if not full_chunks:  # shorter than a chunk: one static chunk of ``length`` steps
        t0 = 0 * batch_idx  # traced: a static start would make the masked B/C vector loads' reach past the end an error
        body(t0, h, load(t0, length, False), length, False)
        return
    last_start = length - chunk + 0 * batch_idx  # traced, like every other row index (see above)
    full = functools.partial(body, steps=chunk, shared=share)
    load_full = functools.partial(load, steps=chunk, shared=share)
    if config.prefetch:

        def pipelined(i, state):
            h, chunk_rows = state
            upcoming = load_full(jnp.minimum((i + 1) * chunk, last_start))
            return full(i * chunk, h, chunk_rows), upcoming

        h, last_rows = jax.lax.fori_loop(0, full_chunks, pipelined, (h, load_full(0)))
    else:
        h = jax.lax.fori_loop(0, full_chunks, lambda i, h: full(i * chunk, h, load_full(i * chunk)), h)
    if tail:  # the chunk ending at the last step (prefetched by the last iteration), from its first new step
        full(last_start, h, last_rows if config.prefetch else load_full(last_start), first=chunk - tail)


def _adjoint_summary_kernel(
    delta_ref, A_ref, C_ref, D_ref, bias_ref, dy_ref, g_ref, sums_ref, *, config, math_, delta_softplus, per_segment
):
    """Pass 1 of a split backward. Program (j, b, s) walks segment s + 1 backwards from a zero adjoint through
    dh_t = g + C_t·dy_t, g = exp(Δ_t·A)·dh_t (no states needed) and writes, as summary s, the g it leaves the
    segment with and the sum of Δ over the segment's valid steps (segment 0 needs no summary)."""
    block_d, chunk = config.block_d, config.chunk
    rows, _ = _program(delta_ref, block_d, chunk)
    A, _, bias = _lane_params(A_ref, D_ref, bias_ref, rows)
    A2 = [A_n * _LOG2E for A_n in A]
    summary = pl.program_id(2)  # the first segment needs no summary: program s walks segment s + 1
    segment = summary + 1
    last = segment * per_segment + per_segment - 1

    coefficients = _Coefficients(rows, A_ref.shape[0], math_, block_d == 32 and config.num_warps == 1)

    def load(t0):
        return rows.channels(delta_ref, t0), coefficients.load(C_ref, t0), rows.channels(dy_ref, t0, valid_only=True)

    def body(t0, carry, chunk_rows):
        g, delta_sum = carry
        deltas, Cs, dys = chunk_rows
        for k, (_, valid) in reversed(list(enumerate(rows.times(t0)))):
            _, dt, a = _discretise(math_, deltas[k], bias, A2, delta_softplus)
            C_k = coefficients.step(Cs, k)
            g = tuple(jnp.where(valid, (g_n + C_n * dys[k]) * a_n, g_n) for g_n, C_n, a_n in zip(g, C_k, a))
            delta_sum = delta_sum + jnp.where(valid, dt, 0.0)
        return g, delta_sum

    zeros = jnp.zeros((block_d,), _F32)
    g, delta_sum = _chunk_loop(
        per_segment, last * chunk, -chunk, load, body, (tuple(zeros for _ in A), zeros), config.prefetch
    )
    for n, g_n in enumerate(g):
        plt.store(g_ref.at[rows.b, summary, jnp.int32(n), pl.ds(rows.d0, block_d)], g_n, mask=rows.dmask)
    plt.store(sums_ref.at[rows.b, summary, pl.ds(rows.d0, block_d)], delta_sum, mask=rows.dmask)


def _backward_kernel(
    u_ref,
    delta_ref,
    A_ref,
    B_ref,
    C_ref,
    D_ref,
    bias_ref,
    dy_ref,
    states_ref,
    *refs,
    config,
    math_,
    delta_softplus,
    per_segment,
    chained,
):
    """Program (j, b, s) walks the chunks of segment s backwards, from a zero adjoint or, when ``chained``, from
    the adjoint entering segment s from above, chained here from the summary pass's adjoints and Δ sums.
    ``states_ref`` holds the state entering every chunk, saved by the forward pass.
    refs: [adjoints, delta_sums,] du, ddelta, dA (batch, segments, d_state, dim), dD, dbias (batch, segments, dim),
    dCB (n_blocks, batch, length, 2 * d_state)."""
    refs = list(refs)
    summary_refs = (refs.pop(0), refs.pop(0)) if chained else None
    du_ref, ddelta_ref, dA_ref, dD_ref, dbias_ref, dCB_ref = refs
    block_d, chunk = config.block_d, config.chunk
    rows, _ = _program(u_ref, block_d, chunk)
    A, D, bias = _lane_params(A_ref, D_ref, bias_ref, rows)
    A2 = [A_n * _LOG2E for A_n in A]
    n = len(A)
    blk = pl.program_id(0)
    segment = pl.program_id(2)
    last = segment * per_segment + per_segment - 1
    # One channel per lane of one warp: the 2n dB/dC sums of a step go through one butterfly transpose-reduction.
    butterfly = block_d == 32 and config.num_warps == 1 and 2 * n <= 32
    coefficients = _Coefficients(rows, n, math_, block_d == 32 and config.num_warps == 1)
    lane = jnp.arange(block_d)
    shift = 5 - int(math.log2(2 * n))

    def load(t0):
        return (
            rows.channels(u_ref, t0),
            rows.channels(delta_ref, t0),
            coefficients.load(B_ref, t0),
            coefficients.load(C_ref, t0),
            rows.channels(dy_ref, t0, valid_only=True),
        )

    def entry_state(t0):
        """The state entering the chunk at ``t0``, saved by the forward pass."""
        state_mask = jnp.logical_and(rows.dmask, t0 < rows.length)  # the last segment may run past the end
        return tuple(
            plt.load(
                states_ref.at[rows.b, t0 // chunk, jnp.int32(j), pl.ds(rows.d0, block_d)], mask=state_mask, other=0.0
            )
            for j in range(n)
        )

    def channel_terms(dC_term, dB_term):
        """The per-lane terms of dC_j and dB_j, kept for :func:`store_channel_sums` (with the butterfly, already
        through its first round, which pairs dC_j with dB_j: half the registers)."""
        return [_butterfly_pair(math_, dC_term, dB_term, 16)] if butterfly else [dC_term, dB_term]

    def store_channel_sums(t, valid, terms):
        """dCB[blk, b, t] = (dC_0..dC_{n-1}, dB_0..dB_{n-1}): the per-lane terms summed over the block's channels."""
        if not butterfly:
            for j in range(n):
                plt.store(dCB_ref.at[blk, rows.b, t, jnp.int32(j)], jnp.sum(terms[2 * j]), mask=valid)
                plt.store(dCB_ref.at[blk, rows.b, t, jnp.int32(n + j)], jnp.sum(terms[2 * j + 1]), mask=valid)
            return
        # Lane l holds the sum of term l >> shift; the 2^shift lanes holding a term all store it (same value).
        plt.store(dCB_ref.at[blk, rows.b, t, lane >> shift], _transpose_sums(math_, terms, offset=8), mask=valid)

    def body(t0, carry, chunk_rows):
        g, dA, dD, dbias = carry
        us, deltas, Bs, Cs, dys = chunk_rows
        h = [entry_state(t0)]
        disc = []
        for k in range(chunk):  # recompute the chunk's states from its entry state
            pre, dt, a, h_next = _lane_step(
                math_, deltas[k], bias, A2, h[k], us[k], coefficients.step(Bs, k), delta_softplus
            )
            disc.append((pre, dt, a))
            h.append(h_next)
        times = rows.times(t0)
        for k in reversed(range(chunk)):  # walk back; dy is 0 past the end, so nothing flows from there
            t, valid = times[k]
            pre, dt, a = disc[k]
            u, B_t, C_t, dy = us[k], coefficients.step(Bs, k), coefficients.step(Cs, k), dys[k]
            dtu = dt * u
            # Per state j: dh_j = g_j + C_j·dy; dB_j = Σ_d dh_j·Δu; dC_j = Σ_d h_j·dy; the next g_j = a_j·dh_j;
            # with p_j = a_j·dh_j·h_{t-1,j}: dA_j += Δ·p_j and dΔ = Σ_j A_j·p_j + u·S, du = D·dy + Δ·S for
            # S = Σ_j B_j·dh_j.
            new_g, new_dA, terms = [], [], []
            for j in range(n):
                dh = math_.fma(C_t[j], dy, g[j])
                terms += channel_terms(h[k + 1][j] * dy, dh * dtu)
                dh_a = dh * a[j]
                p_j = dh_a * h[k][j]
                dS = B_t[j] * dh if j == 0 else math_.fma(B_t[j], dh, dS)
                ddt = A[j] * p_j if j == 0 else math_.fma(A[j], p_j, ddt)
                new_dA.append(math_.fma(dt, p_j, dA[j]))
                new_g.append(dh_a)
            store_channel_sums(t, valid, terms)
            du = math_.fma(dt, dS, dy * D)
            ddt = math_.fma(u, dS, ddt)
            if delta_softplus:
                ddt = ddt * math_.softplus_grad(pre)
            g, dA = tuple(new_g), tuple(new_dA)
            dD = math_.fma(dy, u, dD)
            dbias = dbias + ddt
            row_mask = jnp.logical_and(rows.dmask, valid)
            plt.store(du_ref.at[rows.b, t, pl.ds(rows.d0, block_d)], du.astype(du_ref.dtype), mask=row_mask)
            plt.store(ddelta_ref.at[rows.b, t, pl.ds(rows.d0, block_d)], ddt.astype(ddelta_ref.dtype), mask=row_mask)
        return g, dA, dD, dbias

    zeros = jnp.zeros((block_d,), _F32)
    zeros_n = tuple(zeros for _ in range(n))
    g = _chained_entry(math_, *summary_refs, A2, rows, segment, reverse=True) if chained else zeros_n
    _, dA, dD, dbias = _chunk_loop(
        per_segment, last * chunk, -chunk, load, body, (g, zeros_n, zeros, zeros), config.prefetch
    )
    for j in range(n):
        plt.store(dA_ref.at[rows.b, segment, jnp.int32(j), pl.ds(rows.d0, block_d)], dA[j], mask=rows.dmask)
    plt.store(dD_ref.at[rows.b, segment, pl.ds(rows.d0, block_d)], dD, mask=rows.dmask)
    plt.store(dbias_ref.at[rows.b, segment, pl.ds(rows.d0, block_d)], dbias, mask=rows.dmask)


def _segments(n_chunks: int, splits: int) -> tuple[int, int]:
    """(chunks per segment, number of segments) for ``splits`` requested segments (none of them empty)."""
    per_segment = pl.cdiv(n_chunks, min(splits, n_chunks))
    return per_segment, pl.cdiv(n_chunks, per_segment)


def _chained_entry(math_, values_ref, sums_ref, A2, rows, segment, *, reverse):
    """The state (forward) or adjoint (backward, ``reverse``) entering ``segment`` of a split scan, as d_state
    (block_d,) float32 vectors, chained from the summary pass's outputs.

    ``values_ref`` (batch, S - 1, d_state, dim): what a segment produces from a zero start; ``sums_ref``
    (batch, S - 1, dim): its Δ sums, so exp(A·sum) is its total decay (``A2`` = A·log2 e). Summary i describes
    segment i (forward; the last segment needs none) or i + 1 (reverse; the first needs none). Forward:
    entry_0 = 0, entry_{s+1} = decay_s·entry_s + values_s. Reverse: entry_{S-1} = 0, entry_{s-1} = decay_s·entry_s
    + values_s. S is at most a handful, so every program redoes the few steps it needs (no extra launch); the
    first summary in chain order multiplies a zero entry, so its decay is not loaded."""
    summaries = values_ref.shape[1]
    channels = pl.ds(rows.d0, rows.block_d)
    entry = None
    for i in range(summaries - 1, -1, -1) if reverse else range(summaries):
        mask = jnp.logical_and(rows.dmask, segment <= i if reverse else i < segment)
        values = [
            plt.load(values_ref.at[rows.b, jnp.int32(i), jnp.int32(n), channels], mask=mask, other=0.0)
            for n in range(len(A2))
        ]
        if entry is None:
            entry = tuple(values)
            continue
        total = plt.load(sums_ref.at[rows.b, jnp.int32(i), channels], mask=mask, other=0.0)
        entry = tuple(math_.exp2(total * A2_n) * e_n + v_n for A2_n, e_n, v_n in zip(A2, entry, values))
    return entry


def _summary_shapes(batch, segments, n, dim):
    """Outputs of a split scan's summary pass: a value (batch, S - 1, d_state, dim) and a Δ sum (batch, S - 1, dim)
    float32 for every segment but one (see :func:`_chained_entry`)."""
    return [
        jax.ShapeDtypeStruct((batch, segments - 1, n, dim), _F32),
        jax.ShapeDtypeStruct((batch, segments - 1, dim), _F32),
    ]


def _call(kernel, out_shape, u, config, interpret, name, segments):
    batch, _, dim = u.shape
    grid = (pl.cdiv(dim, config.block_d), batch, segments)
    return pl.pallas_call(
        functools.partial(
            kernel, config=config, math_=_Math(fast=config.fast_math and not interpret, gpu=not interpret)
        ),
        out_shape=out_shape,
        grid=grid,
        compiler_params=plt.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=name,
    )


def scan_forward(
    u,
    delta,
    A,
    B,
    C,
    D,
    delta_bias,
    *,
    delta_softplus: bool,
    save_states: bool,
    config: KernelConfig,
    interpret: bool = False,
):
    """Forward kernel(s). D and delta_bias are (dim,) arrays (zeros when absent). Returns ``y`` (u's dtype) and,
    if ``save_states``, the chunk-entry states (batch, cdiv(length, chunk), d_state, dim) float32.

    With ``config.splits`` > 1 the sequence runs as that many segments in parallel: pass 1 writes each segment's
    end state from zero and its Δ sum; pass 2 chains each segment's entry state from them
    (entry_{s+1} = exp(A·Σ_s Δ)·entry_s + end_s) and reruns the segment from it."""
    batch, length, dim = u.shape
    n = A.shape[1]
    args = (u, delta, A.T, B.reshape(batch, length * n), C.reshape(batch, length * n), D, delta_bias)
    if config.state_groups is not None and not save_states:
        return _grouped_forward(args, delta_softplus, config, interpret), None
    n_chunks = pl.cdiv(length, config.chunk)
    per_segment, segments = _segments(n_chunks, config.splits)
    kernel = functools.partial(_forward_kernel, delta_softplus=delta_softplus, chunks_per_segment=per_segment)
    summary = ()
    if segments > 1:
        summary_shape = _summary_shapes(batch, segments, n, dim)
        summarize = functools.partial(kernel, summarize=True, chained=False, save_states=False)
        summary = _call(summarize, summary_shape, u, config, interpret, "selective_scan_fwd_summary", segments - 1)(
            *args
        )
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((batch, n_chunks, n, dim), _F32))
    main = functools.partial(kernel, summarize=False, chained=bool(summary), save_states=save_states)
    outs = _call(main, out_shape, u, config, interpret, "selective_scan_fwd", segments)(*args, *summary)
    return outs if save_states else (outs[0], None)


def _grouped_forward(args, delta_softplus, config, interpret):
    """y of :func:`_grouped_forward_kernel` on scan_forward's kernel arguments (A transposed, B/C flat)."""
    u, n = args[0], args[2].shape[0]
    groups = config.state_groups
    if n % groups or n > 32:
        raise ValueError(
            f"KernelConfig.state_groups={groups} needs d_state (padded to a power of two: {n}) to be a multiple "
            "of it and at most 32"
        )
    if delta_softplus and config.chunk % groups:
        raise ValueError(
            f"KernelConfig.state_groups={groups} needs a chunk that is a multiple of it, got {config.chunk}"
        )
    batch, _, dim = u.shape
    kernel = functools.partial(
        _grouped_forward_kernel,
        config=config,
        math_=_Math(fast=config.fast_math and not interpret, gpu=not interpret),
        delta_softplus=delta_softplus,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(u.shape, u.dtype),
        grid=(pl.cdiv(dim, 32 // groups), batch),
        compiler_params=plt.CompilerParams(num_warps=1, num_stages=config.num_stages),
        interpret=interpret,
        name="selective_scan_fwd_grouped",
    )(*args)


def scan_backward(
    u, delta, A, B, C, D, delta_bias, states, dy, *, delta_softplus: bool, config: KernelConfig, interpret: bool = False
):
    """Backward kernel(s), run with ``config.backward()``; ``states`` are the forward's chunk-entry states.
    Returns du, ddelta (inputs' dtypes), and float32 gradients dA (dim, d_state), dB, dC (batch, length, d_state),
    dD, d(delta_bias) (dim,), with the partial sums already reduced.

    With ``splits`` > 1 the segments run in parallel: a summary pass gives each segment's adjoint from zero
    and its Δ sum; the main pass chains each segment's incoming adjoint from the last segment back
    (g_s = exp(A·Σ_{s+1} Δ)·g_{s+1} + local_{s+1}) and walks the segment from it."""
    bwd = config.backward()
    batch, length, dim = u.shape
    n = A.shape[1]
    n_blocks = pl.cdiv(dim, bwd.block_d)
    per_segment, segments = _segments(pl.cdiv(length, bwd.chunk), bwd.splits)
    common = dict(delta_softplus=delta_softplus, per_segment=per_segment)
    C_flat = C.reshape(batch, length * n)  # B/C rows read as flat (batch, length·d_state), see _Coefficients
    summary = ()
    if segments > 1:
        summary_shape = _summary_shapes(batch, segments, n, dim)
        summarize = functools.partial(_adjoint_summary_kernel, **common)
        summary = _call(summarize, summary_shape, u, bwd, interpret, "selective_scan_bwd_summary", segments - 1)(
            delta, A.T, C_flat, D, delta_bias, dy
        )
    out_shape = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        jax.ShapeDtypeStruct(delta.shape, delta.dtype),
        jax.ShapeDtypeStruct((batch, segments, n, dim), _F32),
        jax.ShapeDtypeStruct((batch, segments, dim), _F32),
        jax.ShapeDtypeStruct((batch, segments, dim), _F32),
        jax.ShapeDtypeStruct((n_blocks, batch, length, 2 * n), _F32),
    ]
    kernel = functools.partial(_backward_kernel, chained=bool(summary), **common)
    du, ddelta, dA, dD, dbias, dCB = _call(kernel, out_shape, u, bwd, interpret, "selective_scan_bwd", segments)(
        u, delta, A.T, B.reshape(batch, length * n), C_flat, D, delta_bias, dy, states, *summary
    )
    dCB = dCB.sum(0)
    return du, ddelta, dA.sum((0, 1)).T, dCB[..., n:], dCB[..., :n], dD.sum((0, 1)), dbias.sum((0, 1))
