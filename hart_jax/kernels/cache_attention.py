"""Sampling attention in Pallas (Triton backend): one scale's queries against the KV cache.

At sampling step s HART feeds the tokens of scale s, writes their keys and values
into a preallocated cache and lets them attend to every cached key (text,
earlier scales and themselves). Here that is: every cache entry with index
``< valid_len`` is visible, nothing else is masked. ``valid_len`` is a scalar or
one value per batch row; values above the cache length are clamped to it.

Grid ``(q blocks, B, H)``; each program runs an online softmax over the key
blocks ``[0, ceil(valid_len / block_k))`` only, so the unused tail of the cache
is never read. Forward only (sampling needs no gradients).

The cache length must be a multiple of the key block for the kernel; other
lengths are padded here, which copies the cache on every call. Allocate caches
with ``padded_cache_length(L)`` entries to avoid that copy.

Dimensions: B batch, Lq queries of the scale, Lm cache length (P: padded),
H heads, D head dim (Dp: padded).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hart_jax.kernels.compat import SQUEEZED as SQ
from hart_jax.kernels.compat import dot, triton_compiler_params
from hart_jax.kernels.level_attention import (
    LOG2E,
    check_qkv,
    fit_block,
    online_softmax_init,
    online_softmax_step,
    pad_axis,
    padded_head_dim,
    round_up,
)
from hart_jax.kernels.reference import valid_len_1d

CACHE_ALIGN = 128  # cache lengths that are multiples of this are never padded


@dataclasses.dataclass(frozen=True)
class CacheAttentionConfig:
    """Tile sizes and Triton launch parameters (powers of two >= 16). Not tuned on hardware yet."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for f in ("block_q", "block_k"):
            b = getattr(self, f)
            if b < 16 or b & (b - 1):
                raise ValueError(f"CacheAttentionConfig.{f} must be a power of two >= 16, got {b}")
        if CACHE_ALIGN % self.block_k:
            raise ValueError(f"CacheAttentionConfig.block_k must divide {CACHE_ALIGN}, got {self.block_k}")


def padded_cache_length(length: int) -> int:
    """Cache size to allocate for ``length`` tokens so the kernel never pads (copies) it."""
    return round_up(length, CACHE_ALIGN)


def _cache_kernel(n_ref, q_ref, k_ref, v_ref, o_ref, *, c, block_k, precision):
    """One query block against cache entries ``[0, n)``."""
    q = q_ref[...]
    n = n_ref[()]
    block_q, d = q.shape

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        ks = pl.ds(start, block_k)
        k = k_ref[ks, :]
        visible = (start + jnp.arange(block_k, dtype=jnp.int32)) < n
        s = dot(q, k, trans_b=True, precision=precision) * c
        s = jnp.where(visible[None, :], s, -jnp.inf)
        return online_softmax_step(acc, m, l, s, v_ref[ks, :], precision)

    acc, _, l = lax.fori_loop(0, pl.cdiv(n, block_k), body, online_softmax_init(block_q, d))
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def _cache_call(q, k, v, n_B, *, scale, block_q, block_k, num_warps, num_stages, precision, interpret):
    B, Pq, H, D = q.shape
    Pm = k.shape[1]
    nq = Pq // block_q
    kernel = functools.partial(_cache_kernel, c=scale * LOG2E, block_k=block_k, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(nq, B, H),
        in_specs=[
            pl.BlockSpec((SQ,), lambda i, b, h: (b,)),
            pl.BlockSpec((SQ, block_q, SQ, D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((SQ, Pm, SQ, D), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((SQ, Pm, SQ, D), lambda i, b, h: (b, 0, h, 0)),
        ],
        out_specs=pl.BlockSpec((SQ, block_q, SQ, D), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="hart_cache_attention",
    )(n_B, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _forward_only(q, k, v, n_B, kw):
    return _cache_call(q, k, v, n_B, **dict(kw))


def _forward_only_fwd(q, k, v, n_B, kw):
    return _cache_call(q, k, v, n_B, **dict(kw)), None


def _forward_only_bwd(kw, res, g):
    raise NotImplementedError(
        "cache_attention is forward-only (sampling); differentiate level_attention instead"
    )


_forward_only.defvjp(_forward_only_fwd, _forward_only_bwd)


def cache_attention(
    q_BLqHD: jax.Array,
    k_cache_BLmHD: jax.Array,
    v_cache_BLmHD: jax.Array,
    valid_len: jax.Array | int,
    *,
    scale: float,
    config: CacheAttentionConfig | None = None,
    precision: lax.Precision = lax.Precision.HIGHEST,
    interpret: bool = False,
) -> jax.Array:
    """Queries of one scale against cache entries ``[0, valid_len)``; forward only.

    Args:
      q_BLqHD: the scale's queries; k_cache_BLmHD, v_cache_BLmHD: the cache (same dtype).
      valid_len: int scalar or int ``[B]``: number of filled cache entries (clamped to Lm).
      scale: softmax scale (HART: ``0.25 / sqrt(D)``).
      config, precision, interpret: as for ``level_attention``.

    Returns:
      ``[B, Lq, H, D]`` in the input dtype.
    """
    check_qkv(q_BLqHD, k_cache_BLmHD, v_cache_BLmHD, k_name="k_cache")
    cfg = config or CacheAttentionConfig()
    B, Lq, H, D = q_BLqHD.shape
    Lm = k_cache_BLmHD.shape[1]
    n_B = jnp.clip(valid_len_1d(valid_len, B), 0, Lm)

    block_q = fit_block(cfg.block_q, Lq)
    block_k = fit_block(cfg.block_k, Lm)
    Dp = padded_head_dim(D)
    Pm = round_up(Lm, block_k)
    q = pad_axis(pad_axis(q_BLqHD, 3, Dp), 1, round_up(Lq, block_q))
    k = pad_axis(pad_axis(k_cache_BLmHD, 3, Dp), 1, Pm)
    v = pad_axis(pad_axis(v_cache_BLmHD, 3, Dp), 1, Pm)
    kw = (
        ("scale", float(scale)),
        ("block_q", block_q),
        ("block_k", block_k),
        ("num_warps", cfg.num_warps),
        ("num_stages", cfg.num_stages),
        ("precision", precision),
        ("interpret", bool(interpret)),
    )
    o = _forward_only(q, k, v, n_B, kw)
    return o[:, :Lq, :, :D]
