"""Where a training step's device time goes, by place in the model: the step's kernels (JAX profiler, CUPTI) joined
with the optimized HLO (``xla_dump_to``) to give every kernel its bytes moved, its bandwidth and the Flax module it
came from, forward or backward.

    python benchmarks/step_attribution.py --model B [--batch 128] [--top 60] [--norm-impl pallas] \
        [--xla-option NAME=VALUE ...]

Prints the step time, the device's idle time inside it (gaps between kernels), the device time by (model place,
pass, kind) and the ``--top`` kernels with their GB/s, and writes everything as JSON (``--out``, or
``$OUT/attribution_<model>.json``) with the optimized HLO beside it (``*_hlo.txt.gz``). Inside XLA's command
buffers (CUDA graphs) the profiler names the buffer, not the instruction, for every kernel: run with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to attribute library calls too. The step is ``throughput.py``'s
training step (bf16 compute, float32 master weights, AdamW, donated state).
"""

import argparse
import collections
import glob
import json
import gzip
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hlo_costs  # noqa: E402
import kernel_trace  # noqa: E402
from throughput import SHORT, build_training, parse_compiler_options  # noqa: E402
from timing import median_seconds, op_kind, traced_events  # noqa: E402


def kernel_key(name: str) -> str:
    """HLO instruction names and the kernel names XLA gives them differ in separators (``fusion.3`` / ``fusion_3``)."""
    return name.replace(".", "_").replace("-", "_")


def device_kernels(run, args, trace_dir: str, calls: int) -> list[dict]:
    """The device kernel events of ``calls`` profiled calls of ``run(*args)``: name, start and duration (µs), and
    the HLO instruction the profiler names for it (``hlo_op``), if any. The calls are dispatched back to back and
    waited for once, as in the timed loop, so the gaps between them are the steady state's, not a cold dispatch's."""
    events = kernel_trace.jax_device_events(traced_events(run, args, trace_dir, calls, wait_each=False))
    return [
        dict(
            name=e["name"],
            start=float(e["ts"]),
            us=float(e.get("dur", 0.0)),
            hlo_op=(e.get("args") or {}).get("hlo_op"),
        )
        for e in events
    ]


def idle_gaps(kernels: list[dict], calls: int, top: int = 30) -> dict:
    """Time the device runs no kernel between the first kernel's start and the last one's end (all streams merged),
    µs a call, and the ``top`` longest gaps with the kernels either side of each."""
    spans = sorted((k["start"], k["start"] + k["us"], k["name"]) for k in kernels)
    if not spans:
        return dict(idle_us_per_call=0.0, gaps_over_5us_per_call=0.0, top=[])
    gaps, end, last = [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, last, name))
        if stop > end:
            end, last = stop, name
    gaps.sort(key=lambda g: -g[0])
    return dict(
        idle_us_per_call=sum(g[0] for g in gaps) / calls,
        gaps_over_5us_per_call=sum(g[0] > 5 for g in gaps) / calls,
        top=[dict(us=us, after=a, before=b) for us, a, b in gaps[:top]],
    )


def optimized_module(dump_dir: str) -> str:
    """Path of the largest ``*after_optimizations.txt`` in the dump (the training step's module)."""
    paths = glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
    if not paths:
        raise FileNotFoundError(f"no *after_optimizations.txt under {dump_dir}: XLA did not dump the module")
    return max(paths, key=os.path.getsize)


def attribute(kernels: list[dict], instructions: dict, calls: int) -> list[dict]:
    """One row per kernel name: µs a call, launches a call, the HLO instruction, bytes a launch, GB/s, model place."""
    by_key = {kernel_key(n): inst for n, inst in instructions.items()}
    rows = {}
    for k in kernels:
        op = k["hlo_op"] or ""
        inst = instructions.get(op) or by_key.get(kernel_key(op)) or by_key.get(kernel_key(k["name"]))
        key = (k["name"], inst.name if inst else None)
        row = rows.get(key)
        if row is None:
            path, backward = hlo_costs.origin(inst) if inst else ("", False)
            row = rows[key] = dict(
                kernel=k["name"],
                hlo=inst.name if inst else None,
                result=inst.result if inst else None,
                opcode=(inst.target or inst.opcode) if inst else None,
                bytes=inst.bytes if inst else 0,
                path=path,
                group=hlo_costs.group_of(path) if inst else "(unmatched)",
                backward=backward,
                kind=op_kind(k["name"]),
                us=0.0,
                launches=0,
            )
        row["us"] += k["us"]
        row["launches"] += 1
    out = []
    for row in rows.values():
        row["us_per_call"] = row.pop("us") / calls
        row["launches_per_call"] = row.pop("launches") / calls
        per_launch_us = row["us_per_call"] / max(row["launches_per_call"], 1e-9)
        row["gb_per_s"] = row["bytes"] / (per_launch_us * 1e3) if per_launch_us > 0 and row["bytes"] else None
        out.append(row)
    return sorted(out, key=lambda r: -r["us_per_call"])


