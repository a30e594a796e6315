"""Batch-parallel SPMD partitioning of the Pallas scan kernels.

XLA's SPMD partitioner cannot see inside a Pallas (Triton) custom call, so under ``jax.jit`` with a batch-sharded
input it replicates the call: every device gathers the whole global batch and scans all of it (N devices do N
times the work, plus the gathers). The scan is independent per batch row, so :func:`batch_parallel` declares it
with ``custom_partitioning``: each device runs the kernels on its own rows (the batch axis keeps the operands'
sharding, every other axis is gathered), and results that are sums over the batch are ``psum``-ed over the batch's
mesh axes. Programs on one device are unaffected (``custom_partitioning`` inlines the call there).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
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
    return wrapped


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
