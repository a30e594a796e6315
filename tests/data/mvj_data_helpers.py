"""Shared helpers for the data-pipeline tests (imported by name: pytest puts tests/data on sys.path)."""

import ml_collections as mlc


def make_config(
    name="digits",
    *,
    size=32,
    bs=8,
    eval_bs=None,
    num_classes=10,
    data_dir=None,
    rand_augment="rand-m9-mstd0.5-inc1",
    reprob=0.25,
    remode="pixel",
    on_corrupt="raise",
    train_split="train",
    eval_split="test",
    workers=2,
    seed=0,
):
    c = mlc.ConfigDict()
    c.seed = seed
    c.model_name = "mamba_vision_T"
    c.data = mlc.ConfigDict(
        dict(
            name=name,
            data_dir=data_dir,
            train_split=train_split,
            eval_split=eval_split,
            num_classes=num_classes,
            image_size=size,
            num_workers=workers,
            prefetch=2,
            on_corrupt=on_corrupt,
            synthetic_examples=256,
        )
    )
    c.aug = mlc.ConfigDict(
        dict(
            scale=(0.08, 1.0),
            ratio=(3 / 4, 4 / 3),
            hflip=0.5,
            interpolation="random",
            rand_augment=rand_augment,
            color_jitter=0.4,
            reprob=reprob,
            remode=remode,
            mixup=0.8,
            cutmix=1.0,
            mixup_prob=1.0,
            switch_prob=0.5,
            label_smoothing=0.1,
        )
    )
    c.eval_preprocess = None
    c.batch_size_per_device = bs
    c.eval_batch_size_per_device = eval_bs or bs
    return c


def take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out
