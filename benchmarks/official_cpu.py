"""The official PyTorch MambaVision's inference throughput on the CPU, for comparison with ours
(``python benchmarks/throughput.py --dtype float32 --train-models ""`` on the same machine).

    python benchmarks/official_cpu.py --models T --batches 1,16 [--threads N]

The official code cannot run on a CPU as published: its selective scan is mamba_ssm's CUDA kernel. Here the
pure-PyTorch scan that the parity tests use (``tests/ref_shims``) stands in for it, which is what a CPU user of
the official code would have to write. float32, eval mode, channels_last, ``torch.inference_mode``; median of
timed windows after warm-up.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "ref_shims"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

NAMES = {"T": "mamba_vision_T", "T2": "mamba_vision_T2", "S": "mamba_vision_S", "B": "mamba_vision_B"}


def images_per_second(model, batch, windows=5, window_s=2.0):
    import torch

    x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        model(x)
        rates = []
        for _ in range(windows):
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < window_s:
                model(x)
                n += batch
            rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="T")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import tv_cpu_fix

    tv_cpu_fix.apply()
    import torch
    from mambavision.models import mamba_vision

    torch.set_num_threads(args.threads)
    for m in args.models.split(","):
        model = getattr(mamba_vision, NAMES[m])(pretrained=False).eval().to(memory_format=torch.channels_last)
        for batch in (int(b) for b in args.batches.split(",")):
            rate = images_per_second(model, batch)
            print(f"official {m} bs{batch} float32 CPU ({args.threads} threads, pure-PyTorch scan): {rate:.1f} img/s")


if __name__ == "__main__":
    main()
