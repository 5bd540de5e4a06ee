"""Convolutional blocks of the HART tokenizer (VAR / LDM style), NHWC.

Dimensions (docs/design.md): B batch; H height; W width; C channels; L tokens (H*W positions).
Parameter names mirror the PyTorch modules (``norm1``, ``conv1``, ``nin_shortcut``,
``qkv``, ``proj_out``...) so the converter's table stays readable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hart_jax.layers.resample import nearest_upsample2x

Dtype = Any
PrecisionLike = Any


def group_norm(name: str | None = None, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm(``groups`` groups (the release: 32), eps 1e-6, affine), two-pass variance as PyTorch."""
    return nn.GroupNorm(
        num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32, name=name
    )


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: Any = "SAME_TORCH",
    dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    name: str | None = None,
) -> nn.Conv:
    """A Conv2d with bias; ``SAME_TORCH`` means symmetric padding ``kernel // 2``."""
    if padding == "SAME_TORCH":
        p = kernel // 2
        padding = ((p, p), (p, p))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        precision=precision,
        name=name,
    )


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(silu(GN(conv1(silu(GN(x))))))``; 1x1 shortcut iff in != out."""

    in_channels: int
    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    groups: int = 32

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.norm1 = group_norm(groups=self.groups)
        self.conv1 = conv(self.out_channels, 3, **kw)
        self.norm2 = group_norm(groups=self.groups)
        self.conv2 = conv(self.out_channels, 3, **kw)
        self.drop = nn.Dropout(self.dropout)
        if self.in_channels != self.out_channels:
            self.nin_shortcut = conv(self.out_channels, 1, **kw)

    def __call__(self, x_BHWC: jax.Array, deterministic: bool = True) -> jax.Array:
        h = self.conv1(nn.silu(self.norm1(x_BHWC)).astype(self.dtype))
        h = nn.silu(self.norm2(h)).astype(self.dtype)
        h = self.conv2(self.drop(h, deterministic=deterministic))
        if self.in_channels != self.out_channels:
            x_BHWC = self.nin_shortcut(x_BHWC)
        return x_BHWC + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, logits scaled by ``C ** -0.5``."""

    channels: int
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    groups: int = 32

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.norm = group_norm(groups=self.groups)
        self.qkv = conv(3 * self.channels, 1, **kw)
        self.proj_out = conv(self.channels, 1, **kw)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        qkv = self.qkv(self.norm(x_BHWC).astype(self.dtype)).reshape(b, h * w, 3 * c)
        q_BLC, k_BLC, v_BLC = jnp.split(qkv, 3, axis=-1)
        logits = jnp.einsum("bqc,bkc->bqk", q_BLC, k_BLC, precision=self.precision)
        probs = jax.nn.softmax(logits.astype(jnp.float32) * (int(c) ** -0.5), axis=-1)
        out_BLC = jnp.einsum(
            "bqk,bkc->bqc", probs.astype(v_BLC.dtype), v_BLC, precision=self.precision
        )
        return x_BHWC + self.proj_out(out_BLC.reshape(b, h, w, c))


class Downsample2x(nn.Module):
    """Pad right/bottom by one zero, then 3x3 conv stride 2 (no other padding)."""

    channels: int
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return conv(
            self.channels,
            3,
            stride=2,
            padding=((0, 1), (0, 1)),
            dtype=self.dtype,
            precision=self.precision,
            name="conv",
        )(x_BHWC)


class Upsample2x(nn.Module):
    """Nearest x2 then 3x3 conv (padding 1)."""

    channels: int
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return conv(self.channels, 3, dtype=self.dtype, precision=self.precision, name="conv")(
            nearest_upsample2x(x_BHWC)
        )
