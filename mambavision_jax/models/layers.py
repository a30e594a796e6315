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
