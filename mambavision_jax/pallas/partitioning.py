"""Batch-parallel SPMD partitioning of the Pallas scan kernels.

XLA's SPMD partitioner cannot see inside a Pallas (Triton) custom call, so under ``jax.jit`` with a batch-sharded
input it replicates the call: every device gathers the whole global batch and scans all of it (N devices do N
times the work, plus the gathers). The scan is independent per batch row, so :func:`batch_parallel` declares it
with ``custom_partitioning``: each device runs the kernels on its own rows (the batch axis keeps the operands'
sharding, every other axis is gathered), and results that are sums over the batch are ``psum``-ed over the batch's
mesh axes. Programs on one device are unaffected (``custom_partitioning`` inlines the call there).

``custom_partitioning`` has no batching or differentiation rules, so the wrapped call also brings its own: under
``jax.vmap`` the mapped axis is folded into the batch axis (see :func:`_vmappable`), and differentiating it (the
Pallas ops' custom_vjp backward is itself never differentiated in first-order use) raises an error that says what
to use instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["BATCH_FACTOR", "batch_parallel"]

BATCH_FACTOR = "b"


def _mappings(side: str) -> list[list[str]]:
    return [part.split() for part in side.split(",")]


def batch_parallel(fn: Callable, rule: str, num_static: int, summed_results: Sequence[int] = ()) -> Callable:
    """Wraps ``fn(*arrays, *static) -> tuple of arrays`` (``num_static`` hashable trailing arguments) for
    batch-parallel partitioning.

    ``rule``: the Shardy rule, einsum-like (``"b l d, d n -> b l d, d n"``), one space-separated factor per axis;
    factor ``b`` is the batch axis (the first axis wherever it appears) and every other factor is replicated.
    ``summed_results``: indices of results (without ``b``) that are sums over the batch rows, psum-ed across the
    devices that hold the batch."""
    lhs, rhs = rule.split("->")
    operands, results = _mappings(lhs), _mappings(rhs)
    for axes in operands + results:
        if BATCH_FACTOR in axes[1:]:
            raise ValueError(f"batch_parallel: the batch factor must lead its array's axes; got rule {rule!r}")
    for i in summed_results:
        if BATCH_FACTOR in results[i]:
            raise ValueError(f"batch_parallel: summed result {i} of {rule!r} still has the batch axis")
    # Shardy wants the special factors in the order they first appear in the rule.
    factors = [f for f in dict.fromkeys(re.findall(r"[A-Za-z_]\w*", rule)) if f != BATCH_FACTOR]
    static_argnums = tuple(range(len(operands), len(operands) + num_static))
    wrapped = custom_partitioning(fn, static_argnums=static_argnums)

    def partition(*args):
        *static, mesh, arg_shapes, _ = args  # (static..., mesh, operand and result shapes)
        # None (an unsharded batch, or a sharding without axis names): every device computes it all, as XLA would.
        batch_axes = _batch_axes(arg_shapes[0].sharding, arg_shapes[0].shape[0])

        def sharding(axes):
            leading = batch_axes if axes and axes[0] == BATCH_FACTOR else None
            return NamedSharding(mesh, P(leading, *([None] * (len(axes) - 1))))

        def lower(*arrays):
            outs = list(fn(*arrays, *static))
            if batch_axes is not None:
                for i in summed_results:
                    outs[i] = jax.lax.psum(outs[i], batch_axes)
            return tuple(outs)

        return mesh, lower, tuple(sharding(a) for a in results), tuple(sharding(a) for a in operands)

    wrapped.def_partition(partition, sharding_rule=rule, need_replication_factors=tuple(factors))
    return _vmappable(wrapped, operands, results)


def _vmappable(wrapped: Callable, operands: list[list[str]], results: list[list[str]]) -> Callable:
    """``wrapped(*arrays, *static)`` with a ``jax.vmap`` rule and a differentiation error.

    Under vmap (arrays batched along a new leading axis of size V) the call runs once on V·batch rows: each operand
    with the batch factor is folded (V, batch, ...) -> (V·batch, ...), unbatched ones broadcast first, and each result
    unfolded. Where that would be wrong (a batched operand without the batch factor, e.g. a per-example weight, or a
    result without it, e.g. a sum over the batch rows) it runs once per mapped index instead (``lax.map``)."""
    has_batch = [axes[0] == BATCH_FACTOR for axes in operands]
    results_have_batch = all(axes[0] == BATCH_FACTOR for axes in results)

    def call(*args):
        arrays, static = args[: len(operands)], args[len(operands) :]

        @jax.custom_jvp
        def local(*arrays):
            return mapped(*arrays)

        @local.defjvp
        def _(primals, tangents):
            raise NotImplementedError(
                "mambavision_jax.pallas: a Pallas kernel call was differentiated. The Pallas ops have one reverse-mode "
                "derivative (jax.grad / jax.vjp); for forward-mode or higher-order derivatives use their pure-JAX "
                'impl (selective_scan: "sequential" or "associative"; add_layer_norm: "xla")'
            )

        @custom_vmap
        def mapped(*arrays):
            return wrapped(*arrays, *static)

        @mapped.def_vmap
        def _(size, batched, *arrays):
            if results_have_batch and all(b or not m for b, m in zip(has_batch, batched)):
                folded = (_fold(a, size, m) if b else a for a, b, m in zip(arrays, has_batch, batched))
                outs = mapped(*folded)
                return tuple(o.reshape(size, o.shape[0] // size, *o.shape[1:]) for o in outs), (True,) * len(outs)

            def one(xs):
                row = iter(xs)
                return mapped(*(next(row) if m else a for a, m in zip(arrays, batched)))

            outs = jax.lax.map(one, [a for a, m in zip(arrays, batched) if m])
            return outs, (True,) * len(outs)

        return local(*arrays)

    return call


def _fold(array, size: int, batched: bool):
    """(size, batch, ...) -> (size·batch, ...); an unbatched (batch, ...) array is broadcast to (size, batch, ...)
    first."""
    if not batched:
        array = jnp.broadcast_to(array, (size, *array.shape))
    return array.reshape(size * array.shape[1], *array.shape[2:])


def _batch_axes(sharding, batch: int):
    """The mesh axes sharding the batch (leading) axis, or None where there are none or they cannot be named."""
    if not isinstance(sharding, NamedSharding) or not sharding.spec:
        return None
    axes = sharding.spec[0]
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    return axes if size > 1 and batch % size == 0 else None
