"""Train/eval iterators (grain MapDataset -> decode and augment in threads or worker processes -> batch ->
background prefetch).

Global stream (train): step ``s`` belongs to epoch ``e = s // steps_per_epoch`` at position
``p = s % steps_per_epoch``. Epoch ``e`` reads the records ``perm_e[p*G:(p+1)*G]`` with
``perm_e = default_rng([seed, e, 0, 1]).permutation(N)`` and ``G`` the global batch; the last ``N % G`` records of
each permutation are dropped. Host ``i`` of ``n`` takes the contiguous slice ``[i*L:(i+1)*L]`` of every global
batch (``L = G / n``). Each example's augmentation uses ``default_rng([seed, e, record, 0])``. So a batch depends
only on (config, step, process_index, process_count): resuming = ``build_train_iterator(start_step=s)``.

Eval: one ordered pass, ``ceil(N / G_eval)`` batches on every host (same count on all hosts), host slices as above,
positions past ``N`` padded with zeros and ``mask`` 0; so is a corrupt file's position under ``on_corrupt='skip'``
(no substitute, which would be counted twice while the corrupt file's label went missing): the file is named once and
the pass's end logs how many were left out (``DataIterator.num_skipped``).

Parallelism (``config.data``): ``num_workers`` threads of this process decode and augment examples, or, with
``worker_processes`` > 0, that many spawned processes each make whole batches (grain ``mp_prefetch``; the batches
are the same, in the same order); -1 picks the count from the cores and ``/dev/shm`` (:func:`auto_worker_processes`).
Threads share the GIL, which an example holds for ~0.75 ms of its 3.4 (a 500x375 JPEG with the full train
augmentation, profiled on the 2-core development machine), so they cap at ~4.5 cores' worth; processes scale with
the cores. At batch 128 there: one thread 360 img/s, two threads 633-749, two processes 696-936; on a 16-core GPU
host, 16 threads 697-807 img/s and 15 processes 3,026-4,666 (``benchmarks/input_pipeline.py``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time

import grain
import numpy as np
from absl import flags

from .config_utils import cfg_get, global_batch_size, image_size, local_batch_size
from .example_transforms import EvalTransform, TrainTransform
from .prefetch import Prefetcher
from . import source_folder
from .source_folder import all_skipped_files
from .sources import build_source

log = logging.getLogger(__name__)

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
            f"({global_batch}); lower batch_size_per_device or grad_accum_steps"
        )
    return spe


def steps_per_epoch(config) -> int:
    """``num_examples(train) // global batch`` (global batch = batch_size_per_device * jax.device_count())."""
    return _steps_per_epoch(
        num_examples(config, _train_split(config)), global_batch_size(config), cfg_get(config.data, "name")
    )


class DataIterator:
    """Iterator of batch dicts. ``step`` is the global step of the next batch (train) or batch index (eval);
    ``skipped_files`` lists corrupt files skipped so far (folder source, on_corrupt='skip'; also those skipped in
    worker processes, which report them with their batch), ``num_skipped`` counts the skips; the end of a pass
    (eval: train never ends) logs that count. ``close()`` stops the background threads and processes."""

    def __init__(self, it, source, start_step: int, prefetch: int):
        self._workers = it if isinstance(it, _WorkerBatches) else None
        self._pf = Prefetcher(it, prefetch)
        self.source = source
        self.step = int(start_step)
        self._ended = False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._pf)
        except StopIteration:
            self._report_end()
            raise
        skipped = batch.pop(_SKIPPED, None)
        if skipped:
            self.source.skip_log.merge(skipped)
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

    def _report_end(self):
        """Logs, once, how many corrupt files the pass that just ended left out of its examples (mask 0)."""
        if self.num_skipped and not self._ended:
            log.warning(
                "input pipeline: %d corrupt image file(s) of split %r left out of this pass (mask 0, named above)",
                self.num_skipped,
                self.source.split,
            )
        self._ended = True

    def close(self):
        self._pf.close()
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _read_options(config, local_batch: int) -> grain.ReadOptions:
    threads = int(cfg_get(config.data, "num_workers", 2))
    return grain.ReadOptions(num_threads=max(0, threads), prefetch_buffer_size=max(16, min(2 * local_batch, 1024)))


AUTO = -1  # worker_processes: as many as the cores and /dev/shm allow (see auto_worker_processes)
_SHM = "/dev/shm"
_WORKER_BUFFER = 2  # batches each worker process makes ahead (grain's per_worker_buffer_size)
_SHM_BATCHES_PER_PROCESS = _WORKER_BUFFER + 2  # and the batch being handed over, and headroom


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Launchers' counts of the processes started on this host: Open MPI, torchrun-style launchers, SLURM.
_LOCAL_PROCESS_VARS = (
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "LOCAL_WORLD_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
)


