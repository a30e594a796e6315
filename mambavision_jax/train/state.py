"""Train state: a plain pytree (flax.struct dataclass), created directly sharded with ``jax.jit(out_shardings=)``.

Parameters, their EMA and the optimizer state are held in the training layout of :mod:`.packing` when the state has
a ``packing`` (what the training loop builds); :meth:`TrainState.variables` gives the model's variables."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mambavision_jax.train import sharding as sharding_lib
from mambavision_jax.train.packing import Packing


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied (= batches consumed)
    params: Any  # float32 master weights, in the training layout
    batch_stats: Any
    opt_state: Any
    ema_params: Any = None  # None when EMA is off; training layout
    ema_batch_stats: Any = None
    packing: Packing | None = flax.struct.field(pytree_node=False, default=None)  # None: the model's own layout

    def model_params(self, params) -> Any:
        """Params in the training layout (``self.params``, ``self.ema_params``, their gradients) -> the model's tree."""
        return params if self.packing is None else self.packing.unpack(params)

    def variables(self, ema: bool = False) -> dict:
        """The model's variables (``{"params", "batch_stats"}``), of the EMA copy with ``ema``."""
        if ema:
            return {"params": self.model_params(self.ema_params), "batch_stats": self.ema_batch_stats}
        return {"params": self.model_params(self.params), "batch_stats": self.batch_stats}


@functools.partial(jax.jit, static_argnames="ema")
def compiled_variables(state: TrainState, ema: bool = False) -> dict:
    """``state.variables(ema=ema)`` computed by one compiled program, for use outside a jitted step.

    Unpacked eagerly, the training layout costs a few hundred small programs dispatched without waiting. In a
    multi-process CPU run each one on sharded arrays is a collective, and on a host with as many cores as local
    devices XLA:CPU's launch threads can all block (a launch waiting for a device's in-flight slots while the other
    thread waits in a collective for that launch): the run hangs. One program also compiles once per run."""
    return state.variables(ema=ema)


def _as_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_state_fn(tx: optax.GradientTransformation, use_ema: bool, packing: Packing | None = None):
    """Returns ``state_fn(variables) -> TrainState`` (step 0, fresh optimizer state). With a ``packing``, ``tx`` must
    have been built for the packed layout (``optim.make_optimizer(..., packing)``)."""

    def state_fn(variables):
        params = _as_f32(variables["params"])
        if packing is not None:
            params = packing.pack(params)
        batch_stats = variables.get("batch_stats", {})
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            ema_params=params if use_ema else None,
            ema_batch_stats=batch_stats if use_ema else None,
            packing=packing,
        )

    return state_fn


def make_init_fn(
    model, tx: optax.GradientTransformation, image_size: int, use_ema: bool, packing: Packing | None = None
):
    """Returns ``init(rng) -> TrainState`` with freshly initialised model variables (see :func:`make_state_fn`)."""
    state_fn = make_state_fn(tx, use_ema, packing)

    def init(rng):
        return state_fn(model.init({"params": rng}, jnp.zeros((1, image_size, image_size, 3), jnp.float32)))

    return init


def create_train_state(init_fn, rng, mesh, strategy: str = "data", fsdp_min_size: int = 2**14):
    """Creates the state directly with its final sharding; returns (state, state_shardings)."""
    abstract = jax.eval_shape(init_fn, rng)
    shardings = sharding_lib.state_shardings(abstract, mesh, strategy, fsdp_min_size)
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
    return state, shardings


def abstract_state(init_fn, rng, shardings):
    """ShapeDtypeStructs with shardings (restore targets) without allocating the state."""
    abstract = jax.eval_shape(init_fn, rng)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def state_from_variables(state_fn, variables, shardings):
    """Builds a step-0 state from given (e.g. pretrained) variables, placed with ``shardings``."""
    return jax.jit(state_fn, out_shardings=shardings)(variables)
