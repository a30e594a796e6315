"""Host input pipeline throughput: ``build_train_iterator`` alone (no device work), img/s and bytes a batch.

    python benchmarks/input_pipeline.py [--config configs/tiny.py] [--sources synthetic,digits] [--batches 8] \
        [--workers 16] [--processes 0,16] [--data-dir <folder root> [--write-jpegs 640]]

Each source runs the config's train pipeline (for augmented sources: RandomResizedCrop, flip, RandAugment and the
random-erasing rectangles; normalisation and the erasing fill run on the device in the jitted step, not here) at
the config's batch size and image size, without the iterator's background prefetch (``config.data.prefetch = 0``,
so the time is the producer's own). Warm-up batches are excluded: three, plus two a worker process, since each
process makes batches ahead into its buffer while the first ones are taken (time many more batches than
processes: with few, the buffered ones inflate the rate). ``--workers`` overrides
``config.data.num_workers`` (grain threads), ``--processes`` lists ``config.data.worker_processes`` settings to time
one after another (0: threads only), ``--data-dir`` is the folder source's root (``<root>/train/<class>/*.jpg``);
``--write-jpegs N`` first fills an empty or missing root with N ImageNet-sized stand-ins (500x375 JPEGs, quality 90,
~75 KB, in 4 classes) to time a host without ImageNet.
Prints one line a source and setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mambavision_jax.data as data  # noqa: E402
from mambavision_jax.data.config_utils import local_batch_size  # noqa: E402
from config_file import load_config  # noqa: E402


def measure(config, source: str, batches: int) -> dict:
    config.data.name = source
    config.data.prefetch = 0
    if source == "synthetic" and not config.data.get("synthetic_examples"):
        config.data.synthetic_examples = 100_000
    processes = data.worker_process_count(config, local_batch_size(config))
    it = data.build_train_iterator(config, start_step=0, process_index=0, process_count=1)
    try:
        for _ in range(3 + 2 * processes):
            batch = next(it)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        seconds = (time.perf_counter() - start) / batches
    finally:
        it.close()
    size = len(batch["label"])
    return {
        "processes": processes,
        "img_per_s": size / seconds,
        "ms_per_batch": 1e3 * seconds,
        "mb_per_batch": sum(np.asarray(v).nbytes for v in batch.values()) / 1e6,
        "arrays": {k: f"{np.asarray(v).dtype}{list(np.shape(v))}" for k, v in batch.items()},
    }


def write_jpegs(root: str, count: int, classes: int = 4) -> None:
    """``count`` smooth, noisy 500x375 RGB JPEGs (about an ImageNet photo's size and file size) under
    ``root/{train,val}/class<i>/`` (val: 4 a class), unless ``root`` already holds files."""
    from PIL import Image

    if os.path.isdir(root) and os.listdir(root):
        return
    rng = np.random.default_rng(0)
    x = np.mgrid[0:375, 0:500][1]
    for split, per_class in (("train", max(1, count // classes)), ("val", 4)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                waves = [
                    np.sin(x / (20 + 7 * k) + 6 * rng.random()) * 80 + 120 + 12 * rng.normal(size=x.shape)
                    for k in range(3)
                ]
                image = np.clip(np.stack(waves, -1), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    parser.add_argument("--sources", default="synthetic,digits")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--processes", default="0", help="comma list of worker-process counts (0: threads only, -1: auto)"
    )
    parser.add_argument("--data-dir", default=None, help="root of the folder source")
    parser.add_argument("--write-jpegs", type=int, default=0, help="fill an empty --data-dir with this many JPEGs")
    args = parser.parse_args()
    if args.write_jpegs:
        if not args.data_dir:
            parser.error("--write-jpegs needs --data-dir")
        write_jpegs(args.data_dir, args.write_jpegs)
    for source in args.sources.split(","):
        for processes in (int(p) for p in args.processes.split(",")):
            config = load_config(args.config)
            if args.workers is not None:
                config.data.num_workers = args.workers
            config.data.worker_processes = processes
            if args.data_dir:
                config.data.data_dir = args.data_dir
            r = measure(config, source, args.batches)
            arrays = ", ".join(f"{k} {v}" for k, v in r["arrays"].items())
            parallel = f"{r['processes']} processes" if r["processes"] else f"{config.data.num_workers} threads"
            print(
                f"{source:10s} {parallel:>13s} {r['img_per_s']:9.0f} img/s  {r['ms_per_batch']:7.1f} ms/batch  "
                f"{r['mb_per_batch']:6.1f} MB/batch  ({arrays})",
                flush=True,
            )


if __name__ == "__main__":
    main()
