"""Kernel durations read from Chrome-format trace files: the JAX profiler's perfetto export
(``jax.profiler.trace(..., create_perfetto_trace=True)``) and ``torch.profiler``'s ``export_chrome_trace``, so that
both sides of a JAX-vs-PyTorch comparison are measured by the same clock (CUPTI's kernel start/end) and summarised
the same way. No JAX or PyTorch import here: either side's script can use it."""

from __future__ import annotations

import collections
import gzip
import json
import statistics


def read_trace_events(path: str) -> list[dict]:
    """The ``traceEvents`` of a Chrome trace file (``.json`` or ``.json.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def jax_device_events(events: list[dict]) -> list[dict]:
    """Complete ("X") events on the JAX trace's GPU device processes (each one kernel); [] if it has none (CPU)."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in processes.items() if "GPU" in name or "/device:" in name}
    return [e for e in events if e.get("ph") == "X" and e["pid"] in device]


def jax_host_events(events: list[dict]) -> list[dict]:
    """Complete ("X") events of every process of a JAX trace (the op-level timeline on a CPU-only host)."""
    return [e for e in events if e.get("ph") == "X"]


def torch_kernel_events(events: list[dict]) -> list[dict]:
    """The GPU kernels of a ``torch.profiler`` Chrome trace (category "kernel")."""
    return [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]


def kernel_summary(events: list[dict], calls: int) -> list[dict]:
    """One entry per kernel name, largest total first: ``name``, ``count``, ``median_us`` (one launch),
    ``us_per_call`` (total duration / ``calls``, the number of calls of the profiled function)."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    durations = collections.defaultdict(list)
    for e in events:
        durations[e["name"]].append(float(e.get("dur", 0.0)))
    rows = [
        dict(name=name, count=len(d), median_us=statistics.median(d), us_per_call=sum(d) / calls)
        for name, d in durations.items()
    ]
    return sorted(rows, key=lambda r: -r["us_per_call"])


def format_summary(rows: list[dict], top: int = 4, width: int = 60) -> str:
    """The ``top`` entries of :func:`kernel_summary` as ``name ×count median µs (µs a call)`` lines."""
    return "\n".join(
        f"    {r['name'][:width]:{width}s} x{r['count']:<5d} median {r['median_us']:8.2f} us  "
        f"({r['us_per_call']:8.2f} us a call)"
        for r in rows[:top]
    )
