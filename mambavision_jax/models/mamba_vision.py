"""MambaVision (Hatamizadeh & Kautz, arXiv 2407.08083) as Flax linen modules.

The module tree mirrors the official PyTorch model one to one (``patch_embed``, ``levels_i/blocks_j``,
``mixer``, ``norm``, ``head``), so the official state_dict maps onto it by renaming alone
(:mod:`mambavision_jax.weights.params`). Everything is channels-last: images and maps NHWC, token sequences
(batch, length, channels). Parameters and BatchNorm statistics are float32; ``dtype`` sets the compute dtype.
"""

import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mambavision_jax.models.layers import BatchNorm, Conv3x3, DropPath, gelu_erf, window_partition, window_reverse
from mambavision_jax.pallas import selective_scan
from mambavision_jax.pallas.layer_norm import IMPLS as NORM_IMPLS
from mambavision_jax.pallas.layer_norm import add_layer_norm, residual_update

MLP_IMPLS = ("xla", "mosaic")

Dtype = Any
D_STATE = 8  # the official Block builds every mixer with d_state=8, d_conv=3, expand=1
D_CONV = 3
_KERNEL_INIT = nn.initializers.truncated_normal(0.02)  # every Linear's weight, as the official _init_weights


def _dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_KERNEL_INIT,
        name=name,
    )


def conv_channel_multiple(setting: Optional[int], dtype: Dtype) -> int:
    """The multiple the 3x3 convs pad their channel counts to: ``setting`` if given, else 8 for 16-bit compute on
    GPU (cuDNN's tensor-core kernels want channels in multiples of 8 and otherwise pad every call themselves,
    13 % of MambaVision-L's inference time on an H100) and 1 (no padding) elsewhere."""
    if setting is not None:
        if setting < 1:
            raise ValueError(f"conv_channel_multiple must be >= 1; got {setting}")
        return setting
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return 8
    return 1


class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 convs with BatchNorm (eps 1e-4) and ReLU. (B, H, W, 3) -> (B, H/4, W/4, dim)."""

    in_dim: int
    dim: int
    dtype: Dtype = jnp.float32
    channel_multiple: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv3x3(self.in_dim, 2, False, self.channel_multiple, self.dtype, name="conv_down_0")(x)
        x = nn.relu(BatchNorm(1e-4, self.dtype, name="conv_down_1")(x, train))
        x = Conv3x3(self.dim, 2, False, self.channel_multiple, self.dtype, name="conv_down_3")(x)
        return nn.relu(BatchNorm(1e-4, self.dtype, name="conv_down_4")(x, train))


class ConvBlock(nn.Module):
    """Residual block of stages 1-2: conv-BN-GELU(tanh)-conv-BN, optional layer scale ``gamma``. NHWC."""

    dim: int
    drop_path: float = 0.0
    layer_scale: Optional[float] = None
    dtype: Dtype = jnp.float32
    channel_multiple: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = x
        x = Conv3x3(self.dim, 1, True, self.channel_multiple, self.dtype, name="conv1")(x)
        x = nn.gelu(BatchNorm(1e-5, self.dtype, name="norm1")(x, train), approximate=True)
        x = Conv3x3(self.dim, 1, True, self.channel_multiple, self.dtype, name="conv2")(x)
        x = BatchNorm(1e-5, self.dtype, name="norm2")(x, train)
        if self.layer_scale is not None:
            x = x * self.param("gamma", nn.initializers.constant(self.layer_scale), (self.dim,), jnp.float32)
        return shortcut + DropPath(self.drop_path)(x, deterministic=not train)


class DtProjection(nn.Module):
    """``dt_proj``: Linear(dt_rank -> features) that also returns its bias, which the scan adds a second time."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", _KERNEL_INIT, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
        return y, bias


