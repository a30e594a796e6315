"""mamba_ssm's CUDA selective scan (the kernel the official MambaVision calls) timed under scan.py's protocol, so
the two kernels' times compare like for like.

    MAMBA_CSRC=path/to/mamba/csrc/selective_scan python benchmarks/mamba_ssm_scan.py [--shapes T_stage3,T_stage4]
        [--sets 4] [--out mamba_ssm_scan.json]

Needs PyTorch with CUDA and mamba_ssm's kernel sources (``csrc/selective_scan`` of state-spaces/mamba); builds the
``selective_scan_cuda`` extension for the local GPU with mamba_ssm's own nvcc flags (a few minutes the first time,
cached in ``$SS_BUILD``, default /tmp/ssbuild). Protocol as in ``scan.py``: float32, softplus + delta_bias + D,
B and C one group of d_state rows (MambaVision's call); each timed window cycles ``--sets`` input sets (4 by default,
more than the L2 cache holds; 1 reuses the same inputs every call, as the official anchor script does),
``INNER_REPS`` passes; median of 7 windows between CUDA events; warm-up excluded. Forward: ``ext.fwd``;
forward+backward: ``ext.fwd`` then ``ext.bwd`` on its saved states. Kernels only (no autograd wrapper).
``--kernel-times``: one more pass of the forwards under ``torch.profiler``; the durations of its kernels (CUPTI),
summarised by ``kernel_trace`` as ``scan.py --kernel-times`` summarises ours.
"""

import argparse
import glob
import json
import os
import sys

import torch
from torch.utils.cpp_extension import load

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_trace  # noqa: E402
from extension_build import build_dir, clear_stale_lock  # noqa: E402
from scan_shapes import INNER_REPS, N_STATE, SHAPES  # noqa: E402

NVCC_FLAGS = [  # mamba_ssm's setup.py
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]


def build_extension(csrc):
    """mamba_ssm's selective_scan_cuda for this GPU's architecture."""
    if not os.path.isfile(os.path.join(csrc, "selective_scan.cpp")):
        raise FileNotFoundError(f"no selective_scan.cpp under MAMBA_CSRC={csrc!r} (mamba's csrc/selective_scan)")
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    directory = build_dir()
    os.makedirs(directory, exist_ok=True)
    clear_stale_lock(directory)
    arch = f"arch=compute_{major}{minor},code=sm_{major}{minor}"
    return load(
        "selective_scan_cuda",
        sources=[os.path.join(csrc, "selective_scan.cpp")] + sorted(glob.glob(os.path.join(csrc, "*.cu"))),
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=NVCC_FLAGS + ["-gencode", arch],
        extra_include_paths=[csrc],
        build_directory=directory,
        verbose=False,
    )


def input_sets(batch, length, dim, count):
    """``count`` sets of mamba_ssm-layout float32 inputs: u, delta (batch, dim, length); A (dim, d_state) < 0;
    B, C (batch, 1, d_state, length); D, delta_bias (dim,); dout (batch, dim, length)."""
    sets = []
    for i in range(count):
        g = torch.Generator(device="cuda").manual_seed(i)

        def normal(*shape, g=g):
            return torch.randn(*shape, device="cuda", generator=g)

        sets.append(
            dict(
                u=normal(batch, dim, length),
                delta=normal(batch, dim, length) * 0.5 - 1.0,
                A=-torch.rand(dim, N_STATE, device="cuda", generator=g) - 0.5,
                B=normal(batch, 1, N_STATE, length),
                C=normal(batch, 1, N_STATE, length),
                D=normal(dim),
                delta_bias=normal(dim) * 0.1,
                dout=normal(batch, dim, length),
            )
        )
    return sets


def median_us(fn, sets, windows=7):
    """Median µs per call of ``fn(set)``, each window ``INNER_REPS`` passes over ``sets`` between CUDA events."""
    for s in sets:
        fn(s)
    torch.cuda.synchronize()
    samples = []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(INNER_REPS):
            for s in sets:
                fn(s)
        end.record()
        torch.cuda.synchronize()
        samples.append(1e3 * start.elapsed_time(end) / (INNER_REPS * len(sets)))
    return sorted(samples)[windows // 2]


def profiled_kernels(fn, sets, trace_path):
    """kernel_trace summary rows of one profiled pass (``INNER_REPS`` times over ``sets``) of ``fn(set)``,
    ``us_per_call`` per call of ``fn``."""
    for s in sets:
        fn(s)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(INNER_REPS):
            for s in sets:
                fn(s)
        torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    events = kernel_trace.torch_kernel_events(kernel_trace.read_trace_events(trace_path))
    if not events:
        raise RuntimeError(f"torch.profiler recorded no CUDA kernels ({trace_path})")
    return kernel_trace.kernel_summary(events, INNER_REPS * len(sets))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="T_stage3,T_stage4")
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--kernel-times", action="store_true", help="also profile the forward: kernel durations")
    args = parser.parse_args()
    ext = build_extension(os.environ.get("MAMBA_CSRC", "csrc/selective_scan"))

    def forward(s):
        return ext.fwd(s["u"], s["delta"], s["A"], s["B"], s["C"], s["D"], None, s["delta_bias"], True)

    def forward_backward(s):
        out, x, *_ = forward(s)
        return ext.bwd(
            s["u"],
            s["delta"],
            s["A"],
            s["B"],
            s["C"],
            s["D"],
            None,
            s["delta_bias"],
            s["dout"],
            x,
            None,
            None,
            True,
            False,
        )

    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, sets=args.sets, rows=[])
    for tag in args.shapes.split(","):
        batch, length, dim = SHAPES[tag]
        sets = input_sets(batch, length, dim, args.sets)
        row = dict(shape=tag, fwd_us=median_us(forward, sets), fwdbwd_us=median_us(forward_backward, sets))
        results["rows"].append(row)
        print(f"mamba_ssm {tag:9s} sets {args.sets}: fwd {row['fwd_us']:7.1f} us  fwd+bwd {row['fwdbwd_us']:7.1f} us")
        if args.kernel_times:
            kernels = profiled_kernels(forward, sets, os.path.join("/tmp", f"mamba_ssm_trace_{tag}.json"))
            row["fwd_kernels"], row["fwd_kernel_us"] = kernels, kernels[0]["median_us"]
            print(f"  forward kernel {row['fwd_kernel_us']:.1f} us\n" + kernel_trace.format_summary(kernels))
        del sets
    out = args.out or os.path.join(os.environ.get("OUT", "."), "mamba_ssm_scan.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
