"""Demo: a small MambaVision (all four stage types: conv, conv, mamba+attention, mamba+attention) trained from
scratch on scikit-learn's digits (10 classes, 1437 train / 360 val, 8x8 upsampled) on CPU in a few minutes.

  python main.py --config=configs/demo.py --workdir=/tmp/mv_demo
"""

import ml_collections

from mambavision_jax.train.recipe import recipe


def get_config():
    c = recipe("mamba_vision_T")
    c.seed = 0
    # 64x64 input -> stage maps 16x16, 8x8, 4x4, 2x2; the stage-3/4 windows (4, 2) cover their whole map, as the
    # official 224 models do (14, 7). Stage 3 = 1 Mamba-mixer block + 1 attention block, stage 4 = 1 attention.
    c.model = ml_collections.ConfigDict(
        dict(
            depths=(1, 1, 2, 1),
            dim=32,
            in_dim=16,
            num_heads=(1, 2, 4, 4),
            window_size=(8, 8, 4, 2),
            drop_path_rate=0.0,
            mlp_ratio=2.0,
        )
    )
    c.compute_dtype = "auto"

    c.data.name = "digits"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.num_classes = 10
    c.data.image_size = 64
    c.data.num_workers = 2
    c.data.worker_processes = 0  # threads: 8x8 digits decode in microseconds; processes would only add start-up
    c.data.prefetch = 2

    # Light, digit-safe augmentation: mild crops, no flips, no RandAugment/colour, no erasing, no mixup/cutmix.
    c.aug.scale = (0.7, 1.0)
    c.aug.ratio = (0.9, 1.1)
    c.aug.hflip = 0.0
    c.aug.interpolation = "bicubic"
    c.aug.rand_augment = ""
    c.aug.color_jitter = 0.0
    c.aug.reprob = 0.0
    c.aug.mixup = 0.0
    c.aug.cutmix = 0.0
    c.aug.label_smoothing = 0.1
    c.eval_preprocess = ml_collections.ConfigDict(dict(crop_pct=1.0, crop_mode="center", interpolation="bicubic"))

    c.batch_size_per_device = 64
    c.eval_batch_size_per_device = 128
    c.optimizer.name = "adamw"
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.epochs = 12
    c.optimizer.warmup_epochs = 1
    c.optimizer.cooldown_epochs = 0
    c.optimizer.warmup_lr = 1e-5
    c.optimizer.min_lr = 1e-5

    c.ema_decay = None  # placeholder(float): --config.ema_decay=0.999 works
    c.mesa = 0.0
    c.log_every_steps = 20
    c.eval_every_steps = 110
    c.checkpoint_every_steps = 110
    c.keep_checkpoints = 2
    return c
