"""Jitted train and eval steps.

Mixed precision: the state holds float32 master weights; the model is built with ``dtype=<compute dtype>`` so
activations/matmuls run in that dtype (bfloat16 on GPU by default); logits are cast to float32 before the loss;
gradients and optimizer/EMA updates are float32. No loss scaling is needed for bfloat16.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from mambavision_jax import xla_options
from mambavision_jax.data.config_utils import grad_accum_steps, preprocess_settings
from mambavision_jax.data.device_preprocess import batch_images, erase_images
from mambavision_jax.train import optim
from mambavision_jax.train import sharding as sharding_lib
from mambavision_jax.train.state import TrainState

MESA_TEMPERATURE = 3.0
MESA_SCALE = 50.0


def soft_target_cross_entropy(logits, targets):
    """Mean over the batch of -sum(targets * log_softmax(logits)) (timm SoftTargetCrossEntropy)."""
    return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def mesa_kl(student_logits, teacher_logits, temperature: float = MESA_TEMPERATURE):
    """KL(softmax(teacher/T) || softmax(student/T)), 'batchmean' (PyTorch F.kl_div(log_softmax(s/T), softmax(t/T)))."""
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    p_t = jnp.exp(log_p_t)
    return jnp.sum(p_t * (log_p_t - log_p_s)) / student_logits.shape[0]


def mesa_active(step: int, config, steps_per_epoch: int) -> bool:
    """Whether the update after ``step`` updates distils from the EMA teacher: config.mesa > 0 and, the official
    rule, epoch / epochs > mesa_start_ratio with epoch the integer epoch index of this update."""
    if float(config.get("mesa", 0.0) or 0.0) <= 0:
        return False
    epoch = int(step) // steps_per_epoch
    return epoch / float(config.optimizer.epochs) > float(config.get("mesa_start_ratio", 0.25))


def model_inputs(batch: dict, mix_rng, erase_rng, targets_fn: Callable, preprocess, erase_mode: str):
    """``(images, targets)`` for a train batch in the official loader's order: mixup/cutmix first (timm's collate
    mixes the uint8 batch), then random erasing on the mixed images (timm's prefetcher), so an erased rectangle holds
    the fill alone. ``images`` float32 (B, H, W, 3) normalised with ``preprocess``'s mean and std; ``targets``
    (B, classes) soft labels. Mixing after normalising equals normalising after mixing (the normalisation is affine
    per channel)."""
    images = batch_images({k: v for k, v in batch.items() if k != "erase"}, preprocess.mean, preprocess.std)
    images, targets = targets_fn(mix_rng, images, batch["label"])
    if "erase" in batch:
        images = erase_images(images, batch["erase"], erase_rng, erase_mode)
    return images, targets


def _targets_fn(config, data_module) -> Callable:
    aug, nc = config.aug, config.data.num_classes
    smoothing = float(aug.get("label_smoothing", 0.0))
    if float(aug.get("mixup", 0.0)) > 0 or float(aug.get("cutmix", 0.0)) > 0:

        def fn(rng, images, labels):
            return data_module.mixup_cutmix(
                rng,
                images,
                labels,
                num_classes=nc,
                mixup_alpha=float(aug.mixup),
                cutmix_alpha=float(aug.cutmix),
                prob=float(aug.get("mixup_prob", 1.0)),
                switch_prob=float(aug.get("switch_prob", 0.5)),
                label_smoothing=smoothing,
            )
    else:

        def fn(rng, images, labels):
            del rng
            return images, data_module.smoothed_one_hot(labels, nc, smoothing)

    return fn


class TrainStep:
    """``train_step(state, batch, base_rng, step) -> (state, metrics)``, ``state`` donated.

    ``step`` is the host's count of updates done so far (``state.step``, as a Python int, which the training loop
    keeps anyway). It picks one of two executables, with and without MESA's EMA-teacher forward, so that the choice
    costs no device-to-host copy: a ``lax.cond`` on ``state.step`` made the host wait for its predicate every step
    (MambaVision-T's recipe step measured 1-2 % faster without it on an H200, benchmarks/NOTES.md).
    ``lower(...)`` takes the same arguments; the executable it compiles takes ``(state, batch, base_rng)``."""

    def __init__(self, jitted, mesa_on_at: Callable[[int], bool]):
        self._jitted, self._mesa_on_at = jitted, mesa_on_at

    def __call__(self, state: TrainState, batch: dict, base_rng: jax.Array, step: int):
        return self._jitted(state, batch, base_rng, self._mesa_on_at(step))

    def lower(self, state: TrainState, batch: dict, base_rng: jax.Array, step: int):
        return self._jitted.lower(state, batch, base_rng, self._mesa_on_at(step))


def make_train_step(
    model, tx: optax.GradientTransformation, schedule, config, steps_per_epoch: int, data_module, mesh, state_shardings
) -> TrainStep:
    """Returns the jitted :class:`TrainStep`. ``batch``: "image" uint8 (normalised here with the config's mean/std)
    or float (already normalised), "label", and optionally "erase" (random-erasing rectangles, filled here; see
    ``data.batch_images``).

    Over several devices, ``config.sync_batch_norm`` picks the data-parallel semantics:

    * False (the official recipe, PyTorch DDP without SyncBN): each device runs the forward and backward on its own
      rows (``shard_map``), with BatchNorm statistics, mixup/cutmix partners and random draws of those rows alone;
      the loss, the float32 gradients and the new BatchNorm running statistics are then averaged over the devices.
      Averaging the running statistics every step equals timm's ``--dist-bn reduce`` (an average once an epoch),
      since their update is linear. The result depends on the device count, as the official training's does.
    * True: BatchNorm statistics (and mixup partners) over the global batch, partitioned by XLA: any device count
      gives the numbers of one device with the global batch. XLA then sums the bfloat16 weight gradients of the
      16-bit compute copies across devices in bfloat16 before their cast to float32.

    ``config.grad_accum_steps = A`` (> 1) makes each device run its rows as A micro-batches of
    ``batch_size_per_device`` rows, one after another, and average their float32 gradients, BatchNorm running
    statistics (each micro-batch's from the state's) and metrics into one update. With per-device statistics the
    micro-batches act as extra devices: D devices with A micro-batches give the numbers of D·A devices (the random
    draws too), so one GPU with ``grad_accum_steps=8`` runs the update of 8 GPUs. With global
    statistics micro-batch j holds the j-th block of every device's rows."""
    targets_fn = _targets_fn(config, data_module)
    preprocess = preprocess_settings(config)
    erase_mode = str(config.aug.get("remode", "pixel"))
    mesa = float(config.get("mesa", 0.0) or 0.0)
    ema_decay = config.get("ema_decay")
    if mesa > 0 and not ema_decay:
        raise ValueError("config.mesa > 0 needs an EMA teacher: set config.ema_decay.")
    sync_batch_norm = bool(config.get("sync_batch_norm", False))
    accum = grad_accum_steps(config)

    def loss_and_grads(state: TrainState, batch: dict, rng, mesa_on: bool):
        """The forward and backward on ``batch``: ``(grads, new batch_stats, {"loss", "top1", *aux})``."""
        mix_rng, drop_rng = jax.random.split(rng)
        images, targets = model_inputs(batch, mix_rng, jax.random.fold_in(rng, 1), targets_fn, preprocess, erase_mode)

        if mesa_on:
            teacher = jax.lax.stop_gradient(model.apply(state.variables(ema=True), images).astype(jnp.float32))

        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": state.model_params(params), "batch_stats": state.batch_stats},
                images,
                train=True,
                rngs={"dropout": drop_rng},
                mutable=["batch_stats"],
            )
            logits = logits.astype(jnp.float32)
            ce = soft_target_cross_entropy(logits, targets)
            aux = {"ce": ce}
            loss = ce
            if mesa > 0:  # the metric exists all run long; exactly 0 before the start ratio
                mesa_term = mesa * MESA_SCALE * mesa_kl(logits, teacher) if mesa_on else jnp.zeros((), jnp.float32)
                aux["mesa_loss"] = mesa_term
                loss = loss + mesa_term
            return loss, (logits, new_vars.get("batch_stats", {}), aux)

        (loss, (logits, new_bs, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).astype(jnp.float32)
        return grads, new_bs, {"loss": loss, "top1": top1, **aux}

    def accumulated(state: TrainState, batch: dict, rng, first: jax.Array | int, blocks: int, mesa_on: bool):
        """:func:`loss_and_grads` averaged over ``accum`` micro-batches of ``batch``. Its rows fall into ``blocks``
        equal parts (one a device), each of ``accum`` row blocks: micro-batch j takes block j of every part and draws
        from ``fold_in(rng, first + j)``."""
        if accum == 1:
            return loss_and_grads(state, batch, jax.random.fold_in(rng, first), mesa_on)
        rows = jax.tree.leaves(batch)[0].shape[0] // blocks
        if rows % accum:
            raise ValueError(
                f"config.grad_accum_steps={accum} splits each device's rows into {accum} micro-batches, but a device "
                f"holds {rows} rows of this batch: feed batch_size_per_device * grad_accum_steps rows a device"
            )

        def split(x):  # (blocks * accum * rows, ...) -> (accum, blocks * rows, ...)
            x = x.reshape(blocks, accum, x.shape[0] // (blocks * accum), *x.shape[1:])
            return jnp.swapaxes(x, 0, 1).reshape(accum, -1, *x.shape[3:])

        micro = jax.tree.map(split, batch)

        def add(total, inputs):
            j, micro_batch = inputs
            out = loss_and_grads(state, micro_batch, jax.random.fold_in(rng, first + j), mesa_on)
            return jax.tree.map(jnp.add, total, out), None

        shapes = jax.eval_shape(lambda: loss_and_grads(state, jax.tree.map(lambda x: x[0], micro), rng, mesa_on))
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        total, _ = jax.lax.scan(add, zeros, (jnp.arange(accum), micro))
        return jax.tree.map(lambda t: t / accum, total)

    def per_device_loss_and_grads(state: TrainState, batch: dict, rng, mesa_on: bool):
        """:func:`loss_and_grads` on each device's rows of ``batch`` (BatchNorm statistics of those rows alone, the
        random draws of each device its own; micro-batch j of device d draws as device ``d * accum + j`` of
        ``D * accum`` would), then everything averaged over the devices, in float32."""

        def local(state, batch, rng):
            first = jax.lax.axis_index(sharding_lib.DATA_AXIS) * accum
            return jax.lax.pmean(accumulated(state, batch, rng, first, 1, mesa_on), sharding_lib.DATA_AXIS)

        # Only what the forward and backward read goes in: an FSDP-sharded optimizer state would be gathered.
        needed = state.replace(opt_state=None)
        if not mesa_on:
            needed = needed.replace(ema_params=None, ema_batch_stats=None)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(sharding_lib.DATA_AXIS), P()),
            out_specs=P(),
            check_vma=False,  # Pallas kernels' outputs carry no per-axis variance annotations
        )(needed, batch, rng)

    def train_step(state: TrainState, batch: dict, base_rng, mesa_on: bool):
        rng = jax.random.fold_in(base_rng, state.step)
        if (sync_batch_norm or mesh.size == 1) and accum == 1:
            grads, new_bs, values = loss_and_grads(state, batch, rng, mesa_on)
        elif sync_batch_norm or mesh.size == 1:
            grads, new_bs, values = accumulated(state, batch, rng, 0, mesh.size, mesa_on)
        else:
            grads, new_bs, values = per_device_loss_and_grads(state, batch, rng, mesa_on)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs, opt_state=opt_state)
        if ema_decay:
            d = jnp.float32(ema_decay)
            ema = lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype)
            new_state = new_state.replace(
                ema_params=jax.tree.map(ema, state.ema_params, params),
                ema_batch_stats=jax.tree.map(ema, state.ema_batch_stats, new_bs),
            )
        grad_norm = optim.global_norm(grads)
        metrics = {
            **values,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "finite": jnp.isfinite(values["loss"]) & jnp.isfinite(grad_norm),
        }
        return new_state, metrics

    repl = sharding_lib.replicated(mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
        static_argnums=(3,),
        compiler_options=_compiler_options(mesh),
    )
    return TrainStep(jitted, lambda step: mesa_active(step, config, steps_per_epoch))


def make_eval_step(model, mesh, num_classes: int, mean, std):
    """Returns jitted ``eval_step(variables, batch) -> sums`` (loss_sum, correct1, correct5, count; masked);
    ``batch["image"]`` uint8 (normalised here with ``mean``/``std``) or float (already normalised)."""
    k = min(5, num_classes)

    def eval_step(variables, batch):
        logits = model.apply(variables, batch_images(batch, mean, std)).astype(jnp.float32)
        labels = batch["label"]
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], axis=-1)[:, 0]
        topk = jax.lax.top_k(logits, k)[1]
        hit = topk == labels[:, None]
        return {
            "loss_sum": jnp.sum(nll * mask),
            "correct1": jnp.sum(hit[:, 0] * mask),
            "correct5": jnp.sum(jnp.any(hit, -1) * mask),
            "count": jnp.sum(mask),
        }

    return jax.jit(eval_step, out_shardings=sharding_lib.replicated(mesh), compiler_options=_compiler_options(mesh))


def _compiler_options(mesh):
    """:func:`mambavision_jax.xla_options.compiler_options` for the platform of ``mesh``'s devices."""
    return xla_options.compiler_options(mesh.devices.flat[0].platform)