def summarise(rows: list[dict]) -> dict:
    """µs a call by (group, pass, kind), and by kind alone."""
    places = collections.Counter()
    kinds = collections.Counter()
    for r in rows:
        places[(r["group"], "bwd" if r["backward"] else "fwd", r["kind"])] += r["us_per_call"]
        kinds[r["kind"]] += r["us_per_call"]
    return dict(
        places=[dict(group=g, pass_=p, kind=k, us=us) for (g, p, k), us in places.most_common()],
        kinds=dict(kinds.most_common()),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="B", choices=list(SHORT))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calls", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--norm-impl", default="xla", help="xla or pallas (LayerNorms with the residual update)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    dump_dir = tempfile.mkdtemp(prefix="mvj_hlo_")
    options = dict(parse_compiler_options(args.xla_option) or {}, xla_dump_to=dump_dir, xla_dump_hlo_as_text=True)
    overrides = dict(norm_impl=args.norm_impl)
    run, input_sets, compile_s, _ = build_training(
        SHORT[args.model], args.batch, jnp.bfloat16, args.size, overrides, options
    )
    seconds = median_seconds(run, input_sets, windows=5)
    kernels = device_kernels(run, input_sets[0], tempfile.mkdtemp(prefix="mvj_trace_"), args.calls)
    module_path = optimized_module(dump_dir)
    with open(module_path) as f:
        instructions = hlo_costs.link(hlo_costs.parse_module(f.read()))
    rows = attribute(kernels, instructions, args.calls)
    summary = summarise(rows)
    gaps = idle_gaps(kernels, args.calls)
    device_us = sum(r["us_per_call"] for r in rows)
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"attribution_{args.model}.json")
    with open(module_path, "rb") as src, gzip.open(os.path.splitext(out)[0] + "_hlo.txt.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    with open(out, "w") as f:
        json.dump(
            dict(device=jax.devices()[0].device_kind, jax=jax.__version__, model=args.model, batch=args.batch,
                 step_ms=1e3 * seconds, device_ms=device_us / 1e3, launches=len(kernels) / args.calls, gaps=gaps,
                 rows=rows, **summary),
            f,
            indent=1,
        )  # fmt: skip
    print(
        f"{jax.devices()[0].device_kind}: {args.model} training step bs{args.batch}: {1e3 * seconds:.2f} ms "
        f"({args.batch / seconds:.0f} img/s), device kernels {device_us / 1e3:.2f} ms, compile {compile_s:.0f} s"
    )
    print(
        f"{len(kernels) / args.calls:.0f} kernels a step; device idle {gaps['idle_us_per_call'] / 1e3:.2f} ms a step, "
        f"{gaps['gaps_over_5us_per_call']:.0f} gaps over 5 us; longest:"
    )
    for g in gaps["top"][:12]:
        print(f"  {g['us']:8.1f} us after {g['after'][:50]}  before {g['before'][:50]}")
    print("by kind:", ", ".join(f"{k} {us / 1e3:.2f} ms" for k, us in summary["kinds"].items()))
    print("by place (ms):")
    for p in summary["places"][:40]:
        print(f"  {p['us'] / 1e3:7.3f}  {p['group']:<28} {p['pass_']}  {p['kind']}")
    print(f"top {args.top} kernels:")
    for r in rows[: args.top]:
        gbs = f"{r['gb_per_s']:6.0f} GB/s" if r["gb_per_s"] else " " * 11
        result = (r["result"] or "")[:60]  # what the kernel writes: float32 activations show here
        print(
            f"  {r['us_per_call']:8.1f} us x{r['launches_per_call']:<4.0f} {gbs} {r['bytes'] / 1e6:8.1f} MB  "
            f"{'bwd' if r['backward'] else 'fwd'} {r['path'][:48]:<48} {r['kernel'][:50]} -> {result}"
        )


if __name__ == "__main__":
    main()
