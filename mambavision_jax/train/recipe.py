"""The official MambaVision ImageNet-1K recipe (mambavision/configs/*.yaml, timm train.py semantics).

``configs/*.py`` call ``recipe(model_name, **overrides)`` and state only what differs from this recipe:
LAMB lr 5e-3, betas (0.9, 0.999), eps 1e-8, wd 0.05, cosine per iteration over 310 epochs + 10 cooldown,
warmup 20 epochs from 1e-6, min_lr 5e-6, clip 5.0, EMA 0.9998, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 /
cutmix 1.0, smoothing 0.1, random erasing 0.25, batch 128 per device, drop path from the model defaults, eval
crop_pct from VARIANTS (the yamls' crop_pct).
"""

import ml_collections
from ml_collections.config_dict import placeholder

# Official per-variant deltas: weight decay, warmup epochs, MESA (weight, start ratio) and the eval crop_pct of the
# training run's validation (the yaml's crop_pct, which wins over the pretrained_cfg in timm resolve_data_config:
# T2 and S evaluate at 1.0 and 0.875 there, not at their pretrained_cfg's 0.98 and 0.93).
VARIANTS = {
    "mamba_vision_T": dict(weight_decay=0.05, mesa=0.5, mesa_start_ratio=0.25, crop_pct=1.0),
    "mamba_vision_T2": dict(weight_decay=0.05, mesa=0.75, mesa_start_ratio=0.25, crop_pct=1.0),
    "mamba_vision_S": dict(weight_decay=0.05, mesa=1.0, mesa_start_ratio=0.25, crop_pct=0.875),
    "mamba_vision_B": dict(weight_decay=0.075, warmup_epochs=35, mesa=1.0, mesa_start_ratio=0.3, crop_pct=1.0),
    "mamba_vision_L": dict(weight_decay=0.12, mesa=6.0, mesa_start_ratio=0.25, crop_pct=1.0),
    "mamba_vision_L2": dict(weight_decay=0.12, mesa=6.0, mesa_start_ratio=0.25, crop_pct=1.0),
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 31
    c.model_name = "mamba_vision_T"
    # Overrides for create_model. None values are dropped (model defaults apply, as with timm's drop_path: null).
    # The implementation choices, e.g. --config.model.mlp_impl=mosaic, are MambaVision's fields of those names.
    c.model = ml_collections.ConfigDict(
        {
            "drop_path_rate": placeholder(float),
            **{name: placeholder(str) for name in ("scan_impl", "attention_impl", "norm_impl", "mlp_impl")},
        }
    )
    c.init_from = placeholder(str)  # weights to start from: a checkpoint, a converted dir, or "hf-hub" (official)
    c.compute_dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU

    c.data = ml_collections.ConfigDict()
    c.data.name = "imagenet2012"
    c.data.data_dir = placeholder(str)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.num_classes = 1000
    c.data.image_size = 224
    # Decoding and augmentation: worker_processes spawned processes making whole batches (-1: a process a core but
    # one, as /dev/shm allows, else threads), or num_workers threads (worker_processes=0), which the GIL caps.
    c.data.num_workers = 16
    c.data.worker_processes = -1
    c.data.prefetch = 2
    c.data.on_corrupt = "skip"
    c.data.synthetic_examples = 0

    c.aug = ml_collections.ConfigDict()
    c.aug.scale = (0.08, 1.0)
    c.aug.ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.aug.hflip = 0.5
    c.aug.interpolation = "random"
    c.aug.rand_augment = "rand-m9-mstd0.5-inc1"
    c.aug.color_jitter = 0.4
    c.aug.reprob = 0.25
    c.aug.remode = "pixel"
    c.aug.mixup = 0.8
    c.aug.cutmix = 1.0
    c.aug.mixup_prob = 1.0
    c.aug.switch_prob = 0.5
    c.aug.label_smoothing = 0.1

    c.eval_preprocess = None  # None -> mambavision_jax.pretrained_cfg(model_name)
    c.batch_size_per_device = 128
    c.eval_batch_size_per_device = 128

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "lamb"
    c.optimizer.lr = 5e-3  # no LR scaling with batch size (as the official script)
    c.optimizer.betas = (0.9, 0.999)
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.05
    c.optimizer.clip_grad_norm = 5.0
    c.optimizer.lamb_max_grad_norm = 1.0  # timm.optim.Lamb's built-in global-norm clip (default 1.0)
    c.optimizer.momentum = 0.9  # name="sgd" (Nesterov) or "momentum" only (timm's default)
    c.optimizer.epochs = 310
    c.optimizer.warmup_epochs = 20
    c.optimizer.cooldown_epochs = 10
    c.optimizer.warmup_lr = 1e-6
    c.optimizer.min_lr = 5e-6

    c.ema_decay = placeholder(float)
    c.ema_decay = 0.9998
    c.eval_ema = True  # also evaluate the EMA weights (metrics prefixed ema_)
    c.mesa = 0.0  # EMA self-distillation weight; 0 disables
    c.mesa_start_ratio = 0.25

    c.sharding = "data"  # "data" | "fsdp"
    # False: BatchNorm statistics per device, as the official DDP training (timm without --sync-bn, --dist-bn
    # reduce); True: over the global batch (SyncBN). See train.step.make_train_step.
    c.sync_batch_norm = False
    # micro-batches of batch_size_per_device rows a device runs for one update (the global batch is multiplied by
    # it): with per-device statistics N GPUs with M // N give the update of M GPUs (see train.step.make_train_step)
    c.grad_accum_steps = 1
    c.fsdp_min_size = 2**14  # leaves with fewer elements stay replicated under fsdp
    c.total_steps = placeholder(int)  # caps the run; the schedule still follows the epochs
    c.log_every_steps = 100
    c.eval_every_steps = 2500
    c.checkpoint_every_steps = 2500
    c.keep_checkpoints = 3
    c.save_best = True  # each eval beating the best top-1 writes its weights to <workdir>/best (train.loop)
    c.async_checkpointing = True
    c.progress_bar = True
    c.gc_freeze = True  # gc.freeze() once the step is compiled (see train.loop.train_and_evaluate)
    # The train state's layout: True packs the leaves without weight decay into one vector and the other small ones
    # into rows (train/packing.py, faster); False keeps every leaf apart, the layout of checkpoints written before
    # 2026-12-06.
    c.pack_params = True
    # Compiled programs kept between runs (a resumed run skips compiling): None -> $JAX_COMPILATION_CACHE_DIR, else
    # <workdir>/compilation_cache; "" -> none (train.loop.compilation_cache_dir).
    c.compilation_cache_dir = placeholder(str)
    c.mode = "train"  # "train", "eval" or "export" (the latest checkpoint as converted weights)
    c.export_dir = placeholder(str)  # mode=export: where to write; default <workdir>/converted
    return c


def recipe(model_name: str, **overrides) -> ml_collections.ConfigDict:
    """The recipe for ``model_name`` with its official deltas, then ``overrides`` (dotted keys allowed)."""
    c = base_config()
    c.model_name = model_name
    deltas = dict(VARIANTS.get(model_name, {}))
    for key in ("weight_decay", "warmup_epochs"):
        if key in deltas:
            c.optimizer[key] = deltas.pop(key)
    if "crop_pct" in deltas:  # the other eval fields still come from pretrained_cfg(model_name)
        c.eval_preprocess = ml_collections.ConfigDict({"crop_pct": deltas.pop("crop_pct")})
    for key, value in {**deltas, **overrides}.items():
        _override(c, key, value)
    return c


def _override(c: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets the dotted ``key`` of ``c`` to ``value``; a key naming no field of the recipe (a typo) is refused by name,
    as ``--config.<key>`` is, rather than added as a field nothing reads. ``model.<name>`` may add a field: these
    are create_model's keyword arguments, which it checks by name."""
    *parents, leaf = key.split(".")
    target = c
    for p in parents:
        target = target.get(p) if isinstance(target, ml_collections.ConfigDict) else None
    if not isinstance(target, ml_collections.ConfigDict) or (leaf not in target and parents != ["model"]):
        raise ValueError(f"recipe override {key!r} names no field of the recipe config")
    target[leaf] = value
