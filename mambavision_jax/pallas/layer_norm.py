"""LayerNorm over the last axis with the residual add in front of it, as single-pass Pallas-Triton row kernels.

    x_new  = x + row_scale · gamma · branch      (the residual update; each factor optional)
    normed = (x_new - mean) · rstd · scale + bias (statistics over the last axis, float32)

XLA runs the residual add, the LayerNorm's statistics and its normalisation, and in the backward the LayerNorm
gradient, the residual gradient and the layer-scale gradient as several passes over the (tokens, channels) stream
(B's stage-3 LayerNorms and residual updates: ~3.4 ms of a 37 ms training step on an H200, ``benchmarks/NOTES.md``
session 14). Here one kernel reads x and branch once and writes x_new, normed and the per-row statistics; one
backward kernel reads x_new, branch and both cotangents once and writes the two input gradients, with per-program
column sums for the gamma, scale and bias gradients. Rows are processed up to 16 at a time and columns in
power-of-two chunks of up to 1024 (any channel count whose largest power-of-two divisor is >= 16); a row held in
one chunk is loaded once.

Layouts: x, branch (M, C) row-major (tokens, channels); gamma, scale, bias (C,); row_scale (M,) (drop path's
per-sample keep/keep_prob, repeated over that sample's rows). ``impl="xla"`` is the same math in plain JAX.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mambavision_jax.pallas.partitioning import batch_parallel
from mambavision_jax.pallas.tiles import largest_tile

IMPLS = ("xla", "pallas")
MAX_BLOCK_ROWS = 16
MAX_CHUNK = 1024  # a whole row of B's stage-4 width in one chunk
BLOCK_ELEMENTS = 8192  # rows × chunk a program holds at once (f32: 64 values a thread for 4 warps)


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


def _chunk(channels: int) -> int | None:
    """Columns a chunk: the largest power of two from 16 to MAX_CHUNK dividing ``channels`` (None if none)."""
    return largest_tile(channels, MAX_CHUNK, smallest=16)


def _block_rows(rows: int, chunk: int) -> int:
    """Rows a program: the largest power of two dividing ``rows`` with at most BLOCK_ELEMENTS values a block."""
    return largest_tile(rows, min(MAX_BLOCK_ROWS, BLOCK_ELEMENTS // chunk))


def _loop(n, body, init):
    """``fori_loop(0, n, body, init)``, or for one chunk ``body(0, init)`` with a Python index, so that the
    kernels' chunk loads can be cached (:func:`_cached`) and a row held in one chunk is loaded once."""
    return body(0, init) if n == 1 else jax.lax.fori_loop(0, n, body, init)


def _cached(load):
    """``load(i)``, remembered for Python-int ``i`` (one chunk: every pass reuses the first load)."""
    memo = {}

    def get(i):
        if not isinstance(i, int):
            return load(i)
        if i not in memo:
            memo[i] = load(i)
        return memo[i]

    return get


