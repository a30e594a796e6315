"""Learning-rate schedule and optimizer (timm semantics of the official MambaVision recipe).

Schedule (timm ``CosineLRScheduler`` stepped per iteration, ``warmup_prefix=False``):
  * t < warmup_t:            lr = warmup_lr + t * (lr - warmup_lr) / warmup_t
  * warmup_t <= t < t_cos:   lr = min_lr + 0.5 (lr - min_lr) (1 + cos(pi t / t_cos))
  * t >= t_cos (cooldown):   lr = min_lr
with t_cos = epochs * steps_per_epoch and warmup_t = warmup_epochs * steps_per_epoch. The run lasts
(epochs + cooldown_epochs) epochs unless ``config.total_steps`` caps it; ``total_steps`` never changes the
schedule itself, so a capped run follows exactly the same trajectory as the full run (used by resume tests).

Optimizer: clip by global norm (config.optimizer.clip_grad_norm), then LAMB or AdamW. Weight decay is skipped
for 1-D leaves (norm scales, biases, ...) and for any leaf named ``bias``, as timm's ``param_groups_weight_decay``
does. LAMB follows ``timm.optim.Lamb`` defaults: bias correction, its own global-norm clip at 1.0
(``lamb_max_grad_norm``) and the trust ratio applied only to the weight-decayed group (``always_adapt=False``).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import optax
from flax import traverse_util


def total_train_steps(config, steps_per_epoch: int) -> int:
    """Number of optimizer updates the run performs."""
    if config.get("total_steps"):
        return int(config.total_steps)
    o = config.optimizer
    return int((o.epochs + o.get("cooldown_epochs", 0)) * steps_per_epoch)


def make_schedule(config, steps_per_epoch: int):
    """Returns ``step -> lr`` (jit-able, float32)."""
    o = config.optimizer
    base_lr = float(o.lr)
    warmup_lr = float(o.get("warmup_lr", 0.0))
    min_lr = float(o.get("min_lr", 0.0))
    warmup_t = int(round(o.get("warmup_epochs", 0) * steps_per_epoch))
    t_cos = max(int(round(o.epochs * steps_per_epoch)), 1)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * jnp.minimum(t, t_cos) / t_cos))
        cos = jnp.where(t >= t_cos, min_lr, cos)
        if warmup_t > 0:
            warm = warmup_lr + t * (base_lr - warmup_lr) / warmup_t
            return jnp.where(t < warmup_t, warm, cos)
        return cos

    return schedule


def weight_decay_mask(params) -> Any:
    """True where weight decay applies: leaves with ndim >= 2 that are not named 'bias'."""
    flat = traverse_util.flatten_dict(params)
    mask = {k: (jnp.ndim(v) > 1 and k[-1] != "bias") for k, v in flat.items()}
    return traverse_util.unflatten_dict(mask)


def make_optimizer(config, steps_per_epoch: int, params_shape) -> tuple[optax.GradientTransformation, Any]:
    """Returns (tx, schedule). ``params_shape`` may be abstract (ShapeDtypeStruct leaves)."""
    o = config.optimizer
    schedule = make_schedule(config, steps_per_epoch)
    mask = weight_decay_mask(params_shape)
    b1, b2 = (float(b) for b in o.betas)
    parts = []
    if o.get("clip_grad_norm"):
        parts.append(optax.clip_by_global_norm(float(o.clip_grad_norm)))
    name = o.name.lower()
    if name == "lamb":
        if o.get("lamb_max_grad_norm"):
            parts.append(optax.clip_by_global_norm(float(o.lamb_max_grad_norm)))
        parts += [
            optax.scale_by_adam(b1=b1, b2=b2, eps=float(o.eps)),
            optax.add_decayed_weights(float(o.weight_decay), mask=mask),
            optax.masked(optax.scale_by_trust_ratio(), mask),
            optax.scale_by_learning_rate(schedule),
        ]
    elif name == "adamw":
        parts.append(
            optax.adamw(schedule, b1=b1, b2=b2, eps=float(o.eps), weight_decay=float(o.weight_decay), mask=mask)
        )
    elif name in ("sgd", "momentum"):
        parts += [
            optax.add_decayed_weights(float(o.weight_decay), mask=mask),
            optax.sgd(schedule, momentum=float(o.get("momentum", 0.9)), nesterov=True),
        ]
    else:
        raise ValueError(f"Unknown optimizer {o.name!r} (expected 'lamb', 'adamw' or 'sgd').")
    return optax.chain(*parts), schedule
