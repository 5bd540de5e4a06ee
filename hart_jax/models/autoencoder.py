"""HART's hybrid tokenizer autoencoder (``HARTAutoEncoder``) in Flax Linen, NHWC.

Dimensions (docs/design.md):
  B batch; H height (image, or latent = image / 2**(len(ch_mult)-1)); W width (likewise);
  C channels (an image's 3, a level's hidden channels); Z latent channels (``z_channels``).

Images are NHWC float in [-1, 1]; ``decode`` clamps to [-1, 1]. The quantizer lives
in ``hart_jax.models.quantizer``; this module wires encoder, ``quant_conv``,
quantizer, ``post_quant_conv`` and decoder, and holds ``TokenizerConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hart_jax.layers.resnet import AttnBlock, Downsample2x, ResnetBlock, Upsample2x, conv, group_norm
from hart_jax.models.quantizer import MultiScaleQuantizer

Dtype = Any
PrecisionLike = Any

PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Tokenizer hyper-parameters; field names and defaults follow the release's
    ``HARTAutoEncoderConfig`` (defaults = the 1024 px tokenizer)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    v_patch_nums: tuple[int, ...] = PATCH_NUMS_1024
    quantizer_type: str = "var_hybrid"
    double_decoder: bool = False
    in_channels: int = 3
    norm_groups: int = 32  # GroupNorm groups of every block (the release: 32)

    MODEL_TYPES = ("hart_autoencoder", "hart_autoencoder_with_disc")
    QUANTIZER_TYPES = ("var_hybrid", "var")

    def __post_init__(self) -> None:
        if self.quantizer_type not in self.QUANTIZER_TYPES:
            raise ValueError(
                f"quantizer_type={self.quantizer_type!r} is not supported "
                f"(expected one of {self.QUANTIZER_TYPES})"
            )
        if self.using_znorm:
            raise ValueError("using_znorm=True is not supported: HART's hybrid quantizer uses L2")
        g = self.norm_groups
        if g < 1 or self.ch % g or any((self.ch * m) % g for m in self.ch_mult):
            raise ValueError(f"ch={self.ch} x ch_mult={self.ch_mult} must be multiples of norm_groups={g} (GroupNorm)")

    @property
    def downsample(self) -> int:
        """Image-to-latent factor, ``2 ** (len(ch_mult) - 1)`` (16 for the release)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "TokenizerConfig":
        """Build from a release ``tokenizer/config.json`` dict; unknown fields are ignored."""
        mt = d.get("model_type")
        if mt not in cls.MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={mt!r} is not a HART tokenizer (expected one of {cls.MODEL_TYPES})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("ch_mult", "v_patch_nums"):
            if k in kw:
                kw[k] = tuple(int(x) for x in kw[k])
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as a release-style dict (round-trips through ``from_hf_dict``)."""
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["v_patch_nums"] = list(self.v_patch_nums)
        d["model_type"] = "hart_autoencoder"
        return d


def _level_channels(cfg: TokenizerConfig) -> list[int]:
    return [cfg.ch * m for m in cfg.ch_mult]


class _Level(nn.Module):
    """One resolution level: ResnetBlocks, optional attention after each, resampler."""

    in_channels: int
    out_channels: int
    num_blocks: int
    with_attn: bool
    resample: str | None  # "down", "up" or None
    dropout: float
    dtype: Dtype
    precision: PrecisionLike
    groups: int = 32

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, precision=self.precision)
        ins = [self.in_channels] + [self.out_channels] * (self.num_blocks - 1)
        self.block = [ResnetBlock(i, self.out_channels, self.dropout, groups=self.groups, **kw) for i in ins]
        if self.with_attn:
            self.attn = [AttnBlock(self.out_channels, groups=self.groups, **kw) for _ in range(self.num_blocks)]
        if self.resample == "down":
            self.downsample = Downsample2x(self.out_channels, **kw)
        elif self.resample == "up":
            self.upsample = Upsample2x(self.out_channels, **kw)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        for i in range(self.num_blocks):
            x = self.block[i](x, deterministic)
            if self.with_attn:
                x = self.attn[i](x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class _Mid(nn.Module):
    channels: int
    dropout: float
    dtype: Dtype
    precision: PrecisionLike
    groups: int = 32

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, precision=self.precision, groups=self.groups)
        self.block_1 = ResnetBlock(self.channels, self.channels, self.dropout, **kw)
        self.attn_1 = AttnBlock(self.channels, **kw)
        self.block_2 = ResnetBlock(self.channels, self.channels, self.dropout, **kw)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x, deterministic)), deterministic)


class Encoder(nn.Module):
    """Image ``[B, Hi, Wi, 3]`` -> latent ``[B, H, W, C]`` (before ``quant_conv``)."""

    cfg: TokenizerConfig
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        cfg, kw = self.cfg, dict(dtype=self.dtype, precision=self.precision)
        chs = _level_channels(cfg)
        n = len(chs)
        self.conv_in = conv(cfg.ch, 3, **kw)
        ins = [cfg.ch] + chs[:-1]
        self.down = [
            _Level(ins[l], chs[l], cfg.num_res_blocks, l == n - 1,
                   "down" if l != n - 1 else None, cfg.dropout, groups=cfg.norm_groups, **kw)
            for l in range(n)
        ]
        self.mid = _Mid(chs[-1], cfg.dropout, groups=cfg.norm_groups, **kw)
        self.norm_out = group_norm(groups=cfg.norm_groups)
        self.conv_out = conv(cfg.z_channels, 3, **kw)

    def __call__(self, img_BHWC: jax.Array, deterministic: bool = True) -> jax.Array:
        h = self.conv_in(img_BHWC.astype(self.dtype))
        for level in self.down:
            h = level(h, deterministic)
        h = self.mid(h, deterministic)
        return self.conv_out(nn.silu(self.norm_out(h)).astype(self.dtype))


class Decoder(nn.Module):
    """Latent ``[B, H, W, C]`` (after ``post_quant_conv``) -> unclamped image."""

    cfg: TokenizerConfig
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        cfg, kw = self.cfg, dict(dtype=self.dtype, precision=self.precision)
        chs = _level_channels(cfg)
        n = len(chs)
        self.conv_in = conv(chs[-1], 3, **kw)
        self.mid = _Mid(chs[-1], cfg.dropout, groups=cfg.norm_groups, **kw)
        # ``up[l]`` is resolution level l (0 = full size); executed from n-1 down to 0.
        ins = [chs[l + 1] if l < n - 1 else chs[-1] for l in range(n)]
        self.up = [
            _Level(ins[l], chs[l], cfg.num_res_blocks + 1, l == n - 1,
                   "up" if l != 0 else None, cfg.dropout, groups=cfg.norm_groups, **kw)
            for l in range(n)
        ]
        self.norm_out = group_norm(groups=cfg.norm_groups)
        self.conv_out = conv(cfg.in_channels, 3, **kw)

    def __call__(self, z_BHWZ: jax.Array, deterministic: bool = True) -> jax.Array:
        h = self.mid(self.conv_in(z_BHWZ.astype(self.dtype)), deterministic)
        for level in reversed(self.up):
            h = level(h, deterministic)
        return self.conv_out(nn.silu(self.norm_out(h)).astype(self.dtype)).astype(jnp.float32)


class HARTAutoEncoder(nn.Module):
    """Encoder + quant_conv + quantizer + post_quant_conv + decoder.

    Methods (call with ``model.apply(params, ..., method=...)``):
      ``encode`` image -> f; ``decode`` f_hat -> image in [-1, 1];
      ``decode_unclamped``; ``__call__`` the tokenizer training forward.
    The quantizer's operations are reached through ``quantize`` (see
    ``hart_jax.tokenizer.HybridTokenizer`` for the user-facing wrapper).
    """

    cfg: TokenizerConfig
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        cfg, kw = self.cfg, dict(dtype=self.dtype, precision=self.precision)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = conv(cfg.z_channels, cfg.quant_conv_ks, precision=self.precision)
        self.post_quant_conv = conv(cfg.z_channels, cfg.quant_conv_ks, precision=self.precision)
        if cfg.double_decoder:
            self.decoder2 = Decoder(cfg, **kw)
            self.post_quant_conv2 = conv(cfg.z_channels, cfg.quant_conv_ks, precision=self.precision)
        self.quantize = MultiScaleQuantizer(
            vocab_size=cfg.vocab_size,
            z_channels=cfg.z_channels,
            resi_ratio=cfg.quant_resi,
            share_quant_resi=cfg.share_quant_resi,
            default_qresi_counts=cfg.default_qresi_counts,
            num_default_scales=len(cfg.v_patch_nums),
            beta=cfg.beta,
            precision=self.precision,
        )

    def encode(self, img_BHWC: jax.Array, deterministic: bool = True) -> jax.Array:
        """Image in [-1, 1] -> continuous latent f ``[B, H, W, C]`` fp32."""
        f = self.quant_conv(self.encoder(img_BHWC, deterministic))
        return f.astype(jnp.float32)

    def decode_unclamped(self, f_hat_BHWZ: jax.Array, deterministic: bool = True) -> jax.Array:
        """``decoder(post_quant_conv(f_hat))`` without the clamp."""
        return self.decoder(self.post_quant_conv(f_hat_BHWZ), deterministic)

    def decode(self, f_hat_BHWZ: jax.Array) -> jax.Array:
        """``fhat_to_img``: latent -> image clamped to [-1, 1]."""
        return jnp.clip(self.decode_unclamped(f_hat_BHWZ), -1.0, 1.0)

    def decode_discrete_second(self, f_hat_BHWZ: jax.Array, deterministic: bool = True) -> jax.Array:
        """The optional second decoder (``double_decoder``) for the discrete-only path."""
        return self.decoder2(self.post_quant_conv2(f_hat_BHWZ), deterministic)

    def __call__(
        self,
        img_BHWC: jax.Array,
        patch_nums: Sequence[int] | None = None,
        skip_continuous_prob: float = 0.0,
        deterministic: bool = True,
    ) -> dict[str, Any]:
        """Training forward: ``{"out": unclamped recon, "vq_loss", "idx": list,
        "use_continuous": bool []}`` (which path the decoder saw).

        With probability ``skip_continuous_prob`` (one draw per call from the
        ``"quantize"`` RNG stream) the decoder sees the discrete-only latent, else
        the full continuous latent. φ is applied at every scale here, as in the
        reference's training forward.
        """
        patch_nums = tuple(patch_nums or self.cfg.v_patch_nums)
        f = self.encode(img_BHWC, deterministic)
        if self.is_initializing():
            self.quantize(f)  # create every φ conv, also those this S never selects
        if skip_continuous_prob <= 0.0:
            use_continuous = True
        elif skip_continuous_prob >= 1.0:
            use_continuous = False
        else:
            u = jax.random.uniform(self.make_rng("quantize"))
            use_continuous = u >= skip_continuous_prob
        f_hat, vq_loss, idx = self.quantize.training_forward(f, patch_nums, use_continuous)
        out = self.decode_unclamped(f_hat, deterministic)
        if self.cfg.double_decoder and self.is_initializing():
            self.decode_discrete_second(f_hat)
        return {"out": out, "vq_loss": vq_loss, "idx": idx, "use_continuous": jnp.asarray(use_continuous)}