class DepthwiseConv1d(nn.Module):
    """Non-causal depthwise conv1d, kernel 3, zero 'same' padding, no bias, on (B, L, C) tokens.

    Written as three shifted multiply-adds (which XLA fuses with the neighbouring elementwise ops) instead of a
    grouped convolution. ``kernel`` is (3, 1, C), the layout of ``nn.Conv(feature_group_count=C)``.
    """

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bound = 1.0 / math.sqrt(D_CONV)  # torch's default Conv1d init for fan_in = 3
        kernel = self.param("kernel", _uniform(bound), (D_CONV, 1, self.channels), jnp.float32)
        w = kernel[:, 0, :].astype(self.dtype)
        padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
        return padded[:, :-2] * w[0] + padded[:, 1:-1] * w[1] + padded[:, 2:] * w[2]


def _uniform(bound: float):
    """Initializer drawing from U(-bound, bound)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class MambaVisionMixer(nn.Module):
    """The MambaVision token mixer on (B, L, C) tokens (d_state 8, d_conv 3, expand 1).

    in_proj splits C into an SSM half x and a gate half z (C/2 each); both go through a non-causal depthwise
    conv1d (k 3, no bias) and SiLU; x drives the selective scan (dt bias applied twice, as in the official
    code), and z is concatenated to the scan output (not multiplied) before out_proj.
    """

    dim: int
    scan_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        half = self.dim // 2
        dt_rank = math.ceil(self.dim / 16)
        a_log = self.param(
            "A_log",
            lambda _, s: jnp.log(jnp.broadcast_to(jnp.arange(1, D_STATE + 1, dtype=jnp.float32), s)),
            (half, D_STATE),
        )
        skip = self.param("D", nn.initializers.ones, (half,), jnp.float32)

        xz = _dense(self.dim, "in_proj", self.dtype, use_bias=False)(tokens)
        x, z = xz[..., :half], xz[..., half:]
        x = nn.silu(DepthwiseConv1d(half, self.dtype, name="conv1d_x")(x))
        z = nn.silu(DepthwiseConv1d(half, self.dtype, name="conv1d_z")(z))
        x_dbl = _dense(dt_rank + 2 * D_STATE, "x_proj", self.dtype, use_bias=False)(x)
        dt, b, c = jnp.split(x_dbl, [dt_rank, dt_rank + D_STATE], axis=-1)
        dt, dt_bias = DtProjection(half, self.dtype, name="dt_proj")(dt)
        y = selective_scan(x, dt, -jnp.exp(a_log), b, c, skip, dt_bias, delta_softplus=True, impl=self.scan_impl)
        return _dense(self.dim, "out_proj", self.dtype, use_bias=False)(jnp.concatenate([y, z], axis=-1))


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, C) tokens: qkv with bias, no positional terms, scale hd^-0.5, and dropout
    ``drop`` after ``proj`` in training (the official ``proj_drop``, which the model's ``drop_rate`` sets)."""

    dim: int
    num_heads: int
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    drop: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        b, n, _ = tokens.shape
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide the stage's {self.dim} channels")
        head_dim = self.dim // self.num_heads
        qkv = _dense(3 * self.dim, "qkv", self.dtype)(tokens).reshape(b, n, 3, self.num_heads, head_dim)
        out = jax.nn.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self._implementation(head_dim, n, train)
        )  # (B,N,h,hd)
        out = _dense(self.dim, "proj", self.dtype)(out.reshape(b, n, self.dim))
        return nn.Dropout(self.drop)(out, deterministic=not train)

    def _implementation(self, head_dim: int, length: int, train: bool) -> Optional[str]:
        """``jax.nn.dot_product_attention`` implementation: "xla", "cudnn", or for "auto" cuDNN's fused kernel
        where it applies (GPU, 16-bit, head_dim a multiple of 8 up to 128; in training only for even sequence
        lengths: cuDNN's fused backward refused MambaVision's stage-4 windows of 49 tokens, "Unsupported sequence
        length Q 49, KV 49", jax 0.11.2 on an H200) and XLA elsewhere."""
        if self.attention_impl == "auto":
            fused = (
                jax.default_backend() == "gpu"
                and jnp.dtype(self.dtype) in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0
                and head_dim <= 128
                and (not train or length % 2 == 0)
            )
            return "cudnn" if fused else "xla"
        if self.attention_impl not in ("xla", "cudnn"):
            raise ValueError(f"attention_impl must be 'auto', 'xla' or 'cudnn'; got {self.attention_impl!r}")
        return self.attention_impl


