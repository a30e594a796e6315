"""Small building blocks shared by the MambaVision modules: drop path, BatchNorm, window partitioning.

All tensors are channels-last. Images and feature maps are NHWC; token sequences are (batch, length, channels).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``): zeroes whole residual branches, rescales the rest.

    Active only when ``deterministic`` is False and ``rate`` > 0; draws from the ``"dropout"`` RNG stream.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, mask_shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))

    def sample_scale(self, batch: int, deterministic: bool):
        """The per-sample factor ``__call__`` would apply, (batch,) float32 (0 or 1/keep), drawn as ``__call__``
        draws it (same RNG stream and shape), for ops that apply it themselves; None when inactive."""
        if deterministic or self.rate == 0.0:
            return None
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (batch,))
        return jnp.where(mask, 1.0 / keep, 0.0).astype(jnp.float32)


def batch_norm(name: str, epsilon: float, dtype: Dtype, train: bool) -> nn.BatchNorm:
    """BatchNorm over the last (channel) axis matching ``torch.nn.BatchNorm2d`` (momentum 0.1 == flax 0.9).

    Statistics and affine parameters are float32 whatever the compute dtype.
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name
    )


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """Split an NHWC map into row-major windows, zero-padding right and bottom as the official code does.

    Args:
      x: (B, H, W, C).
      window: window side ws.
    Returns:
      tokens (B * nH * nW, ws * ws, C), windows ordered (batch, window row, window column) and tokens inside a
      window row-major; and the padded size (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_b, pad_r = (-h) % window, (-w) % window
    if pad_b or pad_r:
        x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w + pad_r
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c), (hp, wp)


def window_reverse(tokens: jax.Array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`window_partition`: (B * nH * nW, ws * ws, C) -> (B, H, W, C), cropping the padding."""
    hp, wp = padded
    c = tokens.shape[-1]
    x = tokens.reshape(-1, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, c)[:, : size[0], : size[1], :]


def padded_channels(channels: int, multiple: int) -> int:
    """``channels`` rounded up to ``multiple``; counts below ``multiple`` (the image's 3 channels) stay as they are."""
    if channels < multiple:
        return channels
    return -(-channels // multiple) * multiple


class Conv3x3(nn.Module):
    """3x3 convolution, padding 1, NHWC, as ``nn.Conv2d(k=3, padding=1)``; parameters as ``nn.Conv``'s
    (``kernel`` (3, 3, in, out) HWIO, ``bias`` (out,)), float32 whatever the compute dtype.

    With ``channel_multiple`` > 1 the convolution itself runs on channel counts padded up to that multiple (zero
    input channels, zero kernel rows and columns) and the output is sliced back, so the caller and the parameters
    keep the true counts. XLA fuses the pad into the producer and the slice into the consumer, which spares cuDNN
    its own padding pass on every call.
    """

    features: int
    stride: int = 1
    use_bias: bool = True
    channel_multiple: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, in) -> (B, ceil(H / stride), ceil(W / stride), features)."""
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, in_features, self.features), jnp.float32)
        pad_in = padded_channels(in_features, self.channel_multiple) - in_features
        pad_out = padded_channels(self.features, self.channel_multiple) - self.features
        kernel = jnp.pad(kernel.astype(self.dtype), ((0, 0), (0, 0), (0, pad_in), (0, pad_out)))
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, 0), (0, 0), (0, pad_in)))
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.stride, self.stride),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )[..., : self.features]
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU as ``torch.nn.GELU()`` computes it, x/2 · (1 + erf(x/√2)), in float32, returned in x's dtype.

    ``jax.nn.gelu(approximate=False)`` goes through erfc, which XLA expands into two polynomial branches, an exp
    and two divisions: on an H100 that made the MLPs' GELU compute-bound and 14 % of MambaVision-T's inference
    time. erf is one rational polynomial, and the fusion stays memory-bound.
    """
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * 0.7071067811865476))).astype(x.dtype)