def _forward_kernel(*refs, has_branch, has_gamma, has_row_scale, chunk, n_chunks, channels, eps):
    refs = list(refs)
    x_ref = refs.pop(0)
    branch_ref = refs.pop(0) if has_branch else None
    gamma_ref = refs.pop(0) if has_gamma else None
    row_scale_ref = refs.pop(0) if has_row_scale else None
    scale_ref, bias_ref = refs[:2]
    x_new_ref = refs[2] if has_branch else None
    normed_ref, mean_ref, rstd_ref = refs[-3:]
    row_scale = row_scale_ref[...].astype(jnp.float32)[:, None] if has_row_scale else None

    @_cached
    def stream(i):
        cols = pl.ds(i * chunk, chunk)
        value = x_ref[:, cols].astype(jnp.float32)
        if has_branch:
            update = branch_ref[:, cols].astype(jnp.float32)
            if has_gamma:
                update = update * gamma_ref[cols].astype(jnp.float32)[None, :]
            if has_row_scale:
                update = update * row_scale
            value = value + update
        return value

    rows = x_ref.shape[0]
    total = _loop(n_chunks, lambda i, acc: acc + jnp.sum(stream(i), axis=1), jnp.zeros((rows,), jnp.float32))
    mean = total / channels

    def square_sum(i, acc):
        d = stream(i) - mean[:, None]
        return acc + jnp.sum(d * d, axis=1)

    rstd = jax.lax.rsqrt(_loop(n_chunks, square_sum, jnp.zeros((rows,), jnp.float32)) / channels + eps)

    def write(i, carry):
        cols = pl.ds(i * chunk, chunk)
        value = stream(i)
        if has_branch:
            x_new_ref[:, cols] = value.astype(x_new_ref.dtype)
        scale = scale_ref[cols].astype(jnp.float32)[None, :]
        shift = bias_ref[cols].astype(jnp.float32)[None, :]
        normed_ref[:, cols] = ((value - mean[:, None]) * rstd[:, None] * scale + shift).astype(normed_ref.dtype)
        return carry

    _loop(n_chunks, write, 0)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _backward_kernel(*refs, has_branch, has_gamma, has_row_scale, chunk, n_chunks, channels):
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
    mean = mean_ref[...][:, None]
    rstd = rstd_ref[...][:, None]
    row_scale = row_scale_ref[...].astype(jnp.float32)[:, None] if has_row_scale else None

    @_cached
    def chunk_values(i):
        """(d_normed, x_hat, g = d_normed · scale) of column chunk i, float32."""
        cols = pl.ds(i * chunk, chunk)
        d_normed = d_normed_ref[:, cols].astype(jnp.float32)
        x_hat = (x_new_ref[:, cols].astype(jnp.float32) - mean) * rstd
        return d_normed, x_hat, d_normed * scale_ref[cols].astype(jnp.float32)[None, :]

    def sums(i, acc):
        _, x_hat, g = chunk_values(i)
        return acc[0] + jnp.sum(g, axis=1), acc[1] + jnp.sum(g * x_hat, axis=1)

    rows = x_new_ref.shape[0]
    zeros = jnp.zeros((rows,), jnp.float32)
    g_sum, gx_sum = _loop(n_chunks, sums, (zeros, zeros))
    g_mean, gx_mean = g_sum[:, None] / channels, gx_sum[:, None] / channels

    def write(i, d_row_scale):
        cols = pl.ds(i * chunk, chunk)
        d_normed, x_hat, g = chunk_values(i)
        d_total = d_x_new_ref[:, cols].astype(jnp.float32) + rstd * (g - g_mean - x_hat * gx_mean)
        dx_ref[:, cols] = d_total.astype(dx_ref.dtype)
        d_scale_ref[:, cols] = jnp.sum(d_normed * x_hat, axis=0, keepdims=True)
        d_bias_ref[:, cols] = jnp.sum(d_normed, axis=0, keepdims=True)
        if has_branch:
            branch = branch_ref[:, cols].astype(jnp.float32)
            d_update = d_total * row_scale if has_row_scale else d_total
            gamma = gamma_ref[cols].astype(jnp.float32)[None, :] if has_gamma else None
            d_branch_ref[:, cols] = (d_update * gamma if has_gamma else d_update).astype(d_branch_ref.dtype)
            if has_gamma:
                d_gamma_ref[:, cols] = jnp.sum(d_update * branch, axis=0, keepdims=True)
            if has_row_scale:
                scaled = branch * gamma if has_gamma else branch
                d_row_scale = d_row_scale + jnp.sum(d_total * scaled, axis=1)
        return d_row_scale

    d_row_scale = _loop(n_chunks, write, zeros)
    if has_row_scale:
        d_row_scale_ref[...] = d_row_scale


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
    chunk = _chunk(channels)
    block_rows = _block_rows(rows, chunk)
    flags = _flags(branch, gamma, row_scale)
    kernel = functools.partial(
        _forward_kernel, **flags, chunk=chunk, n_chunks=channels // chunk, channels=channels, eps=eps
    )
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
    chunk = _chunk(channels)
    block_rows = _block_rows(rows, chunk)
    programs = rows // block_rows
    flags = _flags(branch, gamma, row_scale)
    kernel = functools.partial(_backward_kernel, **flags, chunk=chunk, n_chunks=channels // chunk, channels=channels)
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
      impl: "xla" (plain JAX) or "pallas" (the fused kernels; "xla" when C has no power-of-two divisor >= 16).
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
    if impl == "xla" or _chunk(channels) is None:
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
