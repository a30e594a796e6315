"""Selective-scan benchmark: numerics check, then forward and forward+backward timings per impl.

  python benchmarks/scan.py [--impls pallas,associative,sequential] [--sweep] [--out results.json]
  python benchmarks/scan.py --impls associative,sequential --quick        # CPU smoke test

1. Numerics: every impl vs a float64 host reference (the forward alone, which for pallas is the inference kernel;
   the forward under vjp and the 7 gradients; fresh random inputs) at the MambaVision-T stage-3/4 shapes (batch 8),
   float32 and bfloat16; pallas also with one lane a channel, unprefetched, its sequence split in 4.
2. Timing at batch 128, d_state 8, softplus + delta_bias + D (MambaVision's call), float32 and bfloat16:
   T/B/L stage 3 (L 196; dim 160/256/392) and stage 4 (L 49; dim 320/512/784). jax.jit, warm-up excluded,
   median over timed windows; each window cycles through several input sets (> L2) and ends in
   block_until_ready. Achieved bandwidth = bytes that must move / time, as a fraction of the measured
   device-to-device copy bandwidth. --kernel-times also profiles each forward once and reports its kernels'
   durations (CUPTI), the scan kernel's alone next to the harness's small ones, read as
   ``mamba_ssm_scan.py --kernel-times`` reads mamba_ssm's.
3. --sweep: pallas KernelConfig variants (math, prefetch, splits, chunk, block_d) at --sweep-shapes; or those of
   --sweep-configs ("chunk=16,state_groups=2;chunk=8,state_groups=2,prefetch=False", fields of
   KernelConfig), each also checked against float64 at the numerics shapes first; --sweep-forward-only times (and
   checks) the forward alone, which is where the grouped inference kernels' fields apply.

JSON (to --out, else $OUT/scan.json if $OUT is set) is rewritten after every section: keys "results" (one row per
shape/dtype/impl with shape tag e.g. "T_stage3", fwd_us, fwdbwd_us), "numerics", "sweep", "sweep_best".
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mambavision_jax.pallas import KernelConfig, default_config, selective_scan, selective_scan_pallas  # noqa: E402
from mambavision_jax.pallas.testing import ARG_NAMES, make_inputs, reference_float64, rel_err  # noqa: E402
from scan_shapes import INNER_REPS, N_STATE, SHAPES  # noqa: E402
import kernel_trace  # noqa: E402
from timing import median_seconds, profile_kernels  # noqa: E402

QUICK_SHAPES = {"tiny_L196": (2, 196, 24), "tiny_L49": (2, 49, 40)}
TOL = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 3e-2)}


def scan_fn(impl, config=None, interpret=False):
    """(args) -> y, MambaVision's call (softplus, bias, D)."""
    if impl == "pallas":
        return lambda *a: selective_scan_pallas(*a, delta_softplus=True, config=config, interpret=interpret)
    return lambda *a: selective_scan(*a, delta_softplus=True, impl=impl)


def fwd_and_fwdbwd(impl, config=None, interpret=False):
    f = scan_fn(impl, config, interpret)

    def fwdbwd(args, dy):
        y, vjp = jax.vjp(f, *args)
        return y, vjp(dy)

    return jax.jit(lambda args, dy: f(*args)), jax.jit(fwdbwd)


def in_jit_repeated(single):
    """``jit(sets)`` calling ``single(args, dy)`` on every input set INNER_REPS times inside one XLA program, so
    the host's per-call dispatch (tens of µs, more than the kernel itself at these shapes) is amortised as it is
    inside a model's jit. A scalar carried into ``D`` keeps XLA from hoisting or merging the calls; every output
    feeds the carry (small ones whole, large ones by one element) so nothing is dead-code eliminated."""

    def run(sets):
        def body(_, carry):
            for args, dy in sets:
                args = tuple(a + carry.astype(a.dtype) if i == 5 else a for i, a in enumerate(args))
                for leaf in jax.tree.leaves(single(args, dy)):
                    big = leaf.size >= dy.size
                    carry = carry + 0.0 * (leaf.ravel()[0] if big else jnp.sum(leaf)).astype(jnp.float32)
            return carry

        return jax.lax.fori_loop(0, INNER_REPS, body, jnp.float32(0))

    return jax.jit(run)


def time_us(fn, input_sets, windows=7):
    """Median µs per call of ``fn`` (see :func:`timing.median_seconds`)."""
    return 1e6 * median_seconds(fn, input_sets, min_window_s=0.02, windows=windows)


