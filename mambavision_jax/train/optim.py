"""Learning-rate schedule and optimizer (timm semantics of the official MambaVision recipe).

Schedule (timm ``CosineLRScheduler`` stepped per iteration, ``warmup_prefix=False``):
  * t < warmup_t:            lr = warmup_lr + t * (lr - warmup_lr) / warmup_t
  * warmup_t <= t < t_cos:   lr = min_lr + 0.5 (lr - min_lr) (1 + cos(pi t / t_cos))
  * t >= t_cos (cooldown):   lr = min_lr
with t_cos = epochs * steps_per_epoch and warmup_t = warmup_epochs * steps_per_epoch. The official train.py calls
``step_update(num_updates=step + 1)`` before each update, so the update that follows ``step`` updates runs at
t = step + 1 (the first at warmup_lr + (lr - warmup_lr) / warmup_t, not at warmup_lr). The run lasts
(epochs + cooldown_epochs) epochs unless ``config.total_steps`` caps it; ``total_steps`` never changes the
schedule itself, so a capped run follows exactly the same trajectory as the full run (used by resume tests).

Optimizer: clip by global norm (config.optimizer.clip_grad_norm), then LAMB or AdamW. Weight decay is skipped
for 1-D leaves (norm scales, biases, ...) and for any leaf named ``bias``, as timm's ``param_groups_weight_decay``
does. LAMB follows ``timm.optim.Lamb`` defaults: bias correction, its own global-norm clip at 1.0
(``lamb_max_grad_norm``) and the trust ratio applied only to the weight-decayed group (``always_adapt=False``).
Two global-norm clips in a row (timm's train.py clip, then Lamb's own) equal one clip at the smaller bound, so the
chain clips once.

Norms: the global-norm clip and LAMB's per-leaf trust ratios need a norm of every leaf, ~280 leaves for
MambaVision-T. Written leaf by leaf, each is a GPU kernel of its own (mostly launch latency); with two clips, the
trust ratio's two norms and the logged gradient norm that was ~1,400 small reductions and 2 ms of a 22 ms step
(H200, benchmarks/NOTES.md). :func:`leaf_squared_norms` computes all of a tree's norms in three kernels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

if TYPE_CHECKING:
    from mambavision_jax.train.packing import Packing

NORM_ROW = 2048  # elements per row in leaf_squared_norms (each leaf is zero-padded to whole rows)


def total_train_steps(config, steps_per_epoch: int) -> int:
    """Number of optimizer updates the run performs: ``config.total_steps`` if set (> 0), else the epochs'."""
    if config.get("total_steps") is not None:
        if int(config.total_steps) <= 0:
            raise ValueError(f"config.total_steps must be > 0 (or None: the epochs decide), got {config.total_steps}")
        return int(config.total_steps)
    o = config.optimizer
    return int((o.epochs + o.get("cooldown_epochs", 0)) * steps_per_epoch)


def check_schedule(o) -> None:
    """Raises ValueError naming the first schedule field of ``config.optimizer`` (``o``) out of range: epochs must be
    > 0 (timm asserts t_initial > 0), the other epoch counts and the learning rates >= 0."""
    if not float(o.epochs) > 0:
        raise ValueError(f"config.optimizer.epochs must be > 0 (the cosine's length in epochs), got {o.epochs}")
    for key in ("warmup_epochs", "cooldown_epochs", "lr", "warmup_lr", "min_lr"):
        if not float(o.get(key, 0.0)) >= 0:
            raise ValueError(f"config.optimizer.{key} must be >= 0, got {o[key]}")


def make_schedule(config, steps_per_epoch: int):
    """Returns ``step -> lr`` (jit-able, float32): the learning rate of the update that follows ``step`` updates,
    the timm schedule at t = step + 1 (see the module docstring)."""
    o = config.optimizer
    check_schedule(o)
    base_lr = float(o.lr)
    warmup_lr = float(o.get("warmup_lr", 0.0))
    min_lr = float(o.get("min_lr", 0.0))
    warmup_t = int(round(o.get("warmup_epochs", 0) * steps_per_epoch))
    t_cos = max(int(round(o.epochs * steps_per_epoch)), 1)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32) + 1.0
        cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * jnp.minimum(t, t_cos) / t_cos))
        cos = jnp.where(t >= t_cos, min_lr, cos)
        if warmup_t > 0:
            warm = warmup_lr + t * (base_lr - warmup_lr) / warmup_t
            return jnp.where(t < warmup_t, warm, cos)
        return cos

    return schedule


