"""Times the MLP with GELU fused into Mosaic GPU GEMMs (mambavision_jax.pallas.mosaic_mlp) against XLA's, on a card.

    python benchmarks/mosaic_mlp.py [--shapes B3,B4,T3,T4] [--batch 128] [--sweep]

For each stage-3/4 MLP shape of MambaVision-T/B (224x224 images, ``--batch`` images) a row gives µs a call, median
of timed windows (``timing.median_seconds``), of:
- ``fc1``: fc1 + bias + GELU alone, XLA (cuBLAS GEMM, then a bias + GELU pass) against :func:`dense_gelu`;
- ``mlp_forward``: the whole MLP, as inference runs it;
- ``mlp_train``: the MLP's forward and backward (``jax.vjp`` with a fixed cotangent), as the training step runs it;
- ``gelu_grad``: fc2's input-gradient GEMM with GELU's backward, XLA against :func:`matmul_gelu_grad`;
and each Mosaic result's largest difference from XLA's, relative to XLA's largest magnitude (``*_rel_err``).
``--sweep`` also times :func:`dense_gelu` and :func:`matmul_gelu_grad` under each tiling of ``SWEEP``.
Results go to $OUT/mosaic_mlp.json (or ``--out``).
"""

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mambavision_jax.models.layers import gelu_erf  # noqa: E402
from mambavision_jax.pallas import mosaic_mlp  # noqa: E402
from mambavision_jax.pallas.mosaic_mlp import Tiling  # noqa: E402
from timing import median_seconds  # noqa: E402

SHAPES = {  # name: (rows an image, C, hidden): the stage-3/4 MLPs at 224x224 (14x14 and 7x7 tokens an image)
    "T3": (196, 320, 1280),
    "T4": (49, 640, 2560),
    "B3": (196, 512, 2048),
    "B4": (49, 1024, 4096),
}

SWEEP = [
    Tiling(split=split, stages=stages, epilogue_n=epilogue_n, snake=snake)
    for split in ("m", "n")
    for stages, epilogue_n in ((3, 64), (4, 32), (3, 32))
    for snake in (4, 16)
] + [Tiling(tile_m=64, tile_n=256, split="m", stages=3, epilogue_n=32)]


def _label(t: Tiling) -> str:
    return f"t{t.tile_m}x{t.tile_n}x{t.tile_k}_s{t.stages}_e{t.epilogue_n}_{t.split}_w{t.snake}"


def _time_us(f, *args) -> float:
    return 1e6 * median_seconds(f, [args])


def _rel_err(got, want) -> float:
    got, want = (np.asarray(jnp.asarray(a, jnp.float32)) for a in (got, want))
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _operands(name: str, batch: int):
    rows, c, hidden = SHAPES[name]
    m = rows * batch
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    bf16 = jnp.bfloat16
    x = jax.random.normal(keys[0], (m, c), bf16)
    w1 = (jax.random.normal(keys[1], (c, hidden)) / np.sqrt(c)).astype(bf16)
    b1 = 0.1 * jax.random.normal(keys[2], (hidden,))
    w2 = (jax.random.normal(keys[3], (hidden, c)) / np.sqrt(hidden)).astype(bf16)
    b2 = 0.1 * jax.random.normal(keys[4], (c,))
    dy = jax.random.normal(keys[5], (m, c), bf16)
    return x, w1, b1, w2, b2, dy


def _train(mlp):
    """fwd + bwd of ``mlp`` with a fixed output cotangent: (y, dx, dw1, db1, dw2, db2)."""

    def step(x, w1, b1, w2, b2, dy):
        y, pullback = jax.vjp(mlp, x, w1, b1, w2, b2)
        return (y, *pullback(dy))

    return jax.jit(step)


def _compare(row, label, xla_fn, mosaic_fn, args):
    """Times both, records Mosaic's relative error against XLA (each output), or the failure."""
    row[f"{label}_xla_us"] = _time_us(xla_fn, *args)
    try:
        row[f"{label}_mosaic_us"] = _time_us(mosaic_fn, *args)
        want, got = xla_fn(*args), mosaic_fn(*args)
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        row[f"{label}_rel_err"] = max(_rel_err(g, w) for g, w in zip(got, want))
    except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and goes on
        row[f"{label}_mosaic_us"] = f"{type(e).__name__}: {str(e)[:300]}"


def _sweep(row, x, w1, b1, dy, w2, h):
    for t in SWEEP:
        for label, f, args in (
            ("fc1", functools.partial(mosaic_mlp.dense_gelu, tiling=t), (x, w1, b1)),
            ("gelu_grad", functools.partial(mosaic_mlp.matmul_gelu_grad, tiling=t), (dy, w2.T, h)),
        ):
            try:
                row[f"{label}_{_label(t)}_us"] = _time_us(jax.jit(f), *args)
            except Exception as e:  # noqa: BLE001
                row[f"{label}_{_label(t)}_us"] = f"{type(e).__name__}: {str(e)[:120]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="B3,B4,T3,T4")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true", help="also time each kernel under every tiling of SWEEP")
    args = parser.parse_args()
    results = {}
    for name in args.shapes.split(","):
        x, w1, b1, w2, b2, dy = _operands(name, args.batch)
        row = dict(m=x.shape[0], c=x.shape[1], hidden=w1.shape[1])
        h = (jnp.dot(x, w1) + b1.astype(x.dtype)).astype(x.dtype)
        _compare(row, "fc1", jax.jit(lambda x, w, b: gelu_erf(jnp.dot(x, w) + b.astype(x.dtype))),
                 jax.jit(mosaic_mlp.dense_gelu), (x, w1, b1))
        _compare(row, "mlp_forward", jax.jit(mosaic_mlp.gelu_mlp_xla), jax.jit(mosaic_mlp.gelu_mlp),
                 (x, w1, b1, w2, b2))
        _compare(row, "mlp_train", _train(mosaic_mlp.gelu_mlp_xla), _train(mosaic_mlp.gelu_mlp),
                 (x, w1, b1, w2, b2, dy))
        _compare(row, "gelu_grad", jax.jit(mosaic_mlp.matmul_gelu_grad_xla), jax.jit(mosaic_mlp.matmul_gelu_grad),
                 (dy, w2.T, h))
        if args.sweep:
            _sweep(row, x, w1, b1, dy, w2, h)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    path = args.out or os.path.join(os.environ.get("OUT", "/tmp"), "mosaic_mlp.json")
    with open(path, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, batch=args.batch, results=results),
                  f, indent=1)


if __name__ == "__main__":
    main()