def copy_bandwidth(n_bytes):
    """Device-to-device bandwidth (bytes/s) of a large elementwise copy (x + 1: read + write)."""
    x = jnp.zeros((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v + 1.0)
    return 2 * n_bytes / (time_us(f, [(x,)], windows=5) * 1e-6)


def bytes_moved(batch, length, dim, dtype, chunk):
    """Minimal HBM traffic: fwd reads u, Δ, B, C and writes y; fwd+bwd adds the saved chunk states (written,
    read), dy read, u, Δ, B, C re-read, and du, dΔ, dB, dC written."""
    item = jnp.dtype(dtype).itemsize
    row, bc = batch * length * dim * item, batch * length * N_STATE * item
    states = batch * -(-length // chunk) * dim * N_STATE * 4
    fwd = 3 * row + 2 * bc
    return fwd, fwd + 2 * states + (2 * row + 2 * bc) + row + (2 * row + 2 * bc)


def input_sets(shape, dtype, count, seed):
    batch, length, dim = shape
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        args = make_inputs(rng, batch, length, dim, N_STATE, dtype)
        dy = jnp.asarray(rng.normal(0.0, 1.0, (batch, length, dim)), dtype)
        out.append((args, dy))
    return out


def numerics(impls, shapes, interpret, seed, log, extra_configs=(), forward_only=False):
    """Rows of relative errors against float64 for every impl (pallas with its defaults and a split one-lane
    config, plus ``extra_configs``); ``forward_only`` checks the extra configs' forward alone."""
    rows = []
    for (tag, (_, length, dim)), dtype in itertools.product(shapes.items(), ("float32", "bfloat16")):
        batch = min(8, shapes[tag][0])
        rng = np.random.default_rng([seed, 99])
        args = make_inputs(rng, batch, length, dim, N_STATE, jnp.dtype(dtype))
        dy = jnp.asarray(rng.normal(0.0, 1.0, (batch, length, dim)), dtype)
        y_ref, g_ref = reference_float64(args, dy, softplus=True)
        fwd_tol, grad_tol = TOL[dtype]
        variants = [(impl, None, False) for impl in impls]
        if "pallas" in impls:
            variants.append(("pallas", KernelConfig(chunk=4, prefetch=False, splits=4), False))
        variants += [("pallas", config, forward_only) for config in extra_configs]
        for impl, config, only_forward in variants:
            forward, forward_backward = fwd_and_fwdbwd(impl, config, interpret=interpret)
            # the forward alone: for pallas the inference kernel
            errs = {"y_inference": rel_err(forward(args, dy), y_ref)}
            if not only_forward:
                y, grads = forward_backward(args, dy)
                errs["y"] = rel_err(y, y_ref)
                errs.update({f"d{n}": rel_err(g, r) for n, g, r in zip(ARG_NAMES, grads, g_ref)})
            ok = all(v <= (fwd_tol if k.startswith("y") else grad_tol) for k, v in errs.items())
            label = impl if config is None else f"{impl}/{_cfg_str(config)}"
            rows.append({"shape": tag, "batch": batch, "dtype": dtype, "impl": label, "ok": ok, "rel_err": errs})
            log(
                f"numerics {tag} b{batch} {dtype:8s} {label:12s} {'OK  ' if ok else 'FAIL'} "
                + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            )
    return rows


def timing(
    impls,
    shapes,
    dtypes,
    n_sets,
    seed,
    bw,
    interpret,
    log,
    configs=None,
    deadline=None,
    forward_only=False,
    kernel_times=False,
):
    """One row per (shape, dtype, impl[, config]); errors are recorded, not raised. ``forward_only`` skips the
    forward+backward timing. ``kernel_times``: the forward is also profiled once, and its kernels' durations
    (CUPTI, as ``mamba_ssm_scan.py --kernel-times`` reads mamba_ssm's) go to ``fwd_kernels``; ``fwd_kernel_us`` is
    the median launch of the kernel with the largest total (the scan; the harness's own small kernels are listed
    after it)."""
    rows = []
    for (tag, shape), dtype in itertools.product(shapes.items(), dtypes):
        sets = input_sets(shape, jnp.dtype(dtype), n_sets, seed)
        for impl in impls:
            for config in (configs or [None]) if impl == "pallas" else [None]:
                if deadline is not None and time.time() > deadline:
                    log("time budget exhausted; skipping the rest")
                    return rows
                defaults = impl == "pallas" and config is None  # inference and training defaults may differ
                cfg = default_config(*shape, training=True, d_state=N_STATE) if defaults else config
                row = {
                    "shape": tag,
                    "batch": shape[0],
                    "length": shape[1],
                    "dim": shape[2],
                    "dtype": dtype,
                    "impl": impl,
                    "config": None if cfg is None else vars(cfg),
                }
                label = "" if cfg is None else _cfg_str(cfg)
                if defaults:
                    inference = default_config(*shape, d_state=N_STATE)
                    row["config_inference"] = vars(inference)
                    label = f"{_cfg_str(inference)}/{label}"
                try:
                    f = scan_fn(impl, config, interpret)
                    fwd = in_jit_repeated(lambda args, dy, f=f: f(*args))
                    fwdbwd = in_jit_repeated(lambda args, dy, f=f: jax.vjp(f, *args)[1](dy))
                    calls = INNER_REPS * len(sets)
                    fb, fbb = bytes_moved(*shape, dtype, cfg.chunk if cfg else 8)
                    row["fwd_us"] = time_us(fwd, [(sets,)]) / calls
                    row["fwd_bw_frac"] = fb / (row["fwd_us"] * 1e-6) / bw
                    line = f"{tag:9s} {dtype:8s} {impl:12s} {label:14s} fwd {row['fwd_us']:9.1f} us "
                    line += f"({row['fwd_bw_frac']:.0%} bw)"
                    kernel_lines = ""
                    if kernel_times:
                        trace_dir = os.path.join("/tmp", f"scan_trace_{tag}_{dtype}_{impl}_{label.replace('/', '_')}")
                        kernels, on_device = profile_kernels(fwd, (sets,), trace_dir, calls=1, inner_calls=calls)
                        if on_device:
                            row["fwd_kernels"], row["fwd_kernel_us"] = kernels, kernels[0]["median_us"]
                            line += f", kernel {row['fwd_kernel_us']:.1f} us"
                            kernel_lines = "\n" + kernel_trace.format_summary(kernels)
                        else:
                            kernel_lines = "\n    (no device timeline in the trace: kernel times need a GPU)"
                    if not forward_only:
                        row["fwdbwd_us"] = time_us(fwdbwd, [(sets,)]) / calls
                        row["fwdbwd_bw_frac"] = fbb / (row["fwdbwd_us"] * 1e-6) / bw
                        line += f"  fwd+bwd {row['fwdbwd_us']:9.1f} us ({row['fwdbwd_bw_frac']:.0%} bw)"
                    log(line + kernel_lines)
                except Exception as e:  # pylint: disable=broad-except
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"{tag} {dtype} {impl} {cfg}: ERROR {row['error']}")
                rows.append(row)
    return rows


def _cfg_str(cfg):
    flags = ("" if cfg.prefetch else "-nopf") + ("" if cfg.fast_math else "-exact")
    bwd = f"-bd{cfg.bwd_block_d}" if cfg.bwd_block_d else ""
    if cfg.state_groups is not None:
        return f"g{cfg.state_groups}k{cfg.chunk}{flags}"
    return f"d{cfg.block_d}k{cfg.chunk}w{cfg.num_warps}x{cfg.splits}{flags}{bwd}"


def sweep_configs():
    """The training defaults and their neighbours (one lane a channel, 1-10 segments), then the inference forward's
    grouped kernel (1, 2 or 4 lanes a channel; its forward+backward column times the one-lane training kernels of the
    same chunk), and exact math for reference."""
    K = KernelConfig
    return [
        K(chunk=4, prefetch=False, splits=7),
        K(chunk=4, prefetch=False, splits=4),
        K(chunk=4, prefetch=False, splits=10),
        K(chunk=4, prefetch=True, splits=7),
        K(chunk=8, prefetch=False, splits=7),
        K(chunk=16, prefetch=True),
        K(chunk=16, state_groups=2),
        K(chunk=16, state_groups=1),
        K(chunk=8, state_groups=2),
        K(chunk=32, state_groups=2),
        K(chunk=16, state_groups=2, prefetch=False),
        K(chunk=8, state_groups=4),
        K(chunk=4, prefetch=False, splits=7, fast_math=False),
    ]


def parse_configs(spec):
    """``"field=value,...;..."`` -> KernelConfigs (values parsed as Python literals)."""
    configs = []
    for item in filter(None, spec.split(";")):
        fields = dict(pair.split("=", 1) for pair in item.split(","))
        configs.append(KernelConfig(**{k.strip(): ast.literal_eval(v.strip()) for k, v in fields.items()}))
    return configs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="pallas,associative,sequential")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default=",".join(SHAPES), help="subset of " + ",".join(SHAPES))
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-shapes", default="T_stage3,T_stage4")
    p.add_argument("--sweep-dtypes", default="float32")
    p.add_argument("--sweep-configs", default="", help="KernelConfigs to sweep instead of the built-in list")
    p.add_argument("--sweep-forward-only", action="store_true", help="sweep (and check) the forward alone")
    p.add_argument(
        "--kernel-times", action="store_true", help="also profile each forward: its kernels' durations (CUPTI)"
    )
    p.add_argument("--sets", type=int, default=4, help="input sets cycled per timed window (defeats L2)")
    p.add_argument("--budget-s", type=float, default=540, help="stop timing after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 input sets (CPU smoke test)")
    p.add_argument("--interpret", action="store_true", help="run pallas in interpret mode (CPU)")
    p.add_argument("--skip-numerics", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    start = time.time()
    deadline = start + a.budget_s
    seed = a.seed if a.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    impls = [i for i in a.impls.split(",") if i]
    if "pallas" in impls and jax.default_backend() != "gpu" and not a.interpret:
        print("pallas needs a GPU (or --interpret); dropping it")
        impls.remove("pallas")
    shapes = QUICK_SHAPES if a.quick else {k: SHAPES[k] for k in a.shapes.split(",")}
    sweep_shapes = QUICK_SHAPES if a.quick else {k: SHAPES[k] for k in a.sweep_shapes.split(",")}
    out_path = a.out or (os.path.join(os.environ["OUT"], "scan.json") if os.environ.get("OUT") else None)
    log = lambda s: print(s, flush=True)

    device = jax.devices()[0]
    bw = copy_bandwidth(2**24 if a.quick else 2**30)
    report = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "seed": seed,
        "copy_bw_GBps": bw / 1e9,
        "impls": impls,
        "numerics": [],
        "results": [],
        "sweep": [],
        "sweep_best": {},
    }
    log(
        f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, seed {seed}, "
        f"copy bandwidth {bw / 1e9:.1f} GB/s"
    )

    def save():
        if out_path:
            with open(out_path, "w") as f:
                json.dump(report, f, indent=1)

    swept = (parse_configs(a.sweep_configs) if a.sweep_configs else sweep_configs()) if a.sweep else []
    if not a.skip_numerics:
        num_shapes = QUICK_SHAPES if a.quick else {k: SHAPES[k] for k in ("T_stage3", "T_stage4")}
        checked = swept if a.sweep_configs else ()
        report["numerics"] = numerics(impls, num_shapes, a.interpret, seed, log, checked, a.sweep_forward_only)
        save()
    n_sets = 2 if a.quick else a.sets
    report["results"] = timing(
        impls,
        shapes,
        a.dtypes.split(","),
        n_sets,
        seed,
        bw,
        a.interpret,
        log,
        deadline=deadline,
        kernel_times=a.kernel_times,
    )
    save()
    if a.sweep and "pallas" in impls:
        report["sweep"] = timing(
            ["pallas"],
            sweep_shapes,
            a.sweep_dtypes.split(","),
            n_sets,
            seed,
            bw,
            a.interpret,
            log,
            configs=swept,
            deadline=deadline,
            forward_only=a.sweep_forward_only,
            kernel_times=a.kernel_times,
        )
        for key in ("fwd_us", "fwdbwd_us"):
            for tag in sweep_shapes:
                for dtype in a.sweep_dtypes.split(","):
                    ok = [r for r in report["sweep"] if r["shape"] == tag and r["dtype"] == dtype and key in r]
                    if ok:
                        best = min(ok, key=lambda r: r[key])
                        report["sweep_best"][f"{tag}/{dtype}/{key}"] = {"config": best["config"], key: best[key]}
        save()

    # Compact summary (the device tool returns only the tail of the output).
    print(
        "\n== numerics: "
        + (
            "all OK"
            if all(r["ok"] for r in report["numerics"])
            else "FAILURES: "
            + ", ".join(f"{r['shape']}/{r['dtype']}/{r['impl']}" for r in report["numerics"] if not r["ok"])
        )
    )
    print(f"== {device.device_kind}, copy bw {bw / 1e9:.1f} GB/s; times in us (fraction of copy bw)")
    print(f"{'shape':9s} {'dtype':8s} " + " ".join(f"{i + ' fwd':>17s} {i + ' f+b':>17s}" for i in impls))
    for tag, dtype in itertools.product(shapes, a.dtypes.split(",")):
        cells = []
        for impl in impls:
            r = next((r for r in report["results"] if (r["shape"], r["dtype"], r["impl"]) == (tag, dtype, impl)), {})
            for key in ("fwd", "fwdbwd"):
                cells.append(
                    f"{r[key + '_us']:9.1f} ({r[key + '_bw_frac']:4.0%})" if key + "_us" in r else f"{'-':>17s}"
                )
        print(f"{tag:9s} {dtype:8s} " + " ".join(f"{c:>17s}" for c in cells))
    for k, v in report["sweep_best"].items():
        key = k.rsplit("/", 1)[1]
        print(f"sweep best {k}: {v[key]:.1f} us with {_cfg_str(KernelConfig(**v['config']))}")
    print(f"total {time.time() - start:.0f} s" + (f"; JSON: {out_path}" if out_path else ""))


if __name__ == "__main__":
    main()