def takes_weight_decay(path: tuple, leaf) -> bool:
    """Whether weight decay applies to the leaf at ``path`` (flattened-dict key): ndim >= 2 and not named 'bias'."""
    return len(np.shape(leaf)) > 1 and path[-1] != "bias"


def weight_decay_mask(params) -> Any:
    """A tree of bools shaped like ``params``: :func:`takes_weight_decay` of each leaf."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: takes_weight_decay(k, v) for k, v in flat.items()})


def norm_rows(size: int) -> int:
    """Rows of ``NORM_ROW`` elements that hold ``size`` elements (at least one)."""
    return max(-(-int(size) // NORM_ROW), 1)


def as_norm_rows(leaf: jax.Array) -> jax.Array:
    """``leaf`` flattened, as float32, zero-padded to whole rows: (norm_rows(leaf.size), NORM_ROW)."""
    flat = jnp.ravel(leaf).astype(jnp.float32)
    n_rows = norm_rows(flat.size)
    return jnp.pad(flat, (0, n_rows * NORM_ROW - flat.size)).reshape(n_rows, NORM_ROW)


def leaf_squared_norms(leaves: Sequence[jax.Array], segments: Sequence[Optional[tuple[int, ...]]] = ()) -> jax.Array:
    """Sum of squares of each array in ``leaves``, as a float32 vector, in three kernels whatever the number of
    leaves: every leaf is flattened and zero-padded to whole rows of ``NORM_ROW`` elements and the rows are
    concatenated; one row reduction; then each leaf's row sums are added by a masked reduction over all rows.

    ``segments`` (optional, one entry a leaf): None for a whole leaf, or a tuple of row counts for a leaf of shape
    (rows, NORM_ROW) whose rows hold several parameters one after another (``packing``'s rows array); such a leaf
    gives one sum a segment. The result has one entry a whole leaf or segment, in order.

    Not a segment sum: its scatter-add, ~300 leaves receiving up to ~2,000 rows each, ran as compare-and-swap loops
    under contention on XLA:GPU (jaxlib 0.10.2 to at least 0.11.2: openxla/xla#46225), 36 of the 78 ms of
    MambaVision-B's recipe step on an H100 (43.5 ms with this reduction; benchmarks/NOTES.md, sessions 16-17). The
    masked reduction reads the row sums (a few hundred KB) once per leaf from the cache, and each leaf adds only its
    own rows and exact zeros.
    """
    if not leaves:
        return jnp.zeros((0,), jnp.float32)
    segments = list(segments) or [None] * len(leaves)
    rows, counts = [], []
    for leaf, segment in zip(leaves, segments, strict=True):
        if segment is not None:
            if leaf.shape != (sum(segment), NORM_ROW):
                raise ValueError(f"a leaf of {len(segment)} row segments must be ({sum(segment)}, {NORM_ROW}); "
                                 f"got {leaf.shape}")
            rows.append(leaf.astype(jnp.float32))
            counts.extend(segment)
            continue
        rows.append(as_norm_rows(leaf))
        counts.append(rows[-1].shape[0])
    # The concatenation stays a kernel of its own whatever XLA's fusion heuristics decide, as the three in B's recipe
    # profile run (0.46 ms each on an H100); a precaution: a fused ~300-operand concatenation was never observed.
    stacked = jax.lax.optimization_barrier(jnp.concatenate(rows))
    per_row = jnp.sum(stacked * stacked, axis=1)
    ends = np.cumsum(counts, dtype=np.int32)
    starts = ends - np.asarray(counts, np.int32)
    row = jax.lax.broadcasted_iota(jnp.int32, (len(counts), per_row.size), 1)
    owned = (row >= starts[:, None]) & (row < ends[:, None])  # (units, rows): row r belongs to leaf or segment i
    return jnp.sum(jnp.where(owned, per_row[None, :], 0.0), axis=1)


def global_norm(tree) -> jax.Array:
    """L2 norm of all of ``tree``'s leaves together (``optax.tree.norm``), float32, via :func:`leaf_squared_norms`."""
    return jnp.sqrt(jnp.sum(leaf_squared_norms(jax.tree.leaves(tree))))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``: updates scaled by ``max_norm / norm`` where their global norm exceeds
    ``max_norm``; the norm from :func:`global_norm`."""

    def update_fn(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_trust_ratio(mask, segments: Optional[dict] = None) -> optax.GradientTransformation:
    """LAMB's layer-wise trust ratio on the leaves where ``mask`` (a tree of Python bools shaped like the params)
    is True: each such update is scaled by ||param|| / ||update||, or 1 where either norm is 0
    (``optax.masked(optax.scale_by_trust_ratio(), mask)``, timm ``Lamb``); the other leaves pass unchanged.
    ``segments``: ``{flattened path: row counts}`` for leaves of several parameters on rows of ``NORM_ROW``
    (``packing.Packing.segments``), whose ratio is taken per segment. The norms come from two
    :func:`leaf_squared_norms` passes."""
    segments = segments or {}

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_trust_ratio needs the current params: call tx.update(grads, state, params).")
        keyed, treedef = jax.tree_util.tree_flatten_with_path(updates)
        leaves = [leaf for _, leaf in keyed]
        paths = [tuple(k.key for k in path) for path, _ in keyed]  # dict keys: the flattened-dict paths
        chosen = [i for i, m in enumerate(treedef.flatten_up_to(mask)) if m]
        chosen_segments = [segments.get(paths[i]) for i in chosen]
        param_leaves = treedef.flatten_up_to(params)
        param_norm = jnp.sqrt(leaf_squared_norms([param_leaves[i] for i in chosen], chosen_segments))
        update_norm = jnp.sqrt(leaf_squared_norms([leaves[i] for i in chosen], chosen_segments))
        ratio = jnp.where((param_norm > 0) & (update_norm > 0), param_norm / update_norm, 1.0)
        unit = 0
        for i, segment in zip(chosen, chosen_segments):
            if segment is None:
                leaves[i] = (leaves[i] * ratio[unit]).astype(leaves[i].dtype)
                unit += 1
            else:  # one ratio a row, from the row's segment
                owner = np.repeat(np.arange(unit, unit + len(segment)), segment)
                leaves[i] = (leaves[i] * ratio[owner][:, None]).astype(leaves[i].dtype)
                unit += len(segment)
        return treedef.unflatten(leaves), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _is_packed(params) -> bool:
    from mambavision_jax.train.packing import ROWS  # packing imports this module

    return ROWS in params


def make_optimizer(
    config, steps_per_epoch: int, params_shape, packing: Optional[Packing] = None
) -> tuple[optax.GradientTransformation, Any]:
    """Returns (tx, schedule) for the model's params tree ``params_shape`` (may be abstract, ShapeDtypeStruct
    leaves), or, with a ``packing``, for its training layout (``packing.pack(params)``)."""
    segments = None
    if packing is not None:
        params_shape, segments = packing.abstract(params_shape), packing.segments
    elif isinstance(params_shape, dict) and _is_packed(params_shape):
        raise ValueError("make_optimizer takes the model's params tree and the packing (packing=...), not a packed "
                         "layout: LAMB's trust ratio needs the packing's row segments.")
    o = config.optimizer
    schedule = make_schedule(config, steps_per_epoch)
    mask = weight_decay_mask(params_shape)
    b1, b2 = (float(b) for b in o.betas)
    name = o.name.lower()
    clips = [float(o.clip_grad_norm)] if o.get("clip_grad_norm") else []
    if name == "lamb" and o.get("lamb_max_grad_norm"):
        clips.append(float(o.lamb_max_grad_norm))
    parts = [clip_by_global_norm(min(clips))] if clips else []
    if name == "lamb":
        parts += [
            optax.scale_by_adam(b1=b1, b2=b2, eps=float(o.eps)),
            optax.add_decayed_weights(float(o.weight_decay), mask=mask),
            # timm's Lamb adapts only where the group's weight_decay != 0: with none, no leaf at all
            scale_by_trust_ratio(mask if float(o.weight_decay) else jax.tree.map(lambda _: False, mask), segments),
            optax.scale_by_learning_rate(schedule),
        ]
    elif name == "adamw":
        parts.append(
            optax.adamw(schedule, b1=b1, b2=b2, eps=float(o.eps), weight_decay=float(o.weight_decay), mask=mask)
        )
    elif name in ("sgd", "momentum"):
        parts += [
            optax.add_decayed_weights(float(o.weight_decay), mask=mask),
            optax.sgd(schedule, momentum=float(o.get("momentum", 0.9)), nesterov=name == "sgd"),
        ]
    else:
        raise ValueError(f"Unknown optimizer {o.name!r} (expected 'lamb', 'adamw', 'sgd' or 'momentum').")
    return optax.chain(*parts), schedule
