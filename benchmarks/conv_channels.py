"""The conv stages' 3x3 convolutions on their own, by channel count: forward, and the backward's input and kernel
gradients, µs a call and TFLOP/s, NHWC, C -> C channels, padding 1, at a batch and spatial size.

    python benchmarks/conv_channels.py [--batch 128] [--dtype bfloat16] \
        [--shapes "56:64,72,80,88,96,112,128;28:128,160,176,192,224,256"]

``--shapes`` lists ``size:channels`` groups (``;``-separated): the defaults are MambaVision-T's stage 1 (80 channels
at 56²) and stage 2 (160 at 28²) among their neighbours, with B's 128 and 256. It answers whether padding the
channels (the models' ``conv_channel_multiple``) could pay: on an H100 in session 27, T's 80-channel conv took 92 %
of the time of B's 128-channel one for 39 % of the FLOPs. Each figure is the median of timed windows after
compilation and cuDNN's autotuning. Writes JSON (``--out``, or ``$OUT/conv_channels.json``).
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import median_seconds  # noqa: E402

DEFAULT_SHAPES = "56:64,72,80,88,96,112,128;28:128,160,176,192,224,256"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"56:64,80;28:160"`` -> ``[(56, 64), (56, 80), (28, 160)]`` (spatial size, channels)."""
    shapes = []
    for group in (g.strip() for g in text.split(";") if g.strip()):
        size, _, channels = group.partition(":")
        if not channels:
            raise ValueError(f"--shapes group {group!r} is not size:channels[,channels...]")
        shapes += [(int(size), int(c)) for c in channels.split(",") if c.strip()]
    return shapes


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(B, H, W, C) NHWC, (3, 3, C, C') HWIO -> (B, H, W, C'), stride 1, padding 1 (the models' Conv3x3)."""
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)


def conv_flops(batch: int, size: int, channels: int) -> float:
    """Multiply-adds x 2 of one C -> C 3x3 convolution over a (batch, size, size, C) map."""
    return 2.0 * batch * size * size * channels * channels * 9


def time_convolution(batch: int, size: int, channels: int, dtype) -> dict:
    """µs of the forward and of the backward (input and kernel gradients, from ``jax.vjp``) and their TFLOP/s."""
    keys = jax.random.split(jax.random.PRNGKey(channels), 3)
    x = jax.random.normal(keys[0], (batch, size, size, channels), dtype)
    kernel = (0.05 * jax.random.normal(keys[1], (3, 3, channels, channels))).astype(dtype)
    cotangent = jax.random.normal(keys[2], (batch, size, size, channels), dtype)
    forward = jax.jit(conv3x3)
    backward = jax.jit(lambda x, k, g: jax.vjp(conv3x3, x, k)[1](g))
    forward_us = 1e6 * median_seconds(forward, [(x, kernel)])
    backward_us = 1e6 * median_seconds(backward, [(x, kernel, cotangent)])  # XLA drops the unused forward
    flops = conv_flops(batch, size, channels)
    return dict(
        size=size,
        channels=channels,
        forward_us=forward_us,
        backward_us=backward_us,
        forward_tflops=flops / forward_us / 1e6,
        backward_tflops=2 * flops / backward_us / 1e6,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="size:channels groups, ';'-separated")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    rows = []
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}, {dtype.name}")
    print(f"{'size':>5s} {'C':>5s} {'fwd µs':>9s} {'TFLOP/s':>8s} {'bwd µs':>9s} {'TFLOP/s':>8s}")
    for size, channels in parse_shapes(args.shapes):
        r = time_convolution(args.batch, size, channels, dtype)
        rows.append(r)
        print(
            f"{size:5d} {channels:5d} {r['forward_us']:9.1f} {r['forward_tflops']:8.1f} {r['backward_us']:9.1f} "
            f"{r['backward_tflops']:8.1f}",
            flush=True,
        )
    out = args.out or os.path.join(os.environ.get("OUT", "."), "conv_channels.json")
    with open(out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, batch=args.batch, dtype=dtype.name, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