class LayerNormParams(nn.Module):
    """The parameters of ``nn.LayerNorm(param_dtype=float32)``: ``scale`` (ones) and ``bias`` (zeros), (features,),
    returned instead of applied, for :func:`add_layer_norm`."""

    @nn.compact
    def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        return scale, self.param("bias", nn.initializers.zeros, (features,), jnp.float32)


class DenseParams(nn.Module):
    """The parameters of :func:`_dense` (``kernel`` (in, features), ``bias`` (features,), float32), returned
    instead of applied, for the fused MLP."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", _KERNEL_INIT, (in_features, self.features), jnp.float32)
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


class Mlp(nn.Module):
    """timm Mlp: fc1 -> exact GELU -> dropout -> fc2 -> dropout, on (B, N, C).

    ``impl="mosaic"`` runs fc1 + GELU and, in training, fc2's input gradient + GELU' as Pallas Mosaic GPU kernels
    (:mod:`mambavision_jax.pallas.mosaic_mlp`; Hopper GPUs, 16-bit ``dtype``, no dropout in training) wherever the
    B·N token rows tile, and as XLA elsewhere; same parameters as "xla". Off a GPU the kernels run under Mosaic
    GPU's interpreter, which is for tests: slow."""

    dim: int
    hidden: int
    drop: float = 0.0
    dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.impl == "mosaic":
            return self._fused(x, train)
        if self.impl != "xla":
            raise ValueError(f"mlp_impl must be one of {', '.join(MLP_IMPLS)}; got {self.impl!r}")
        x = gelu_erf(_dense(self.hidden, "fc1", self.dtype)(x))
        x = nn.Dropout(self.drop)(x, deterministic=not train)
        x = _dense(self.dim, "fc2", self.dtype)(x)
        return nn.Dropout(self.drop)(x, deterministic=not train)

    def _fused(self, x: jax.Array, train: bool) -> jax.Array:
        # Imported here: Mosaic GPU's Python side need not exist where the package is only used with "xla".
        from mambavision_jax.pallas import mosaic_mlp

        if jnp.dtype(self.dtype).itemsize != 2:
            raise ValueError(f"mlp_impl='mosaic' needs a 16-bit compute dtype; got {jnp.dtype(self.dtype).name}")
        if train and self.drop > 0:
            raise ValueError(f"mlp_impl='mosaic' has no dropout inside the MLP; got drop={self.drop} in training")
        w1, b1 = DenseParams(self.hidden, name="fc1")(x.shape[-1])
        w2, b2 = DenseParams(self.dim, name="fc2")(self.hidden)
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        cast = [w.astype(self.dtype) for w in (w1, w2)]
        interpret = None if jax.default_backend() == "gpu" else mosaic_mlp.interpret_params()
        out = mosaic_mlp.gelu_mlp(rows, cast[0], b1, cast[1], b2, interpret)
        return out.reshape(*x.shape[:-1], self.dim)


class PendingUpdate(NamedTuple):
    """A residual update not applied yet: ``stream + row_scale · gamma · branch`` (absent factors are None)."""

    stream: jax.Array  # (B, N, C)
    branch: Optional[jax.Array]  # (B, N, C)
    gamma: Optional[jax.Array]  # (C,) layer scale
    row_scale: Optional[jax.Array]  # (B * N,) drop path's factor, per token row


