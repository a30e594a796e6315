"""LayerNorm over the last axis with the residual add in front of it, as single-pass Pallas-Triton row kernels.

    x_new  = x + row_scale · gamma · branch      (the residual update; each factor optional)
    normed = (x_new - mean) · rstd · scale + bias (statistics over the last axis, float32)

XLA runs the residual add, the LayerNorm's statistics and its normalisation, and in the backward the LayerNorm
gradient, the residual gradient and the layer-scale gradient as several passes over the (tokens, channels) stream
(B's stage-3 LayerNorms and residual updates: ~3.4 ms of a 37 ms training step on an H200, ``benchmarks/NOTES.md``
session 14). Here one kernel reads x and branch once and writes x_new, normed and the per-row statistics; one
backward kernel reads x_new, branch and both cotangents once and writes the two input gradients, with per-program
column sums for the gamma, scale and bias gradients. A program holds up to 16 whole rows, each padded to the next
power of two of C with masked loads and stores (Triton's blocks are powers of two; MambaVision's widths are 320 to
2048), so every value is loaded once.

Layouts: x, branch (M, C) row-major (tokens, channels); gamma, scale, bias (C,); row_scale (M,) (drop path's
per-sample keep/keep_prob, repeated over that sample's rows). ``impl="xla"`` is the same math in plain JAX.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mambavision_jax.pallas.partitioning import batch_parallel

IMPLS = ("xla", "pallas")
MAX_WIDTH = 2048  # the widest row a program holds (MambaVision-L3's stage-4 width); wider rows fall back to XLA
MAX_BLOCK_ROWS = 16
BLOCK_ELEMENTS = 8192  # rows × width a program holds at once (f32: 64 values a thread for 4 warps)


def residual_update(x, branch, gamma=None, row_scale=None):
    """x + row_scale · gamma · branch (absent factors left out), (M, C), computed in float32 and returned in the
    promoted dtype of the operands, as the fused kernel's x_new."""
    return _residual(x, branch, gamma, row_scale).astype(_stream_dtype(x, branch, gamma, row_scale))


def _residual(x, branch, gamma, row_scale):
    """x + row_scale · gamma · branch in float32 (absent factors left out)."""
    update = branch.astype(jnp.float32)
    if gamma is not None:
        update = update * gamma.astype(jnp.float32)
    if row_scale is not None:
        update = update * row_scale.astype(jnp.float32)[:, None]
    return x.astype(jnp.float32) + update


