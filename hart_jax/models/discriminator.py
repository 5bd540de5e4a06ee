"""The release's PatchGAN discriminator (taming ``NLayerDiscriminator``) in Flax Linen, NHWC.

Dimensions (docs/design.md):
  B batch; H height (image); W width (image); h small height (the patch logits map);
  w small width; C channels.

Layout (``n_layers=3``, ``ndf=64``; the index of each module in torch's ``main``
Sequential is the Flax submodule name ``main_<i>``, so the converter is a table):
  main_0  conv 4x4 s2 p1, 3 -> ndf, bias;             (1 LeakyReLU 0.2)
  main_2  conv 4x4 s2 p1, ndf -> 2ndf, no bias;  main_3 norm;  (4 LeakyReLU)
  main_5  conv 4x4 s2 p1, 2ndf -> 4ndf, no bias; main_6 norm;  (7 LeakyReLU)
  main_8  conv 4x4 s1 p1, 4ndf -> 8ndf, no bias; main_9 norm;  (10 LeakyReLU)
  main_11 conv 4x4 s1 p1, 8ndf -> 1, bias.
Channel multipliers are ``min(2**n, 8)``. ``norm="batch"`` (the release) is
``TorchBatchNorm``; ``"group"`` (GroupNorm, 32 groups or fewer) and ``"none"`` keep the
same indices and give the convs a bias, as taming does for non-BatchNorm layers.

Input: images ``[B, Hi, Wi, 3]`` in [-1, 1]; output: patch logits ``[B, h, w, 1]`` fp32.
Initialisation follows taming's ``weights_init``: conv kernels normal(0, 0.02), norm
scales normal(1, 0.02), biases 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
PrecisionLike = Any

NORMS = ("batch", "group", "none")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN hyper-parameters (defaults = the release's discriminator)."""

    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {self.norm!r}")
        if self.n_layers < 1 or self.ndf < 1:
            raise ValueError(f"discriminator needs ndf >= 1 and n_layers >= 1, got ndf={self.ndf} n_layers={self.n_layers}")

    def channels(self) -> list[int]:
        """Output channels of the convs before the last one."""
        return [self.ndf * min(2**n, 8) for n in range(self.n_layers + 1)]

    def conv_indices(self) -> list[int]:
        """Indices in torch's ``main`` of every conv (first, middle ones, last)."""
        return [0] + [2 + 3 * i for i in range(self.n_layers)] + [2 + 3 * self.n_layers]

    def norm_indices(self) -> list[int]:
        """Indices in torch's ``main`` of the norm layers (one after each middle conv)."""
        return [3 + 3 * i for i in range(self.n_layers)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiscriminatorConfig":
        """Build from a dict; unknown fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TorchBatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` over NHWC: train mode normalises with the biased batch
    variance (two-pass, fp32) and updates the running stats with momentum 0.1, the
    variance unbiased (``n / (n - 1)``) as torch does; eval mode uses the running stats.
    Params ``scale`` / ``bias``, ``batch_stats`` ``mean`` / ``var`` (Flax's names)."""

    features: int
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, use_running_average: bool) -> jax.Array:
        c = self.features
        scale = self.param("scale", lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s, jnp.float32), (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x = x_BHWC.astype(jnp.float32)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x_BHWC.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: images ``[B, Hi, Wi, C]`` -> logits ``[B, h, w, 1]`` (see the module docstring).

    ``train=True`` uses batch statistics and updates ``batch_stats`` (apply with
    ``mutable=["batch_stats"]``); ``train=False`` uses the running statistics.
    """

    cfg: DiscriminatorConfig = DiscriminatorConfig()
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def _conv(self, features: int, stride: int, bias: bool, index: int) -> nn.Conv:
        return nn.Conv(
            features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=bias,
            dtype=self.dtype, precision=self.precision, kernel_init=nn.initializers.normal(0.02),
            bias_init=nn.initializers.zeros, name=f"main_{index}",
        )

    def _norm(self, features: int, index: int) -> Any:
        if self.cfg.norm == "batch":
            return TorchBatchNorm(features, name=f"main_{index}")
        if self.cfg.norm == "group":
            return nn.GroupNorm(
                num_groups=min(32, features), epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32,
                scale_init=lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d), name=f"main_{index}",
            )
        return None

    @nn.compact
    def __call__(self, img_BHWC: jax.Array, train: bool = True) -> jax.Array:
        cfg = self.cfg
        chs = cfg.channels()
        conv_at, norm_at = cfg.conv_indices(), cfg.norm_indices()
        bias = cfg.norm != "batch"
        h = self._conv(chs[0], 2, True, conv_at[0])(img_BHWC.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        for n in range(1, cfg.n_layers + 1):
            stride = 2 if n < cfg.n_layers else 1
            h = self._conv(chs[n], stride, bias, conv_at[n])(h)
            norm = self._norm(chs[n], norm_at[n - 1])
            if isinstance(norm, TorchBatchNorm):
                h = norm(h, use_running_average=not train)
            elif norm is not None:
                h = norm(h).astype(self.dtype)
            h = nn.leaky_relu(h, 0.2)
        out = self._conv(1, 1, True, conv_at[-1])(h)
        return out.astype(jnp.float32)


def init_discriminator(cfg: DiscriminatorConfig, key: jax.Array, side: int = 32) -> dict[str, Any]:
    """Fresh variables ``{"params", "batch_stats"}`` (``batch_stats`` empty without BatchNorm)."""
    model = NLayerDiscriminator(cfg)
    v = model.init(key, jnp.zeros((1, side, side, cfg.in_channels), jnp.float32), train=False)
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
