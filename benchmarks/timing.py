"""Timing helpers shared by the benchmarks: warm-up excluded, median of repeated timed windows, each window
synchronised with ``block_until_ready``."""

import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

import kernel_trace


def median_seconds(
    fn: Callable[..., Any], input_sets: Sequence[tuple], min_window_s: float = 0.2, windows: int = 7
) -> float:
    """Median seconds per call of ``fn(*args)`` over ``windows`` timed windows.

    Each window cycles through all ``input_sets`` (several sets keep caches honest) for at least
    ``min_window_s``; the first call of each set (compilation, autotuning) is excluded.
    """
    for args in input_sets:
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*input_sets[0]))
    once = max(time.perf_counter() - start, 1e-6)
    reps = max(1, int(min_window_s / once / len(input_sets)))
    samples = []
    for _ in range(windows):
        start = time.perf_counter()
        out = None
        for _ in range(reps):
            for args in input_sets:
                out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / (reps * len(input_sets)))
    return float(np.median(samples))


def compile_seconds(jitted: Callable[..., Any], *args) -> tuple[Any, float, dict]:
    """``(compiled, seconds to lower and compile, memory analysis in bytes)`` for a ``jax.jit`` function."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"):
            memory[key] = int(getattr(analysis, key, 0) or 0)
        memory["peak_bytes_estimate"] = (
            memory["argument_size_in_bytes"]
            + memory["output_size_in_bytes"]
            + memory["temp_size_in_bytes"]
            - memory["alias_size_in_bytes"]
        )
    return compiled, seconds, memory


OP_KINDS = (  # (kind, substrings of device kernel names), first match wins
    ("attention", ("sdpa", "flash", "fmha")),
    ("scan", ("selective_scan",)),
    ("conv", ("fprop", "dgrad", "wgrad", "convolve", "conv2d", "nhwcAddPadding", "nchwToNhwc", "nhwcToNchw")),
    ("gemm", ("nvjet", "gemm", "cutlass", "cublas", "xmma")),
    ("reduction fusion", ("input_",)),
    ("elementwise fusion", ("loop_", "fusion")),
)


def op_kind(name: str) -> str:
    """Coarse kind of a device kernel from its name (see ``OP_KINDS``); "other" if none matches."""
    for kind, keys in OP_KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def traced_events(fn: Callable[..., Any], args: tuple, trace_dir: str, calls: int, wait_each: bool = True) -> list:
    """The events of a JAX profiler trace of ``calls`` calls of ``fn(*args)`` (after one unprofiled call), each
    waited for (``wait_each``) or dispatched back to back and waited for once, as a timed loop runs them."""
    import glob

    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        out = None
        for _ in range(calls):
            out = fn(*args)
            if wait_each:
                jax.block_until_ready(out)
        jax.block_until_ready(out)
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    return kernel_trace.read_trace_events(path)


def profile_kernels(
    fn: Callable[..., Any], args: tuple, trace_dir: str, calls: int = 3, inner_calls: int = 1
) -> tuple[list[dict], bool]:
    """Profiles ``calls`` calls of ``fn(*args)`` (after one unprofiled call) with the JAX profiler and returns
    ``(kernel_trace.kernel_summary rows, on_device)``, ``us_per_call`` per ``calls · inner_calls`` (``inner_calls``:
    the calls of the measured op that one ``fn`` call makes, e.g. a benchmark's loop inside one jit): the events of
    the device (GPU) timelines, or of the host when the trace has no device timeline (CPU; ``on_device`` False).
    The raw trace stays in ``trace_dir``."""
    events = traced_events(fn, args, trace_dir, calls)
    device = kernel_trace.jax_device_events(events)
    chosen = device or kernel_trace.jax_host_events(events)
    return kernel_trace.kernel_summary(chosen, calls * inner_calls), bool(device)


def top_device_ops(fn: Callable[..., Any], args: tuple, trace_dir: str, calls: int = 3, top: int | None = 20) -> dict:
    """Profiles ``calls`` calls of ``fn(*args)`` (:func:`profile_kernels`). Returns ``{"top": [(name, milliseconds
    per call, fraction of the profiled device time)] for the ``top`` ops by total time, "kinds": {kind:
    (milliseconds per call, fraction)} over all ops}``."""
    import collections

    rows, _ = profile_kernels(fn, args, trace_dir, calls)
    kinds = collections.Counter()
    for r in rows:
        kinds[op_kind(r["name"])] += r["us_per_call"]
    whole = sum(r["us_per_call"] for r in rows) or 1.0
    return {
        "top": [(r["name"], r["us_per_call"] / 1e3, r["us_per_call"] / whole) for r in rows[:top]],
        "kinds": {kind: (us / 1e3, us / whole) for kind, us in kinds.most_common()},
    }