def add_layer_norm_reference(x, branch, gamma, row_scale, scale, bias, *, eps, out_dtype):
    """Plain-JAX ``(x_new, normed)``; ``branch`` None means no residual update (x_new is x)."""
    x_new = x.astype(jnp.float32) if branch is None else _residual(x, branch, gamma, row_scale)
    mean = jnp.mean(x_new, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x_new - mean), axis=-1, keepdims=True)
    normed = (x_new - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return x_new.astype(_stream_dtype(x, branch, gamma, row_scale)), normed.astype(out_dtype)


def _stream_dtype(x, branch, gamma, row_scale):
    """The dtype ``x + row_scale * gamma * branch`` has under JAX's promotion rules."""
    return jnp.result_type(*(a for a in (x, branch, gamma, row_scale) if a is not None))


def _width(channels: int) -> int:
    """The power-of-two row width a program loads: ``channels`` rounded up (at least 16; the columns past
    ``channels`` are masked)."""
    return max(16, 1 << (channels - 1).bit_length())


def _block_rows(rows: int, width: int) -> int:
    """Rows a program: the largest power of two dividing ``rows`` with at most BLOCK_ELEMENTS values a block."""
    block = min(MAX_BLOCK_ROWS, BLOCK_ELEMENTS // width)
    while rows % block:
        block //= 2
    return block


class _Row(NamedTuple):
    """Masked access to a block's rows padded to ``width`` columns: loads give 0 past ``channels``, stores skip
    those columns. Use inside a kernel (the mask is built where it is used)."""

    channels: int
    width: int

    @property
    def mask(self):
        """(width,) True on the real columns, or None when the row is not padded."""
        return None if self.width == self.channels else jnp.arange(self.width) < self.channels

    def load(self, ref):
        """(block_rows, width) float32, or (1, width) for a (C,) vector ref."""
        mask, cols = self.mask, pl.ds(0, self.width)
        vector = len(ref.shape) == 1
        if mask is not None and not vector:
            mask = mask[None, :]
        other = None if mask is None else 0.0
        value = plt.load(ref.at[cols] if vector else ref.at[:, cols], mask=mask, other=other).astype(jnp.float32)
        return value[None, :] if vector else value

    def store(self, ref, value):
        mask = None if self.mask is None else self.mask[None, :]
        plt.store(ref.at[:, pl.ds(0, self.width)], value.astype(ref.dtype), mask=mask)


def _forward_kernel(*refs, has_branch, has_gamma, has_row_scale, row: _Row, channels, eps):
    refs = list(refs)
    x_ref = refs.pop(0)
    branch_ref = refs.pop(0) if has_branch else None
    gamma_ref = refs.pop(0) if has_gamma else None
    row_scale_ref = refs.pop(0) if has_row_scale else None
    scale_ref, bias_ref = refs[:2]
    x_new_ref = refs[2] if has_branch else None
    normed_ref, mean_ref, rstd_ref = refs[-3:]

    value = row.load(x_ref)
    if has_branch:
        update = row.load(branch_ref)
        if has_gamma:
            update = update * row.load(gamma_ref)
        if has_row_scale:
            update = update * row_scale_ref[...].astype(jnp.float32)[:, None]
        value = value + update
        row.store(x_new_ref, value)
    mean = jnp.sum(value, axis=1) / channels
    centred = value - mean[:, None]
    mask = row.mask
    if mask is not None:
        centred = jnp.where(mask[None, :], centred, 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / channels + eps)
    row.store(normed_ref, centred * rstd[:, None] * row.load(scale_ref) + row.load(bias_ref))
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _backward_kernel(*refs, has_branch, has_gamma, has_row_scale, row: _Row, channels):
    refs = list(refs)
    x_new_ref = refs.pop(0)
    branch_ref = refs.pop(0) if has_branch else None
    gamma_ref = refs.pop(0) if has_gamma else None
    row_scale_ref = refs.pop(0) if has_row_scale else None
    scale_ref, mean_ref, rstd_ref, d_x_new_ref, d_normed_ref = refs[:5]
    outs = list(refs[5:])
    dx_ref = outs.pop(0)
    d_branch_ref = outs.pop(0) if has_branch else None
    d_row_scale_ref = outs.pop(0) if has_row_scale else None
    d_gamma_ref = outs.pop(0) if has_gamma else None
    d_scale_ref, d_bias_ref = outs
    rstd = rstd_ref[...][:, None]

    d_normed = row.load(d_normed_ref)  # 0 past ``channels``, so every column sum below is 0 there
    x_hat = (row.load(x_new_ref) - mean_ref[...][:, None]) * rstd
    g = d_normed * row.load(scale_ref)
    g_mean = jnp.sum(g, axis=1, keepdims=True) / channels
    gx_mean = jnp.sum(g * x_hat, axis=1, keepdims=True) / channels
    d_total = row.load(d_x_new_ref) + rstd * (g - g_mean - x_hat * gx_mean)
    row.store(dx_ref, d_total)
    row.store(d_scale_ref, jnp.sum(d_normed * x_hat, axis=0, keepdims=True))
    row.store(d_bias_ref, jnp.sum(d_normed, axis=0, keepdims=True))
    if has_branch:
        branch = row.load(branch_ref)
        d_update = d_total * row_scale_ref[...].astype(jnp.float32)[:, None] if has_row_scale else d_total
        gamma = row.load(gamma_ref) if has_gamma else None
        row.store(d_branch_ref, d_update * gamma if has_gamma else d_update)
        if has_gamma:
            row.store(d_gamma_ref, jnp.sum(d_update * branch, axis=0, keepdims=True))
        if has_row_scale:
            scaled = branch * gamma if has_gamma else branch
            d_row_scale_ref[...] = jnp.sum(d_total * scaled, axis=1)


def _row_spec(block_rows, channels):
    return pl.BlockSpec((block_rows, channels), lambda i: (i, 0))


def _vector_spec(block_rows):
    return pl.BlockSpec((block_rows,), lambda i: (i,))


def _channel_spec(channels):
    return pl.BlockSpec((channels,), lambda i: (0,))


def _partial_spec(channels):
    return pl.BlockSpec((1, channels), lambda i: (i, 0))


def _row_call(kernel, programs, in_specs, out_shape, out_specs, name, interpret):
    """A one-dimensional grid of ``programs`` row blocks, one warp group of 4 warps each."""
    return pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(programs,),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=name,
    )


def _flags(branch, gamma, row_scale):
    return dict(has_branch=branch is not None, has_gamma=gamma is not None, has_row_scale=row_scale is not None)


def _split(arrays, has_branch, has_gamma, has_row_scale, lead, tail):
    """(``lead`` leading arrays, branch, gamma, row_scale, ``tail`` trailing arrays) from the present ones."""
    arrays = list(arrays)
    head = [arrays.pop(0) for _ in range(lead)]
    optional = [arrays.pop(0) if present else None for present in (has_branch, has_gamma, has_row_scale)]
    assert len(arrays) == tail
    return head, optional, arrays


def _rule(has_branch, has_gamma, has_row_scale, lead, tail, results):
    """Shardy rule for the present operands: ``lead`` and ``tail`` factor lists around branch/gamma/row_scale."""
    optional = [axes for axes, present in (("b c", has_branch), ("c", has_gamma), ("b", has_row_scale)) if present]
    return ", ".join(lead + optional + tail) + " -> " + ", ".join(results)


@functools.lru_cache(maxsize=None)
def _forward_call(has_branch, has_gamma, has_row_scale):
    """The forward kernel, batch-parallel over the rows (:func:`batch_parallel`), for these optional operands."""
    results = (["b c"] if has_branch else []) + ["b c", "b", "b"]
    rule = _rule(has_branch, has_gamma, has_row_scale, ["b c"], ["c", "c"], results)
    return batch_parallel(_forward_local, rule, num_static=6)


def _forward_local(*args):
    *arrays, has_branch, has_gamma, has_row_scale, eps, out_dtype, interpret = args
    (x,), (branch, gamma, row_scale), (scale, bias) = _split(arrays, has_branch, has_gamma, has_row_scale, 1, 2)
    rows, channels = x.shape
    width = _width(channels)
    block_rows = _block_rows(rows, width)
    flags = _flags(branch, gamma, row_scale)
    kernel = functools.partial(_forward_kernel, **flags, row=_Row(channels, width), channels=channels, eps=eps)
    in_specs = [_row_spec(block_rows, channels)]
    in_specs += [_row_spec(block_rows, channels)] if branch is not None else []
    in_specs += [_channel_spec(channels)] if gamma is not None else []
    in_specs += [_vector_spec(block_rows)] if row_scale is not None else []
    in_specs += [_channel_spec(channels), _channel_spec(channels)]
    out_shape = [
        jax.ShapeDtypeStruct((rows, channels), out_dtype),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
    ]
    out_specs = [_row_spec(block_rows, channels), _vector_spec(block_rows), _vector_spec(block_rows)]
    if branch is not None:
        out_shape.insert(0, jax.ShapeDtypeStruct((rows, channels), _stream_dtype(x, branch, gamma, row_scale)))
        out_specs.insert(0, _row_spec(block_rows, channels))
    call = _row_call(kernel, rows // block_rows, in_specs, out_shape, out_specs, "add_layer_norm_fwd", interpret)
    return tuple(call(*arrays))


def _forward(x, branch, gamma, row_scale, scale, bias, eps, out_dtype, interpret):
    flags = _flags(branch, gamma, row_scale)
    arrays = [a for a in (x, branch, gamma, row_scale, scale, bias) if a is not None]
    outs = _forward_call(*flags.values())(*arrays, *flags.values(), eps, out_dtype, interpret)
    x_new = outs[0] if branch is not None else x  # without a branch x_new is x itself
    return (x_new,) + tuple(outs[-3:])


@functools.lru_cache(maxsize=None)
def _backward_call(has_branch, has_gamma, has_row_scale):
    """The backward kernel with its column sums reduced, batch-parallel over the rows (the sums psum-ed)."""
    results = ["b c"] + (["b c"] if has_branch else []) + (["b"] if has_row_scale else [])
    summed = list(range(len(results), len(results) + has_gamma + 2))
    results += (["c"] if has_gamma else []) + ["c", "c"]
    rule = _rule(has_branch, has_gamma, has_row_scale, ["b c"], ["c", "b", "b", "b c", "b c"], results)
    return batch_parallel(_backward_local, rule, num_static=5, summed_results=summed)


def _backward_local(*args):
    *arrays, has_branch, has_gamma, has_row_scale, x_dtype, interpret = args
    (x_new,), (branch, gamma, row_scale), tail = _split(arrays, has_branch, has_gamma, has_row_scale, 1, 5)
    rows, channels = x_new.shape
    width = _width(channels)
    block_rows = _block_rows(rows, width)
    programs = rows // block_rows
    flags = _flags(branch, gamma, row_scale)
    kernel = functools.partial(_backward_kernel, **flags, row=_Row(channels, width), channels=channels)
    in_specs = [_row_spec(block_rows, channels)]
    in_specs += [_row_spec(block_rows, channels)] if branch is not None else []
    in_specs += [_channel_spec(channels)] if gamma is not None else []
    in_specs += [_vector_spec(block_rows)] if row_scale is not None else []
    in_specs += [_channel_spec(channels), _vector_spec(block_rows), _vector_spec(block_rows)]
    in_specs += [_row_spec(block_rows, channels), _row_spec(block_rows, channels)]
    partial = jax.ShapeDtypeStruct((programs, channels), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct((rows, channels), x_dtype)]
    out_specs = [_row_spec(block_rows, channels)]
    if branch is not None:
        out_shape.append(jax.ShapeDtypeStruct((rows, channels), branch.dtype))
        out_specs.append(_row_spec(block_rows, channels))
    if row_scale is not None:
        out_shape.append(jax.ShapeDtypeStruct((rows,), jnp.float32))
        out_specs.append(_vector_spec(block_rows))
    partial_count = (gamma is not None) + 2
    out_shape += [partial] * partial_count
    out_specs += [_partial_spec(channels)] * partial_count
    outs = _row_call(kernel, programs, in_specs, out_shape, out_specs, "add_layer_norm_bwd", interpret)(*arrays)
    per_row, partials = list(outs[: len(outs) - partial_count]), outs[len(outs) - partial_count :]
    return tuple(per_row) + tuple(jnp.sum(p, axis=0) for p in partials)


def _backward(x_new, branch, gamma, row_scale, scale, mean, rstd, d_x_new, d_normed, x_dtype, interpret):
    flags = _flags(branch, gamma, row_scale)
    arrays = [a for a in (x_new, branch, gamma, row_scale, scale, mean, rstd, d_x_new, d_normed) if a is not None]
    outs = list(_backward_call(*flags.values())(*arrays, *flags.values(), x_dtype, interpret))
    dx = outs.pop(0)
    d_branch = outs.pop(0) if branch is not None else None
    d_row_scale = outs.pop(0).astype(row_scale.dtype) if row_scale is not None else None
    d_gamma = outs.pop(0).astype(gamma.dtype) if gamma is not None else None
    d_scale, d_bias = outs
    return dx, d_branch, d_gamma, d_row_scale, d_scale, d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _fused(x, branch, gamma, row_scale, scale, bias, eps, out_dtype, x_dtype, interpret):
    return _fused_forward(x, branch, gamma, row_scale, scale, bias, eps, out_dtype, x_dtype, interpret)[0]


def _fused_forward(x, branch, gamma, row_scale, scale, bias, eps, out_dtype, x_dtype, interpret):
    x_new, normed, mean, rstd = _forward(x, branch, gamma, row_scale, scale, bias, eps, out_dtype, interpret)
    return (x_new, normed), (x_new, branch, gamma, row_scale, scale, bias, mean, rstd)


def _fused_backward(eps, out_dtype, x_dtype, interpret, residuals, cotangents):
    x_new, branch, gamma, row_scale, scale, bias, mean, rstd = residuals
    d_x_new, d_normed = cotangents
    dx, d_branch, d_gamma, d_row_scale, d_scale, d_bias = _backward(
        x_new, branch, gamma, row_scale, scale, mean, rstd, d_x_new, d_normed, x_dtype, interpret
    )
    return dx, d_branch, d_gamma, d_row_scale, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_fused.defvjp(_fused_forward, _fused_backward)


def add_layer_norm(
    x,
    branch=None,
    *,
    scale,
    bias,
    gamma=None,
    row_scale=None,
    eps: float = 1e-5,
    out_dtype=None,
    impl: str = "xla",
    interpret: bool | None = None,
):
    """``(x_new, normed)``: the residual update ``x_new = x + row_scale · gamma · branch`` (or x itself when
    ``branch`` is None) and its LayerNorm ``normed``, differentiable in every array argument.

    Args:
      x: (..., C) the residual stream; branch: (..., C) or None; leading axes are flattened into M rows.
      scale, bias: (C,) the LayerNorm's affine parameters; gamma: (C,) layer scale or None;
      row_scale: (M,) per-row factor (drop path) or None, over the flattened rows.
      eps: added to the variance. out_dtype: normed's dtype (default x's).
      impl: "xla" (plain JAX) or "pallas" (the fused kernels; "xla" when C > MAX_WIDTH).
      interpret: run the Pallas kernels in interpret mode; None: only off a GPU.

    Returns:
      x_new in the promoted dtype of (x, branch, gamma, row_scale) and normed in ``out_dtype``, both x's shape.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown add_layer_norm impl {impl!r}; valid: {', '.join(IMPLS)}")
    channels = x.shape[-1]
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"add_layer_norm: branch {tuple(branch.shape)} must have x's shape {tuple(x.shape)}")
    for name, a in (("scale", scale), ("bias", bias), ("gamma", gamma)):
        if a is not None and a.shape != (channels,):
            raise ValueError(f"add_layer_norm: {name} must have shape ({channels},), got {tuple(a.shape)}")
    rows = math.prod(x.shape[:-1])
    if row_scale is not None and row_scale.shape != (rows,):
        raise ValueError(f"add_layer_norm: row_scale must have shape ({rows},), got {tuple(row_scale.shape)}")
    if row_scale is not None and branch is None:
        raise ValueError("add_layer_norm: row_scale scales the branch, and there is none")
    out_dtype = out_dtype or x.dtype
    flat = [None if a is None else a.reshape(rows, channels) for a in (x, branch)]
    if impl == "xla" or _width(channels) > MAX_WIDTH:
        x_new, normed = add_layer_norm_reference(
            flat[0], flat[1], gamma, row_scale, scale, bias, eps=eps, out_dtype=out_dtype
        )
    else:
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        x_new, normed = _fused(
            *flat, gamma, row_scale, scale, bias, float(eps), jnp.dtype(out_dtype), x.dtype, bool(interpret)
        )
    return x_new.reshape(x.shape), normed.reshape(x.shape)