def apply_pending(x) -> jax.Array:
    """The stream with a :class:`PendingUpdate` applied (a plain array is returned as it is)."""
    if not isinstance(x, PendingUpdate) or x.branch is None:
        return x.stream if isinstance(x, PendingUpdate) else x
    b, n, c = x.stream.shape
    row_scale = None if x.row_scale is None else x.row_scale.reshape(b * n)
    flat = residual_update(x.stream.reshape(b * n, c), x.branch.reshape(b * n, c), x.gamma, row_scale)
    return flat.reshape(b, n, c)


def _row_scale(drop_path: DropPath, batch: int, length: int, train: bool) -> Optional[jax.Array]:
    """Drop path's per-sample factor repeated over each sample's ``length`` token rows, (batch * length,)."""
    scale = drop_path.sample_scale(batch, deterministic=not train)
    return None if scale is None else jnp.repeat(scale, length)


class Block(nn.Module):
    """Pre-norm residual block of stages 3-4 with a Mamba mixer or attention, then an MLP. (B, N, C)."""

    dim: int
    num_heads: int
    use_attention: bool
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    drop: float = 0.0
    layer_scale: Optional[float] = None
    scan_impl: str = "auto"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    norm_impl: str = "xla"
    mlp_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        """(B, N, C) tokens -> (B, N, C). With ``norm_impl="pallas"`` the block takes and returns a
        :class:`PendingUpdate` (or takes a plain array first): its last residual update is left to the next block's
        norm1 kernel, and the stage applies the last one (:func:`apply_pending`)."""
        if self.norm_impl not in NORM_IMPLS:
            raise ValueError(f"norm_impl must be one of {', '.join(NORM_IMPLS)}; got {self.norm_impl!r}")
        drop_path = DropPath(self.drop_path)
        if self.use_attention:
            mixer = Attention(self.dim, self.num_heads, self.attention_impl, self.dtype, self.drop, name="mixer")
        else:
            mixer = MambaVisionMixer(self.dim, self.scan_impl, self.dtype, name="mixer")
        mlp = Mlp(self.dim, int(self.dim * self.mlp_ratio), self.drop, self.dtype, self.mlp_impl, name="mlp")
        if self.norm_impl == "pallas":
            return self._fused(x, mixer, mlp, drop_path, train)
        normed = self._layer_norm("norm1")(x)
        branch = mixer(normed, train) if self.use_attention else mixer(normed)
        x = x + drop_path(self._scale("gamma_1", branch), deterministic=not train)
        branch = mlp(self._layer_norm("norm2")(x), train)
        return x + drop_path(self._scale("gamma_2", branch), deterministic=not train)

    def _fused(self, x, mixer: nn.Module, mlp: nn.Module, drop_path: DropPath, train: bool) -> "PendingUpdate":
        """The block with :func:`add_layer_norm` for norm1 (taking the previous block's pending update) and for
        norm2 (taking the mixer's), returning the MLP's update pending."""
        pending = x if isinstance(x, PendingUpdate) else PendingUpdate(x, None, None, None)
        b, n, c = pending.stream.shape
        scale, bias = LayerNormParams(name="norm1")(c)
        stream, normed = self._add_layer_norm(pending, scale, bias)
        branch = mixer(normed, train) if self.use_attention else mixer(normed)
        update = PendingUpdate(stream, branch, self._gamma("gamma_1"), _row_scale(drop_path, b, n, train))
        scale, bias = LayerNormParams(name="norm2")(c)
        stream, normed = self._add_layer_norm(update, scale, bias)
        branch = mlp(normed, train)
        return PendingUpdate(stream, branch, self._gamma("gamma_2"), _row_scale(drop_path, b, n, train))

    def _add_layer_norm(self, pending: "PendingUpdate", scale: jax.Array, bias: jax.Array):
        return add_layer_norm(
            pending.stream,
            pending.branch,
            scale=scale,
            bias=bias,
            gamma=pending.gamma,
            row_scale=pending.row_scale,
            eps=1e-5,
            out_dtype=self.dtype,
            impl="pallas",
        )

    def _layer_norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name)

    def _gamma(self, name: str) -> Optional[jax.Array]:
        """The layer-scale parameter ``name`` (dim,), or None without layer scale."""
        if self.layer_scale is None:
            return None
        return self.param(name, nn.initializers.constant(self.layer_scale), (self.dim,), jnp.float32)

    def _scale(self, name: str, x: jax.Array) -> jax.Array:
        gamma = self._gamma(name)
        return x if gamma is None else x * gamma


