"""Train/eval iterators (grain MapDataset -> thread-parallel decode -> batch -> background prefetch).

Global stream (train): step ``s`` belongs to epoch ``e = s // steps_per_epoch`` at position
``p = s % steps_per_epoch``. Epoch ``e`` reads the records ``perm_e[p*G:(p+1)*G]`` with
``perm_e = default_rng([seed, e, 1]).permutation(N)`` and ``G`` the global batch; the last ``N % G`` records of
each permutation are dropped. Host ``i`` of ``n`` takes the contiguous slice ``[i*L:(i+1)*L]`` of every global
batch (``L = G / n``). Each example's augmentation uses ``default_rng([seed, e, record, 0])``. So a batch depends
only on (config, step, process_index, process_count): resuming = ``build_train_iterator(start_step=s)``.

Eval: one ordered pass, ``ceil(N / G_eval)`` batches on every host (same count on all hosts), host slices as above,
positions past ``N`` padded with zeros and ``mask`` 0.
"""

from __future__ import annotations

import math
import threading

import grain
import numpy as np

from .config_utils import cfg_get, global_batch_size, image_size, local_batch_size
from .example_transforms import EvalTransform, TrainTransform
from .prefetch import Prefetcher
from .source_folder import all_skipped_files
from .sources import build_source

_STREAM_LEN = 2**62  # "infinite" length of the train index stream


def _seed(config) -> int:
    return int(cfg_get(config, "seed", 0)) % (2**63)


def _train_split(config) -> str:
    return str(cfg_get(config.data, "train_split", "train"))


def _eval_split(config) -> str:
    return str(cfg_get(config.data, "eval_split", "validation"))


def num_examples(config, split: str) -> int:
    """Number of records in ``split`` of ``config.data``'s dataset."""
    return len(build_source(config, split))


def _steps_per_epoch(n: int, global_batch: int, name: str) -> int:
    spe = n // global_batch
    if spe <= 0:
        raise ValueError(
            f"dataset {name!r} train split has {n} examples, fewer than one global batch "
            f"({global_batch}); lower batch_size_per_device"
        )
    return spe


def steps_per_epoch(config) -> int:
    """``num_examples(train) // global batch`` (global batch = batch_size_per_device * jax.device_count())."""
    return _steps_per_epoch(
        num_examples(config, _train_split(config)), global_batch_size(config), cfg_get(config.data, "name")
    )


class DataIterator:
    """Iterator of batch dicts. ``step`` is the global step of the next batch (train) or batch index (eval);
    ``skipped_files`` lists corrupt files skipped so far (folder source, on_corrupt='skip'); ``close()`` stops the
    background threads."""

    def __init__(self, it, source, start_step: int, prefetch: int):
        self._pf = Prefetcher(it, prefetch)
        self.source = source
        self.step = int(start_step)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._pf)
        self.step += 1
        return batch

    @property
    def skipped_files(self) -> list[str]:
        log = getattr(self.source, "skip_log", None)
        return sorted(log.files) if log is not None else []

    @property
    def num_skipped(self) -> int:
        log = getattr(self.source, "skip_log", None)
        return log.count if log is not None else 0

    def close(self):
        self._pf.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _read_options(config, local_batch: int) -> grain.ReadOptions:
    threads = int(cfg_get(config.data, "num_workers", 2))
    return grain.ReadOptions(num_threads=max(0, threads), prefetch_buffer_size=max(16, min(2 * local_batch, 1024)))


def _stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _check_process(process_index: int, process_count: int):
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


class _EpochPermutations:
    def __init__(self, seed: int, n: int):
        self.seed, self.n = seed, n
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch, 1]).permutation(self.n)
                self._cache = {k: v for k, v in self._cache.items() if k >= epoch - 1}
                self._cache[epoch] = perm
            return perm


def build_train_iterator(config, *, start_step: int, process_index: int, process_count: int) -> DataIterator:
    """Infinite iterator of {"image": uint8 (L, S, S, 3), "label": int32 (L,)} plus, for augmented sources with
    ``aug.reprob`` > 0, "erase": int32 (L, 4) random-erasing rectangles, with ``L = batch_size_per_device *
    jax.local_device_count()``; batch k is global step ``start_step + k``. The jitted step normalises the images
    and erases the rectangles on the device (``device_preprocess.batch_images``)."""
    _check_process(process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    source = build_source(config, _train_split(config))
    local = local_batch_size(config)
    glob = local * process_count
    spe = _steps_per_epoch(len(source), glob, cfg_get(config.data, "name"))
    seed = _seed(config)
    perms = _EpochPermutations(seed, len(source))

    def positions(step: int) -> np.ndarray:
        """Record indices of this process's examples of global step ``step``."""
        epoch, pos = divmod(step, spe)
        start = pos * glob + process_index * local
        return perms(epoch)[start : start + local]

    if source.skip_augmentation:  # synthetic: whole batches in one gather, no per-example work

        def batches():
            step = int(start_step)
            while True:
                image, label = source.load_batch(positions(step))
                yield {"image": image, "label": label}
                step += 1

        return DataIterator(batches(), source, start_step, int(cfg_get(config.data, "prefetch", 2)))

    transform = TrainTransform(config)

    def load(j: int) -> dict:
        step, k = divmod(int(j), local)
        record = int(positions(step)[k])
        image, label = source.load(record)
        image, box = transform(image, np.random.default_rng([seed, step // spe, record, 0]))
        example = {"image": image, "label": np.int32(label)}
        if transform.reprob > 0:
            example["erase"] = box
        return example

    ds = grain.MapDataset.range(int(start_step) * local, _STREAM_LEN).map(load)
    it = iter(ds.to_iter_dataset(_read_options(config, local)).batch(local, drop_remainder=True, batch_fn=_stack))
    return DataIterator(it, source, start_step, int(cfg_get(config.data, "prefetch", 2)))


def build_eval_iterator(config, *, process_index: int, process_count: int) -> DataIterator:
    """One ordered pass: {"image": uint8 (L, S, S, 3), "label": int32 (L,), "mask": float32 (L,)}, ``L =
    eval_batch_size_per_device * jax.local_device_count()``; the last batches are padded (zeros, mask 0). The
    jitted eval step normalises the images on the device."""
    _check_process(process_index, process_count)
    source = build_source(config, _eval_split(config))
    local = local_batch_size(config, eval=True)
    glob = local * process_count
    n = len(source)
    num_steps = math.ceil(n / glob)
    size = image_size(config)
    transform = None if source.skip_augmentation else EvalTransform(config)

    def load(j: int) -> dict:
        step, k = divmod(int(j), local)
        g = step * glob + process_index * local + k
        if g >= n:
            return {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(0), "mask": np.float32(0)}
        image, label = source.load(g)
        if transform is not None:
            image = transform(image)
        return {"image": image, "label": np.int32(label), "mask": np.float32(1)}

    ds = grain.MapDataset.range(0, num_steps * local).map(load)
    it = ds.to_iter_dataset(_read_options(config, local)).batch(local, drop_remainder=False, batch_fn=_stack)
    return DataIterator(iter(it), source, 0, int(cfg_get(config.data, "prefetch", 2)))


def skipped_files() -> list[str]:
    """Every corrupt file skipped so far by any folder source in this process."""
    return all_skipped_files()