def _processes_on_this_host() -> int:
    """How many training processes the launcher started on this host (1 where none says): they share its cores and
    its /dev/shm. SLURM's ``SLURM_TASKS_PER_NODE`` reads like ``8(x2),4``: this host's count is taken as the first."""
    for name in _LOCAL_PROCESS_VARS:
        first = os.environ.get(name, "").split(",")[0].split("(")[0].strip()
        if first.isdigit() and int(first) > 0:
            return int(first)
    return 1


def _free_shm_bytes() -> int | None:
    """Free bytes in ``/dev/shm``, where worker processes hand their batches over; None where there is none."""
    try:
        stat = os.statvfs(_SHM)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def auto_worker_processes(batch_bytes: int, cores: int, free_shm: int | None) -> int:
    """``worker_processes=-1`` (auto): one process a core but one (left to the main process), as many as ``/dev/shm``
    holds batches of ``batch_bytes`` for (``_SHM_BATCHES_PER_PROCESS`` each); 0 (threads) where that is under two,
    which two threads match (a 2-core host, or Docker's default 64 MB ``/dev/shm``)."""
    processes = cores - 1
    if free_shm is not None:
        processes = min(processes, free_shm // (_SHM_BATCHES_PER_PROCESS * max(1, batch_bytes)))
    return int(processes) if processes >= 2 else 0


def worker_process_count(config, batch_size: int) -> int:
    """How many worker processes make batches of ``batch_size`` images for ``config`` (0: threads), with
    ``config.data.worker_processes`` = -1 (auto) resolved on this host, where several training processes started by
    one launcher (SLURM, Open MPI, torchrun-style) split the cores and /dev/shm; ValueError for a setting that is no
    count."""
    processes = cfg_get(config.data, "worker_processes", 0)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < AUTO:
        raise ValueError(
            f"config.data.worker_processes must be an int >= 0 (0: threads only) or -1 (auto); got {processes!r}"
        )
    if processes != AUTO:
        return processes
    batch_bytes = batch_size * image_size(config) ** 2 * 3  # uint8 HWC images
    cores, free_shm, sharing = _usable_cores(), _free_shm_bytes(), _processes_on_this_host()
    if sharing > 1:  # a share each: of the host's cores, unless the launcher bound this process to fewer
        cores = cores // sharing if cores >= (os.cpu_count() or cores) else cores
        free_shm = None if free_shm is None else free_shm // sharing
    processes = auto_worker_processes(batch_bytes, cores, free_shm)
    shm = "no /dev/shm" if free_shm is None else f"{free_shm / 2**20:,.0f} MiB of /dev/shm"
    shm += f", shared by {sharing} training processes" if sharing > 1 else ""
    chosen = f"{processes} worker processes" if processes else "threads"
    if processes < auto_worker_processes(batch_bytes, cores, None):  # /dev/shm, not the cores, set the count
        log.warning(
            "input pipeline: %s, as /dev/shm holds no more batches (%s; %d cores); in Docker, a larger "
            "--shm-size lets a process a core run",
            chosen,
            shm,
            cores,
        )
    else:
        log.info("input pipeline: %s (worker_processes=-1, auto: %d cores; %s)", chosen, cores, shm)
    return processes


def _stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


_SKIPPED = "skipped_files"  # batch key of the corrupt files a worker process skipped while making the batch


class _WholeBatches:
    """``step -> batch``: the ``size`` examples at global positions ``step * size + k`` stacked, made one after
    another; for worker processes, which each make whole batches. A folder source's corrupt files skipped while
    making it travel with the batch under ``_SKIPPED`` ({path: times}), since the worker's skip log is its own."""

    def __init__(self, example, size: int, source):
        self.example, self.size, self.source = example, size, source

    def __call__(self, step: int) -> dict:
        log = getattr(self.source, "skip_log", None)
        before = dict(log.files) if log is not None else {}
        batch = _stack([self.example(int(step) * self.size + k) for k in range(self.size)])
        if log is not None:
            batch[_SKIPPED] = {p: n - before.get(p, 0) for p, n in log.files.items() if n > before.get(p, 0)}
        return batch


def _init_worker(worker_index: int, worker_count: int, main_pid: int) -> None:
    """Run first in each worker process: it leaves the corrupt-file warnings to the main process ``main_pid`` (which
    logs what the workers report) and exits when that process is gone (killed, say, even before this worker got
    here), instead of waiting forever to hand over its next batch."""
    del worker_index, worker_count
    logging.getLogger(source_folder.__name__).setLevel(logging.ERROR)

    def exit_when_orphaned():
        while os.getppid() == main_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True, name="mvj-worker-watchdog").start()