def attention_block_indices(depth: int) -> range:
    """Indices of the attention blocks in a stage of ``depth`` blocks: the second half (smaller half if odd)."""
    return range(depth // 2 + 1, depth) if depth % 2 else range(depth // 2, depth)


class MambaVisionLayer(nn.Module):
    """One stage (``levels_i``). Conv stages run ConvBlocks on NHWC maps; the others pad the map right/bottom
    to a multiple of the window, run Blocks on row-major windows, reverse and crop. Returns the stage output
    before the downsample and the downsampled map (or None for the last stage)."""

    dim: int
    depth: int
    num_heads: int
    window_size: int
    conv: bool
    downsample: bool
    drop_path: Sequence[float]
    mlp_ratio: float = 4.0
    drop: float = 0.0
    layer_scale: Optional[float] = None
    layer_scale_conv: Optional[float] = None
    scan_impl: str = "auto"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    channel_multiple: int = 1
    norm_impl: str = "xla"
    mlp_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, Optional[jax.Array]]:
        if self.conv:
            for j in range(self.depth):
                x = ConvBlock(
                    self.dim,
                    self.drop_path[j],
                    self.layer_scale_conv,
                    self.dtype,
                    self.channel_multiple,
                    name=f"blocks_{j}",
                )(x, train)
        else:
            size = x.shape[1:3]
            tokens, layout = window_partition(x, self.window_size)
            attention = attention_block_indices(self.depth)
            for j in range(self.depth):
                tokens = Block(
                    self.dim,
                    self.num_heads,
                    j in attention,
                    self.mlp_ratio,
                    self.drop_path[j],
                    self.drop,
                    self.layer_scale,
                    self.scan_impl,
                    self.attention_impl,
                    self.dtype,
                    self.norm_impl,
                    self.mlp_impl,
                    name=f"blocks_{j}",
                )(tokens, train)
            x = window_reverse(apply_pending(tokens), self.window_size, layout, size)
        if not self.downsample:
            return x, None
        return x, Downsample(self.dim, self.dtype, self.channel_multiple, name="downsample")(x)


class Downsample(nn.Module):
    """``downsample.reduction.0``: stride-2 3x3 conv doubling the channels, no norm. NHWC."""

    dim: int
    dtype: Dtype = jnp.float32
    channel_multiple: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv3x3(2 * self.dim, 2, False, self.channel_multiple, self.dtype, name="reduction_0")(x)


