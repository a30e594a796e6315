"""Small building blocks shared by the MambaVision modules: drop path, BatchNorm, window partitioning.

All tensors are channels-last. Images and feature maps are NHWC; token sequences are (batch, length, channels).
"""

import functools
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
        if keep <= 0.0:  # every sample dropped, as timm's; x / 0 below would make the gradients NaN
            return jnp.zeros_like(x)
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, mask_shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))

    def sample_scale(self, batch: int, deterministic: bool):
        """The per-sample factor ``__call__`` would apply, (batch,) float32 (0 or 1/keep), drawn as ``__call__``
        draws it (same RNG stream and shape), for ops that apply it themselves; None when inactive."""
        if deterministic or self.rate == 0.0:
            return None
        keep = 1.0 - self.rate
        if keep <= 0.0:  # every sample dropped (1 / keep below would raise)
            return jnp.zeros((batch,), jnp.float32)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (batch,))
        return jnp.where(mask, 1.0 / keep, 0.0).astype(jnp.float32)


def channel_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over every axis but the last, in float32: (..., C) -> (C,), (C,)."""
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    return mean, jnp.maximum(jnp.mean(xf * xf, axes) - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
    """BatchNorm with the batch's own statistics: (..., C) -> (..., C) in ``dtype``, statistics over every axis but
    the last; ``scale`` and ``bias`` (C,) float32. The arithmetic is float32 whatever ``x``'s dtype.

    Its VJP is written out: two per-channel sums (dy and dy·x̂) and one float32 pass for dx,
    dx = scale·rstd·(dy − mean(dy) − x̂·mean(dy·x̂)). Autodiff of the same forward gives three full-size reductions
    and dx as a sum of two terms rounded to the compute dtype. The written one made MambaVision-B's and -T's bf16
    training steps 0.6-2.2 % faster (H100, ``benchmarks/NOTES.md`` session 23). Reverse mode only (a
    ``custom_vjp``).
    """
    return _batch_norm_train_forward(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_train_forward(x, scale, bias, epsilon, dtype):
    mean, var = channel_statistics(x)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x.astype(jnp.float32) - mean) * (scale * rstd) + bias
    return y.astype(dtype), (x, mean, rstd, scale)


def _batch_norm_train_backward(epsilon, dtype, residuals, dy):
    del epsilon, dtype
    x, mean, rstd, scale = residuals
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    dyf = dy.astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    sum_dy = jnp.sum(dyf, axes)
    sum_dy_x_hat = jnp.sum(dyf * x_hat, axes)
    dx = (scale * rstd) * (dyf - sum_dy / count - x_hat * (sum_dy_x_hat / count))
    return dx.astype(x.dtype), sum_dy_x_hat, sum_dy


batch_norm_train.defvjp(_batch_norm_train_forward, _batch_norm_train_backward)


class BatchNorm(nn.Module):
    """BatchNorm over the last (channel) axis as ``torch.nn.BatchNorm2d`` computes it. (..., C) -> (..., C).

    Variables as ``flax.linen.BatchNorm``'s, all float32: params ``scale`` and ``bias`` (C,), batch_stats ``mean``
    and ``var`` (C,). In training the batch's statistics normalise (:func:`batch_norm_train`) and the running ones
    move by 0.1 of the way (``momentum`` 0.9 in flax's convention), the variance unbiased, as torch updates them; in
    eval the running statistics normalise. The output has the compute ``dtype``.
    """

    epsilon: float
    dtype: Dtype = jnp.float32
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
        if not train:
            multiplier = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
            return ((x.astype(jnp.float32) - running_mean.value) * multiplier + bias).astype(self.dtype)
        count = x.size // channels
        if count < 2:
            raise ValueError(f"BatchNorm in training needs more than 1 value per channel, got input shape {x.shape}")
        if not self.is_initializing():
            # the same reductions as inside batch_norm_train: XLA computes them once (CSE)
            mean, var = channel_statistics(jax.lax.stop_gradient(x))
            keep = self.momentum
            running_mean.value = keep * running_mean.value + (1 - keep) * mean
            running_var.value = keep * running_var.value + (1 - keep) * var * (count / (count - 1))
        return batch_norm_train(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int, int]]:
    """Split an NHWC map into row-major windows, zero-padding right and bottom as the official code does.

    Args:
      x: (B, H, W, C).
      window: window side ws.
    Returns:
      tokens (B * nH * nW, ws * ws, C), windows ordered (batch, window row, window column) and tokens inside a
      window row-major; and the padded layout (B, Hp, Wp) that :func:`window_reverse` takes. The sizes may be
      symbolic (``jax.export`` shape polymorphism): a symbolic padding is applied whatever it comes to.
    """
    b, h, w, c = x.shape
    pad_b, pad_r = (-h) % window, (-w) % window
    if not all(isinstance(pad, int) and pad == 0 for pad in (pad_b, pad_r)):
        x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w + pad_r
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (hp // window) * (wp // window), window * window, c), (b, hp, wp)


def window_reverse(
    tokens: jax.Array, window: int, layout: tuple[int, int, int], size: tuple[int, int]
) -> jax.Array:
    """Inverse of :func:`window_partition`: (B * nH * nW, ws * ws, C) -> (B, H, W, C) for its ``layout`` (B, Hp,
    Wp), cropping the padding to ``size`` (H, W)."""
    b, hp, wp = layout
    c = tokens.shape[-1]
    x = tokens.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, : size[0], : size[1], :]


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