def _batches(example, size: int, source, first_step: int, steps: int, config, drop_remainder: bool):
    """The iterator of the batches ``first_step ..`` (``steps`` of them) made by ``example(position)``, position
    ``step * size + k`` for the k-th example of a step: in threads of this process (``config.data.num_workers``) or,
    as whole batches in the spawned processes :func:`worker_process_count` gives for the config, put back in order.
    ``example`` must then pickle (cloudpickle), with what it holds (source, transform)."""
    processes = worker_process_count(config, size)
    if processes == 0:
        ds = grain.MapDataset.range(first_step * size, (first_step + steps) * size).map(example)
        it = ds.to_iter_dataset(_read_options(config, size))
        return iter(it.batch(size, drop_remainder=drop_remainder, batch_fn=_stack))
    if not flags.FLAGS.is_parsed():  # grain reads absl flags when it starts its workers; scripts may parse none
        flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(first_step, first_step + steps).map(_WholeBatches(example, size, source))
    options = grain.MultiprocessingOptions(num_workers=processes, per_worker_buffer_size=_WORKER_BUFFER)
    init = functools.partial(_init_worker, main_pid=os.getpid())
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(options, worker_init_fn=init)
    return _WorkerBatches(iter(it))


class _WorkerBatches:
    """The batches of grain's multiprocess iterator ``it``, every array copied out of the shared memory the workers
    hand it over in, which is then freed at once (arrays the device step aliases, or that are alive at interpreter
    exit, would otherwise keep their segments); ``close()`` stops the worker processes."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in next(self._it).items()}

    def close(self):
        self._it.close()


def _check_process(process_index: int, process_count: int):
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


def _permutation_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of epoch ``epoch``'s permutation. Its seed list has 4 entries, as :func:`_example_rng`'s, the
    last telling the streams apart: numpy pads a shorter list with zeros, so ``[seed, epoch, 1]`` would seed the
    same generator as record 1's augmentation."""
    return np.random.default_rng([seed, epoch, 0, 1])


def _example_rng(seed: int, epoch: int, record: int) -> np.random.Generator:
    """The generator of record ``record``'s augmentation in epoch ``epoch`` (the same on whichever host reads it)."""
    return np.random.default_rng([seed, epoch, record, 0])


class _EpochPermutations:
    """``epoch -> permutation of range(n)``, the last two cached; picklable (for worker processes)."""

    def __init__(self, seed: int, n: int):
        self.seed, self.n = seed, n
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {"seed": self.seed, "n": self.n}

    def __setstate__(self, state):
        self.__init__(state["seed"], state["n"])

    def __call__(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = _permutation_rng(self.seed, epoch).permutation(self.n)
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
        image, box = transform(image, _example_rng(seed, step // spe, record))
        example = {"image": image, "label": np.int32(label)}
        if transform.reprob > 0:
            example["erase"] = box
        return example

    it = _batches(load, local, source, int(start_step), _STREAM_LEN // local - int(start_step), config, True)
    return DataIterator(it, source, start_step, int(cfg_get(config.data, "prefetch", 2)))


def build_eval_iterator(config, *, process_index: int, process_count: int) -> DataIterator:
    """One ordered pass: {"image": uint8 (L, S, S, 3), "label": int32 (L,), "mask": float32 (L,)}, ``L =
    eval_batch_size_per_device * jax.local_device_count()``; the last batches are padded (zeros, mask 0), as are the
    corrupt files a folder source skips (``on_corrupt='skip'``): each is read once, none substituted. The jitted eval
    step normalises the images on the device."""
    _check_process(process_index, process_count)
    source = build_source(config, _eval_split(config))
    local = local_batch_size(config, eval=True)
    glob = local * process_count
    n = len(source)
    num_steps = math.ceil(n / glob)
    size = image_size(config)
    transform = None if source.skip_augmentation else EvalTransform(config)
    read = getattr(source, "load_or_none", source.load)  # a folder source's corrupt file: None, no substitute
    padding = {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(0), "mask": np.float32(0)}

    def load(j: int) -> dict:
        step, k = divmod(int(j), local)
        g = step * glob + process_index * local + k
        image, label = read(g) if g < n else (None, 0)
        if image is None:
            return padding
        if transform is not None:
            image = transform(image)
        return {"image": image, "label": np.int32(label), "mask": np.float32(1)}

    it = _batches(load, local, source, 0, num_steps, config, False)
    return DataIterator(it, source, 0, int(cfg_get(config.data, "prefetch", 2)))


def skipped_files() -> list[str]:
    """Every corrupt file skipped so far by any folder source in this process."""
    return all_skipped_files()