class MambaVision(nn.Module):
    """The MambaVision classifier. ``__call__(images (B, H, W, 3), train=False) -> logits (B, num_classes)``.

    Any image size works: stages 3-4 pad to a multiple of their window (no masking), as the official model.
    ``forward_features`` gives the pooled (B, 8*dim) features after the final BatchNorm and
    ``forward_intermediates`` the four pre-downsample stage maps (NHWC), for backbone use. ``norm_impl="pallas"``
    runs the stage-3/4 LayerNorms with the mixer's residual update as Pallas row kernels
    (:mod:`mambavision_jax.pallas.layer_norm`); opt-in, and on an H200 no faster than the XLA default
    (``benchmarks/NOTES.md`` session 15). ``mlp_impl="mosaic"`` fuses the MLPs' GELU into Pallas Mosaic GPU
    GEMMs (:class:`Mlp`; Hopper GPUs, 16-bit ``dtype``).
    """

    depths: Sequence[int]
    num_heads: Sequence[int]
    window_size: Sequence[int]
    dim: int
    in_dim: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    drop_rate: float = 0.0
    layer_scale: Optional[float] = None
    layer_scale_conv: Optional[float] = None
    num_classes: int = 1000
    in_chans: int = 3
    scan_impl: str = "auto"
    attention_impl: str = "auto"
    conv_channel_multiple: Optional[int] = None
    dtype: Dtype = jnp.float32
    norm_impl: str = "xla"
    mlp_impl: str = "xla"

    def setup(self):
        total = sum(self.depths)
        rates = [self.drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        channel_multiple = conv_channel_multiple(self.conv_channel_multiple, self.dtype)
        self.patch_embed = PatchEmbed(self.in_dim, self.dim, self.dtype, channel_multiple)
        levels, start = [], 0
        for i, depth in enumerate(self.depths):
            levels.append(
                MambaVisionLayer(
                    dim=self.dim * 2**i,
                    depth=depth,
                    num_heads=self.num_heads[i],
                    window_size=self.window_size[i],
                    conv=i < 2,
                    downsample=i < len(self.depths) - 1,
                    drop_path=tuple(rates[start : start + depth]),
                    mlp_ratio=self.mlp_ratio,
                    drop=self.drop_rate,
                    layer_scale=self.layer_scale,
                    layer_scale_conv=self.layer_scale_conv,
                    scan_impl=self.scan_impl,
                    attention_impl=self.attention_impl,
                    dtype=self.dtype,
                    channel_multiple=channel_multiple,
                    norm_impl=self.norm_impl,
                    mlp_impl=self.mlp_impl,
                    name=f"levels_{i}",
                )
            )
            start += depth
        self.levels = levels
        self.norm = BatchNorm(1e-5, self.dtype)
        if self.num_classes > 0:
            self.head = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=_KERNEL_INIT,
            )

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, in_chans) float images -> (B, num_classes) logits (pooled features if num_classes == 0)."""
        pooled = self.forward_features(images, train)
        if self.num_classes == 0:
            return pooled
        return self.head(pooled.astype(self.dtype)).astype(jnp.float32)

    def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, in_chans) -> (B, 8 * dim) float32: final BatchNorm then global average pool."""
        x = self._stages(images, train)[1]
        x = self.norm(x, train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def forward_intermediates(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
        """(B, H, W, in_chans) -> the 4 stage outputs before each downsample, NHWC (strides 4, 8, 16, 32)."""
        return self._stages(images, train)[0]

    def _stages(self, images: jax.Array, train: bool) -> tuple[list[jax.Array], jax.Array]:
        self._check_images(images)
        x = self.patch_embed(images.astype(self.dtype), train)
        features = []
        for level in self.levels:
            feature, downsampled = level(x, train)
            features.append(feature)
            x = downsampled if downsampled is not None else feature
        return features, x

    def _check_images(self, images: jax.Array) -> None:
        if images.ndim != 4:
            raise ValueError(
                f"MambaVision expects a batch of NHWC images of rank 4 (B, H, W, {self.in_chans}); "
                f"got shape {tuple(images.shape)}."
            )
        if images.shape[-1] != self.in_chans:
            hint = (
                " It looks like NCHW: transpose to NHWC with x.transpose(0, 2, 3, 1)."
                if images.shape[1] == self.in_chans
                else ""
            )
            raise ValueError(
                f"MambaVision expects {self.in_chans} channels in the last axis (NHWC); got shape "
                f"{tuple(images.shape)}.{hint}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"MambaVision expects floating-point images normalised with the model's mean/std; "
                f"got dtype {images.dtype}. Convert uint8 images with (x / 255 - mean) / std."
            )
