"""The parameters' training layout: the small and the weight-decay-free leaves packed into two arrays.

    {"dense": <the params tree without the packed leaves>,
     "packed": (n,) float32,               # every leaf that takes no weight decay
     "packed_rows": (rows, NORM_ROW) float32}  # every other leaf under SMALL_LEAF elements, each on whole rows

The training loop uses it unless ``config.pack_params`` is False.

``packed`` holds exactly the leaves :func:`mambavision_jax.train.optim.takes_weight_decay` rejects: 1-D leaves (norm
scales, biases, the mixers' ``D``) and any leaf named ``bias``. ``packed_rows`` holds the weight-decayed leaves under
``SMALL_LEAF`` elements (the mixers' ``A_log``, ``x_proj``, ``dt_proj`` and conv1d kernels, the stem's first conv),
each flattened, zero-padded to whole rows of ``optim.NORM_ROW`` elements, and its rows stacked. Both keep the order
of ``flax.traverse_util.flatten_dict`` (sorted paths), each leaf in row-major order.

Why: the optimizer update and the EMA update run leaf by leaf, and XLA gives each small leaf a GPU kernel of its own,
most of it launch latency. MambaVision-B has 311 parameter leaves: 193 of them (147,048 elements) go into ``packed``
and 41 (364,736) into ``packed_rows``. On an H100 80GB HBM3 (one process, bf16 AdamW step at batch 128) B's step
took 39.14 ms with ``packed`` alone against 39.70 leaf by leaf, and T's 19.08 against 19.47 (session 21);
``packed_rows`` then took B from 39.53 to 39.35 ms and T from 19.44 to 19.32 on another H100 (session 23,
``benchmarks/NOTES.md``).

The update is the same as leaf by leaf. Everything the optimizers apply works per element (Adam's moments, weight
decay, the learning rate, SGD's momentum, EMA) or over all leaves together (the global-norm clip), and the zero
padding stays zero under all of it. The one per-leaf transform, LAMB's trust ratio, skips ``packed`` (1-D, like the
leaves in it) and is taken per leaf on ``packed_rows``: :attr:`Packing.segments` tells the optimizer which rows
belong to which leaf (``optim.make_optimizer(..., packing=)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mambavision_jax.train.optim import NORM_ROW, as_norm_rows, norm_rows, takes_weight_decay

DENSE, PACKED, ROWS = "dense", "packed", "packed_rows"
SMALL_LEAF = 65_536  # weight-decayed leaves under this many elements go into ROWS; larger ones stay dense


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Packing:
    """Which leaves are packed (flattened-dict keys) and their shapes: ``paths``/``shapes`` into the vector,
    ``row_paths``/``row_shapes`` into the rows. Hashable, so it can be a static field of the train state. :meth:`of`
    chooses them; :meth:`pack` and :meth:`unpack` convert."""

    paths: tuple[tuple[str, ...], ...]
    shapes: tuple[tuple[int, ...], ...]
    row_paths: tuple[tuple[str, ...], ...] = ()
    row_shapes: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, params) -> Packing:
        """The packing of a params tree (arrays or ShapeDtypeStructs): into the vector its leaves that take no weight
        decay, into the rows the other leaves under ``SMALL_LEAF`` elements."""
        flat = traverse_util.flatten_dict(params)
        free = sorted(k for k, v in flat.items() if not takes_weight_decay(k, v))
        small = sorted(k for k, v in flat.items() if takes_weight_decay(k, v) and _size(np.shape(v)) < SMALL_LEAF)
        shapes = lambda keys: tuple(tuple(int(d) for d in np.shape(flat[k])) for k in keys)  # noqa: E731
        return cls(tuple(free), shapes(free), tuple(small), shapes(small))

    @property
    def size(self) -> int:
        """Elements in the packed vector."""
        return sum(_size(s) for s in self.shapes)

    @property
    def row_counts(self) -> tuple[int, ...]:
        """Rows each leaf of ``row_paths`` takes in the rows array, in order."""
        return tuple(norm_rows(_size(s)) for s in self.row_shapes)

    @property
    def segments(self) -> dict:
        """``{flattened path of the rows array: row_counts}``: the packed leaves that hold several parameters, for
        the optimizer's per-parameter transforms (``optim.make_optimizer(..., packing=)``)."""
        return {(ROWS,): self.row_counts}

    def pack(self, params) -> dict:
        """The model's params tree -> ``{"dense": tree, "packed": (size,), "packed_rows": (rows, NORM_ROW)}``,
        packed arrays float32."""
        flat = traverse_util.flatten_dict(params)
        paths, shapes = self.paths + self.row_paths, self.shapes + self.row_shapes
        missing = [k for k in paths if k not in flat]
        if missing:
            raise ValueError(f"params have none of the packed leaves {['/'.join(k) for k in missing[:5]]} ...")
        wrong = [(k, np.shape(flat[k]), s) for k, s in zip(paths, shapes) if np.shape(flat[k]) != s]
        if wrong:
            k, got, want = wrong[0]
            raise ValueError(f"packed leaf {'/'.join(k)} has shape {got}, the packing expects {want}")
        pieces = [jnp.ravel(flat[k]).astype(jnp.float32) for k in self.paths]
        vector = jnp.concatenate(pieces) if pieces else jnp.zeros((0,), jnp.float32)
        rows = [as_norm_rows(flat[k]) for k in self.row_paths]
        packed = set(paths)
        dense = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in packed})
        return {
            DENSE: dense,
            PACKED: vector,
            ROWS: jnp.concatenate(rows) if rows else jnp.zeros((0, NORM_ROW), jnp.float32),
        }

    def unpack(self, packed: dict) -> Any:
        """The training layout (see :meth:`pack`) -> the model's params tree (packed leaves as float32 views)."""
        if set(packed) != {DENSE, PACKED, ROWS}:
            raise ValueError(
                f"expected a packed params dict with keys {DENSE!r}, {PACKED!r} and {ROWS!r}; got {sorted(packed)}"
            )
        vector, rows = packed[PACKED], packed[ROWS]
        if vector.shape != (self.size,):
            raise ValueError(f"packed vector has shape {vector.shape}, the packing expects ({self.size},)")
        if rows.shape != (sum(self.row_counts), NORM_ROW):
            raise ValueError(
                f"packed rows have shape {rows.shape}, the packing expects ({sum(self.row_counts)}, {NORM_ROW})"
            )
        flat = traverse_util.flatten_dict(packed[DENSE])
        # jnp.split, not slices: its transpose is one concatenation of the leaves' gradients, not a sum of pads.
        ends = np.cumsum([_size(s) for s in self.shapes])
        for k, shape, piece in zip(self.paths, self.shapes, jnp.split(vector, ends[:-1])):
            flat[k] = piece.reshape(shape)
        row_ends = np.cumsum(self.row_counts)
        for k, shape, piece in zip(self.row_paths, self.row_shapes, jnp.split(rows, row_ends[:-1])):
            flat[k] = piece.reshape(-1)[: _size(shape)].reshape(shape)
        return traverse_util.unflatten_dict(flat)

    def abstract(self, params_shape) -> dict:
        """:meth:`pack` of an abstract params tree (ShapeDtypeStruct leaves), without computing anything."""
        return jax.eval_shape(self.pack, params_shape)
