"""The stage-3/4 MLPs alone: XLA's ops (the model's default) against the fused GELU GEMMs, forward and
forward + backward, bf16, at MambaVision's shapes for batch 128 (tokens = 128 · 196 or 128 · 49).

    python benchmarks/gelu_mlp.py [--shapes B_stage3,B_stage4] [--tiles 128x128x64w8s3,128x64x64w4s3] [--kernel-times]

Each ``--tiles`` entry is ``{block_m}x{block_n}x{block_k}w{num_warps}s{num_stages}`` for the Pallas GEMMs. Times are
medians of timed windows over 3 input sets (``timing.median_seconds``); ``--kernel-times`` adds the device kernels of
one forward+backward (JAX profiler). The XLA side is the model's ``Mlp`` (bf16 Dense layers, erf GELU in float32).
"""

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_trace  # noqa: E402
from mambavision_jax.models.mamba_vision import Mlp  # noqa: E402
from mambavision_jax.pallas import gelu_mlp as gm  # noqa: E402
from timing import median_seconds, profile_kernels  # noqa: E402

SHAPES = {  # tag: (tokens, dim, hidden) at batch 128, 224²
    "T_stage3": (128 * 196, 320, 1280),
    "T_stage4": (128 * 49, 640, 2560),
    "B_stage3": (128 * 196, 512, 2048),
    "B_stage4": (128 * 49, 1024, 4096),
    "tiny": (256, 64, 256),  # a CPU check of this script (the kernels in interpret mode)
}


def parse_tiles(text: str) -> gm.GemmTiles:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not match:
        raise ValueError(f"--tiles wants e.g. 128x128x64w8s3, got {text!r}")
    return gm.GemmTiles(*map(int, match.groups()))


def variants(dim: int, hidden: int, tiles: list[gm.GemmTiles]):
    """``{label: apply(params, x)}``: the model's XLA Mlp and the fused MLP with each tile choice, same params."""
    mlp = Mlp(dim, hidden, dtype=jnp.bfloat16)
    out = {"xla": lambda p, x: mlp.apply({"params": p}, x, train=False)}
    for t in tiles:

        def fused(p, x, t=t):
            bf16 = jnp.bfloat16
            w1, w2 = p["fc1"]["kernel"].astype(bf16), p["fc2"]["kernel"].astype(bf16)
            return gm.gelu_mlp(x, w1, p["fc1"]["bias"], w2, p["fc2"]["bias"], impl="pallas", tiles=t)

        out[f"pallas {t.block_m}x{t.block_n}x{t.block_k}w{t.num_warps}s{t.num_stages}"] = fused
    return mlp, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="B_stage3,B_stage4,T_stage3,T_stage4")
    parser.add_argument("--tiles", default="128x128x64w8s3,128x128x64w4s3,128x64x64w4s4,64x128x64w4s3")
    parser.add_argument("--kernel-times", action="store_true")
    args = parser.parse_args()
    tiles = [parse_tiles(t) for t in args.tiles.split(",") if t]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, µs")
    for tag in args.shapes.split(","):
        tokens, dim, hidden = SHAPES[tag]
        mlp, fns = variants(dim, hidden, tiles)
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        params = mlp.init(keys[0], jnp.zeros((1, dim), jnp.bfloat16), train=False)["params"]
        inputs = [jax.random.normal(k, (tokens, dim), jnp.bfloat16) for k in keys[1:]]
        reference = None
        for label, fn in fns.items():
            forward = jax.jit(fn)
            both = jax.jit(jax.grad(lambda p, x, fn=fn: jnp.sum(fn(p, x).astype(jnp.float32) ** 2), argnums=(0, 1)))
            y = forward(params, inputs[0]).astype(jnp.float32)
            reference = y if reference is None else reference
            error = float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))
            fwd_us = 1e6 * median_seconds(forward, [(params, x) for x in inputs])
            both_us = 1e6 * median_seconds(both, [(params, x) for x in inputs])
            print(f"{tag} {label:<24} fwd {fwd_us:8.1f}  fwd+bwd {both_us:8.1f}  (vs xla: max|dy|/max|y| {error:.1e})")
            if args.kernel_times:
                rows, _ = profile_kernels(both, (params, inputs[0]), f"/tmp/trace_gelu_mlp_{tag}_{len(label)}")
                print(kernel_trace.format_summary(rows, top=8))


if __name__ == "__main__":
    main()
