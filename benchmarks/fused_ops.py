"""The stage-3/4 residual update + LayerNorm alone: XLA's ops (the model's default) against the fused Pallas kernels
(``norm_impl="pallas"``), forward and forward + backward, at MambaVision's shapes for batch 128 (tokens = 128 · 196
or 128 · 49).

    python benchmarks/fused_ops.py [--shapes B_stage3,B_stage4] [--kernel-times]

The op is B's (float32 stream, bf16 branch and output, layer scale, drop path's per-row factor) as
``add_layer_norm`` with impl "xla" and "pallas", at each shape's width.

Times are medians of timed windows over 3 input sets (``timing.median_seconds``), µs; ``--kernel-times`` adds the
device kernels of one forward+backward (JAX profiler). Each variant's output is compared with the first one's.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_trace  # noqa: E402
from mambavision_jax.pallas import layer_norm as ln  # noqa: E402
from timing import median_seconds, profile_kernels  # noqa: E402

SHAPES = {  # tag: (tokens, dim) at batch 128, 224²
    "T_stage3": (128 * 196, 320),
    "T_stage4": (128 * 49, 640),
    "B_stage3": (128 * 196, 512),
    "B_stage4": (128 * 49, 1024),
    "tiny": (256, 64),  # a CPU check of this script (the kernels in interpret mode)
}


def norm_variants(tokens, dim):
    """(params, input sets, {label: fn(params, (x, branch)) -> (x_new, normed)}) for B's residual update + LayerNorm
    at ``tokens`` rows of ``dim`` channels."""
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    params = dict(
        scale=1 + 0.1 * jax.random.normal(keys[0], (dim,)),
        bias=0.1 * jax.random.normal(keys[1], (dim,)),
        gamma=1e-5 * jnp.ones((dim,)),
    )
    inputs = [
        (jax.random.normal(keys[2 + i], (tokens, dim)), jax.random.normal(keys[5 + i], (tokens, dim), jnp.bfloat16))
        for i in range(3)
    ]
    row_scale = jnp.where(jnp.arange(tokens) % 7 == 0, 0.0, 1 / 0.9)  # as drop path's per-window factor would be

    def variant(impl):
        def fn(p, xb):
            return ln.add_layer_norm(
                xb[0], xb[1], scale=p["scale"], bias=p["bias"], gamma=p["gamma"], row_scale=row_scale,
                out_dtype=jnp.bfloat16, impl=impl,
            )  # fmt: skip

        return fn

    return params, inputs, {"xla": variant("xla"), "pallas": variant("pallas")}


def loss_of(fn):
    def loss(p, x):
        out = jax.tree.leaves(fn(p, x))
        return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in out)

    return loss


def time_variants(tag, params, inputs, variants, kernel_times):
    reference = None
    for label, fn in variants.items():
        forward = jax.jit(fn)
        both = jax.jit(jax.grad(loss_of(fn), argnums=(0, 1)))
        out = [o.astype(jnp.float32) for o in jax.tree.leaves(forward(params, inputs[0]))]
        reference = out if reference is None else reference
        error = max(float(jnp.max(jnp.abs(o - r)) / jnp.max(jnp.abs(r))) for o, r in zip(out, reference))
        fwd_us = 1e6 * median_seconds(forward, [(params, x) for x in inputs])
        both_us = 1e6 * median_seconds(both, [(params, x) for x in inputs])
        print(f"{tag} {label:<24} fwd {fwd_us:8.1f}  fwd+bwd {both_us:8.1f}  (vs first: max rel. diff {error:.1e})")
        if kernel_times:
            rows, _ = profile_kernels(both, (params, inputs[0]), f"/tmp/trace_fused_{tag}_{len(label)}")
            print(kernel_trace.format_summary(rows, top=8))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="B_stage3,B_stage4,T_stage3,T_stage4")
    parser.add_argument("--kernel-times", action="store_true")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, µs")
    for tag in args.shapes.split(","):
        tokens, dim = SHAPES[tag]
        time_variants(f"norm {tag}", *norm_variants(tokens, dim), args.kernel_times)


if __name__ == "__main__":
    main()
