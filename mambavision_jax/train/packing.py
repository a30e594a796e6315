"""The parameters' training layout: every leaf that takes no weight decay packed into one float32 vector.

    {"dense": <the params tree without the packed leaves>, "packed": (n,) float32}

The training loop uses it unless ``config.pack_params`` is False.

The packed leaves are exactly those :func:`mambavision_jax.train.optim.takes_weight_decay` rejects: 1-D leaves
(norm scales, biases, the mixers' ``D``) and any leaf named ``bias``, in the order of
``flax.traverse_util.flatten_dict`` (sorted paths), each flattened in row-major order.

Why: the optimizer update and the EMA update run leaf by leaf, and XLA gives each small leaf a GPU kernel of its own,
most of it launch latency. MambaVision-B has 311 parameter leaves; 193 of them (147,048 elements) are packed. On an
H100 80GB HBM3 (one process, bf16 AdamW step at batch 128) B's step took 39.14 ms packed against 39.70 leaf by leaf
and T's 19.08 against 19.47, and both compiled in ~30 s instead of ~43 (``benchmarks/NOTES.md``, session 21).

The update is the same as leaf by leaf: everything the optimizers apply to these leaves works per element (Adam's
moments, the learning rate, SGD's momentum, EMA) or over all leaves together (the global-norm clip), and the two
per-leaf transforms of the recipes, weight decay and LAMB's trust ratio, skip exactly these leaves
(``optim.weight_decay_mask`` of the packed layout is False for the vector, which is 1-D).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mambavision_jax.train.optim import takes_weight_decay

DENSE, PACKED = "dense", "packed"


@dataclasses.dataclass(frozen=True)
class Packing:
    """Which leaves are packed (``paths``, flattened-dict keys) and their shapes; hashable, so it can be a static
    field of the train state. :meth:`of` chooses them; :meth:`pack` and :meth:`unpack` convert."""

    paths: tuple[tuple[str, ...], ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params) -> Packing:
        """The packing of a params tree (arrays or ShapeDtypeStructs): its leaves that take no weight decay."""
        flat = traverse_util.flatten_dict(params)
        chosen = sorted(k for k, v in flat.items() if not takes_weight_decay(k, v))
        return cls(tuple(chosen), tuple(tuple(int(d) for d in np.shape(flat[k])) for k in chosen))

    @property
    def size(self) -> int:
        """Elements in the packed vector."""
        return int(sum(np.prod(s, dtype=np.int64) for s in self.shapes))

    def pack(self, params) -> dict:
        """The model's params tree -> ``{"dense": tree, "packed": (size,) float32}``."""
        flat = traverse_util.flatten_dict(params)
        missing = [k for k in self.paths if k not in flat]
        if missing:
            raise ValueError(f"params have none of the packed leaves {['/'.join(k) for k in missing[:5]]} ...")
        wrong = [(k, np.shape(flat[k]), s) for k, s in zip(self.paths, self.shapes) if np.shape(flat[k]) != s]
        if wrong:
            k, got, want = wrong[0]
            raise ValueError(f"packed leaf {'/'.join(k)} has shape {got}, the packing expects {want}")
        pieces = [jnp.ravel(flat[k]).astype(jnp.float32) for k in self.paths]
        vector = jnp.concatenate(pieces) if pieces else jnp.zeros((0,), jnp.float32)
        packed = set(self.paths)
        dense = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in packed})
        return {DENSE: dense, PACKED: vector}

    def unpack(self, packed: dict) -> Any:
        """``{"dense": tree, "packed": vector}`` -> the model's params tree (packed leaves as float32 views)."""
        if set(packed) != {DENSE, PACKED}:
            raise ValueError(f"expected a packed params dict with keys {DENSE!r} and {PACKED!r}; got {sorted(packed)}")
        vector = packed[PACKED]
        if vector.shape != (self.size,):
            raise ValueError(f"packed vector has shape {vector.shape}, the packing expects ({self.size},)")
        flat = traverse_util.flatten_dict(packed[DENSE])
        ends = np.cumsum([np.prod(s, dtype=np.int64) for s in self.shapes])
        # jnp.split, not slices: its transpose is one concatenation of the leaves' gradients, not a sum of pads.
        for k, shape, piece in zip(self.paths, self.shapes, jnp.split(vector, ends[:-1])):
            flat[k] = piece.reshape(shape)
        return traverse_util.unflatten_dict(flat)

    def abstract(self, params_shape) -> dict:
        """:meth:`pack` of an abstract params tree (ShapeDtypeStruct leaves), without computing anything."""
        return jax.eval_shape(self.pack, params_shape)
