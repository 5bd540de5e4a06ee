"""HART's hybrid multi-scale residual quantizer (VAR-style), NHWC.

Dimensions (docs/design.md):
  B batch; H height of the latent (= last patch number, 64 for 1024 px); W width;
  h small height (one scale's side pn); w small width; Z latent channels
  (``z_channels``, 32); V vocabulary (codebook, 4096); S scales; l scale tokens (pn*pn);
  L tokens of all scales; N rows (latent vectors looked up).

Conventions (see docs/design.md and the reference §2.6-2.9):
  * token maps are flattened row-major (``index = row * pn + col``);
  * φ ("quant_resi") runs after bicubic upsampling to H x W; the conv used at scale
    ``si`` is chosen by the tick rule of ``phi_index``;
  * the hybrid/generation paths do NOT apply φ at the last scale; the VAR helpers
    and the training forward do (``phi_on_last=True``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.layers.resample import area_resize, bicubic_resize
from hart_jax.layers.resnet import conv

PrecisionLike = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def num_phi_convs(share_quant_resi: int, default_qresi_counts: int, num_scales: int) -> int:
    """How many distinct φ convs the release builds (0 = one per scale, 1 = shared)."""
    if share_quant_resi == 0:
        return default_qresi_counts or num_scales
    return share_quant_resi


def phi_index(si: int, num_scales: int, num_convs: int) -> int:
    """Index of the φ conv used at scale ``si`` of ``num_scales``.

    Reproduces ``PhiPartiallyShared.__getitem__``: the tick nearest to
    ``si / (S - 1)`` (float64, first minimum), with ticks
    ``linspace(1/(3K), 1 - 1/(3K), K)`` when K == 4, else ``linspace(1/(2K), ...)``.
    """
    if num_convs == 1:
        return 0
    k = num_convs
    ticks = (
        np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
        if k == 4
        else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    )
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(ticks - at)))


def nearest_code(z_NZ: jax.Array, codebook_VZ: jax.Array) -> jax.Array:
    """Index of the nearest codebook row by squared L2 (ties -> first index).

    Computed as the reference does: ``|z|^2 + |e|^2 - 2 z.e``.
    """
    z = z_NZ.astype(jnp.float32)
    e = codebook_VZ.astype(jnp.float32)
    d_NV = (
        jnp.sum(z * z, axis=1, keepdims=True)
        + jnp.sum(e * e, axis=1)[None, :]
        - 2.0 * jnp.matmul(z, e.T, precision=_HIGHEST)
    )
    return jnp.argmin(d_NV, axis=1).astype(jnp.int32)


class MultiScaleQuantizer(nn.Module):
    """Codebook + partially shared φ convs, and every multi-scale operation on them.

    All methods take/return fp32 NHWC latents. Pass ``patch_nums`` explicitly: the
    number of scales S decides which φ conv each scale uses.
    """

    vocab_size: int
    z_channels: int
    resi_ratio: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    num_default_scales: int = 10
    beta: float = 0.25
    precision: PrecisionLike = None

    def setup(self) -> None:
        self.embedding = nn.Embed(self.vocab_size, self.z_channels, dtype=jnp.float32)
        if self.phi_ratio > 1e-6:
            n = num_phi_convs(
                self.share_quant_resi, self.default_qresi_counts, self.num_default_scales
            )
            self.quant_resi = [
                conv(self.z_channels, 3, precision=self.precision) for _ in range(n)
            ]

    # ------------------------------------------------------------------ basics
    @property
    def phi_ratio(self) -> float:
        """|quant_resi|: the blend ratio of each φ conv (0 disables φ)."""
        return abs(self.resi_ratio)

    @property
    def codebook(self) -> jax.Array:
        """The ``[V, C]`` codebook."""
        return self.embedding.embedding

    def lookup(self, idx_Bl: jax.Array, pn: int) -> jax.Array:
        """Codebook vectors of a row-major token map as ``[B, pn, pn, C]``."""
        b = idx_Bl.shape[0]
        return jnp.take(self.codebook, idx_Bl, axis=0).reshape(b, pn, pn, self.z_channels)

    def phi(self, h_BHWZ: jax.Array, si: int, num_scales: int) -> jax.Array:
        """``(1 - r) * h + r * conv_k(h)`` with k from the tick rule (identity if r ~ 0)."""
        if self.phi_ratio <= 1e-6:
            return h_BHWZ
        k = phi_index(si, num_scales, len(self.quant_resi))
        r = self.phi_ratio
        return h_BHWZ * (1.0 - r) + self.quant_resi[k](h_BHWZ) * r

    def __call__(self, h_BHWZ: jax.Array) -> jax.Array:
        """Touch every parameter (used only by ``init``)."""
        out = h_BHWZ + jnp.sum(self.codebook) * 0.0
        if self.phi_ratio > 1e-6:
            for k in range(len(self.quant_resi)):
                out = out + self.quant_resi[k](h_BHWZ) * 0.0
        return out

    # ----------------------------------------------------------- tokenization
    def f_to_idx_and_frest(
        self, f_BHWZ: jax.Array, patch_nums: Sequence[int]
    ) -> tuple[list[jax.Array], jax.Array]:
        """Hybrid tokenization (``f_to_idxBl_and_frest``).

        Returns the S index maps ``[B, pn^2]`` and the continuous residual before the
        last discrete scale, ``[B, H*W, C]`` (the transformer's ``last_layer_gt``).
        """
        b, h, w, c = f_BHWZ.shape
        sn = len(patch_nums)
        f_rest = f_BHWZ.astype(jnp.float32)
        idx_list = []
        frest_wo_last = f_rest
        for si, pn in enumerate(patch_nums):
            last = si == sn - 1
            z = f_rest if last else area_resize(f_rest, pn)
            idx = nearest_code(z.reshape(-1, c), self.codebook).reshape(b, pn * pn)
            h_ = bicubic_resize(self.lookup(idx, pn), (h, w))
            if not last:
                h_ = self.phi(h_, si, sn)
            else:
                frest_wo_last = f_rest
            f_rest = f_rest - h_
            idx_list.append(idx)
        return idx_list, frest_wo_last.reshape(b, h * w, c)

    def idx_to_fhat(
        self,
        idx_list: Sequence[jax.Array],
        patch_nums: Sequence[int],
        *,
        phi_on_last: bool = False,
    ) -> list[jax.Array]:
        """Cumulative f_hat after each scale, ``[B, H, W, C]`` each.

        ``phi_on_last=False`` is HART's generation/hybrid convention (last scale added
        raw); ``True`` is VAR's discrete-only decoding (``idxBl_to_fhat``).
        """
        sn = len(patch_nums)
        side = patch_nums[-1]
        f_hat = None
        out = []
        for si, (idx, pn) in enumerate(zip(idx_list, patch_nums)):
            h_ = bicubic_resize(self.lookup(idx, pn), side)
            if si < sn - 1 or phi_on_last:
                h_ = self.phi(h_, si, sn)
            f_hat = h_ if f_hat is None else f_hat + h_
            out.append(f_hat)
        return out

    def next_autoregressive_input(
        self,
        si: int,
        patch_nums: Sequence[int],
        f_hat_BHWZ: jax.Array,
        h_BhwZ: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Add scale ``si``'s code map to f_hat; return (f_hat, next scale's input).

        For ``si < S-1``: f_hat += φ(bicubic(h, H)) and the next input is
        ``area(f_hat, pn_{si+1})``. At the last scale h is added raw (no φ) and f_hat
        is returned twice, as HART's sampler does.
        """
        sn = len(patch_nums)
        side = patch_nums[-1]
        if si != sn - 1:
            f_hat_BHWZ = f_hat_BHWZ + self.phi(bicubic_resize(h_BhwZ, side), si, sn)
            return f_hat_BHWZ, area_resize(f_hat_BHWZ, patch_nums[si + 1])
        f_hat_BHWZ = f_hat_BHWZ + h_BhwZ
        return f_hat_BHWZ, f_hat_BHWZ

    def teacher_forcing_inputs(
        self, idx_list: Sequence[jax.Array], patch_nums: Sequence[int]
    ) -> jax.Array:
        """Transformer inputs for scales 1..S-1 (``idxBl_to_var_input``), ``[B, L - pn0^2, C]``.

        Entries of ``idx_list`` may be index maps ``[B, l]`` or code vectors
        ``[B, l, C]`` (a continuous stage).
        """
        sn = len(patch_nums)
        side = patch_nums[-1]
        b = idx_list[0].shape[0]
        f_hat = jnp.zeros((b, side, side, self.z_channels), jnp.float32)
        blocks = []
        for si in range(sn - 1):
            pn = patch_nums[si]
            tok = idx_list[si]
            emb = self.lookup(tok, pn) if tok.ndim == 2 else tok.reshape(b, pn, pn, -1)
            f_hat = f_hat + self.phi(bicubic_resize(emb.astype(jnp.float32), side), si, sn)
            nxt = area_resize(f_hat, patch_nums[si + 1])
            blocks.append(nxt.reshape(b, -1, self.z_channels))
        return jnp.concatenate(blocks, axis=1)

    # --------------------------------------------------------------- training
    def training_forward(
        self,
        f_BHWZ: jax.Array,
        patch_nums: Sequence[int],
        use_continuous: jax.Array | bool,
    ) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
        """The quantizer's training forward (``HARTHybridQuantizer.forward``).

        VAR loop over all scales with φ at every scale (including the last), vq loss
        ``mean_s[beta * |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2]``; if ``use_continuous``
        the remaining residual is added so the decoder sees exactly f, else the
        discrete-only f_hat. Straight-through output ``sg(f_hat) - sg(f) + f``.
        Returns (f_hat_st, vq_loss, idx_list).
        """
        b, h, w, c = f_BHWZ.shape
        f = f_BHWZ.astype(jnp.float32)
        f_ng = jax.lax.stop_gradient(f)
        sn = len(patch_nums)
        f_rest = f_ng
        f_hat = jnp.zeros_like(f)
        vq_loss = jnp.zeros((), jnp.float32)
        idx_list = []
        for si, pn in enumerate(patch_nums):
            z = area_resize(f_rest, pn)
            idx = nearest_code(z.reshape(-1, c), self.codebook).reshape(b, pn * pn)
            idx_list.append(idx)
            h_ = self.phi(bicubic_resize(self.lookup(idx, pn), (h, w)), si, sn)
            f_hat = f_hat + h_
            f_rest = f_rest - h_
            vq_loss = (
                vq_loss
                + self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f))
                + jnp.mean(jnp.square(f_hat - f_ng))
            )
        f_hat = jnp.where(use_continuous, f_hat + f_rest, f_hat)
        vq_loss = vq_loss / sn
        f_hat_st = (jax.lax.stop_gradient(f_hat) - f_ng) + f
        return f_hat_st, vq_loss, idx_list
