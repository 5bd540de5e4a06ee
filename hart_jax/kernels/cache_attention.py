"""Sampling attention in Pallas (Triton backend): one scale's queries against the KV cache.

At sampling step s HART feeds the tokens of scale s, writes their keys and values
into a preallocated cache and lets them attend to every cached key (text,
earlier scales and themselves). Here that is: every cache entry with index
``< valid_len`` is visible, nothing else is masked. ``valid_len`` is a scalar or
one value per batch row; values above the cache length are clamped to it.

Grid ``(q blocks, B, A)``; each program runs an online softmax over the key
blocks ``[0, ceil(valid_len / block_k))`` only, so the unused tail of the cache
is never read: the blocks wholly below ``valid_len`` with no mask, the last one
with its rows from ``valid_len`` on masked out of the loads. The softmax scale
meets the logits only inside the exp2 (see ``level_attention``). Forward only
(sampling needs no gradients).

The sampler keeps every block's caches stacked ``[X, B, K, A, D]`` and runs the
blocks in a loop; with ``layer`` the kernel takes the stacks whole and reads block
``layer``'s rows itself (the index is a kernel input), so no per-block copy of the
cache is made.

No input is padded for HART's shapes: a query count that is not a multiple of the
query block ends in a block whose rows past the end are masked out of the loads and
the store, and cache entries from ``valid_len`` on are never read, so any cache
length works as it is. (``padded_cache_length`` is what the sampler allocates: a
multiple of 128, so every key block's rows are aligned.) Only a head dim that is
not a power of two >= 16 is zero-padded (a copy).

Dimensions (docs/design.md): B batch; Q query tokens (the scale's); K key tokens (the
cache's entries); A heads; D head dim (padded to a power of two);
X depth (stacked per-block caches).
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
    check_scale,
    fit_block,
    load_rows,
    online_softmax_init,
    online_softmax_step,
    pad_axis,
    padded_head_dim,
    round_up,
    row_mask,
    store_rows,
    tile_metadata,
)
from hart_jax.kernels.reference import valid_len_1d

CACHE_ALIGN = 128  # the sampler allocates caches in multiples of this (aligned key blocks)


LONG_QUERIES = 1024  # a stage with at least this many queries takes the ``*_long`` tiles


@dataclasses.dataclass(frozen=True)
class CacheAttentionConfig:
    """Tile sizes and Triton launch parameters (powers of two >= 16; ``block_k`` divides
    ``CACHE_ALIGN``). Per-GPU values: ``hart_jax/kernels/tile_table.json``.

    ``block_q`` .. ``num_stages``: stages with fewer than ``long_queries`` queries; the
    ``*_long`` values (None: the short value) serve the long stages (HART's last scales,
    thousands of queries), where a taller query tile reads each key block for more queries.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    block_q_long: int | None = 128
    block_k_long: int | None = None
    num_warps_long: int | None = None
    num_stages_long: int | None = None
    long_queries: int = LONG_QUERIES

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_long", "block_k_long"):
            b = getattr(self, f)
            if b is None and f.endswith("_long"):
                continue
            if b < 16 or b & (b - 1):
                raise ValueError(f"CacheAttentionConfig.{f} must be a power of two >= 16, got {b}")
            if f.startswith("block_k") and CACHE_ALIGN % b:
                raise ValueError(f"CacheAttentionConfig.{f} must divide {CACHE_ALIGN}, got {b}")

    def long_tiles(self) -> tuple[int, int, int, int]:
        """The long stages' ``(block_q, block_k, num_warps, num_stages)``, short values filling the unset."""
        pick = lambda own, short: short if own is None else own  # noqa: E731
        return (pick(self.block_q_long, self.block_q), pick(self.block_k_long, self.block_k),
                pick(self.num_warps_long, self.num_warps), pick(self.num_stages_long, self.num_stages))

    def tiles_for(self, queries: int) -> tuple[int, int, int, int]:
        """``(block_q, block_k, num_warps, num_stages)`` for a stage of ``queries`` queries."""
        if queries >= self.long_queries:
            return self.long_tiles()
        return self.block_q, self.block_k, self.num_warps, self.num_stages


def padded_cache_length(length: int) -> int:
    """Cache size the sampler allocates for ``length`` tokens: a multiple of ``CACHE_ALIGN``
    (the kernel takes any length; this one keeps every key block aligned)."""
    return round_up(length, CACHE_ALIGN)


def _attend_cache(q, n, load_k, load_v, *, c, block_k, k_len, precision):
    """Online softmax of the query block ``q`` over cache entries ``[0, n)``: the key blocks
    below ``n`` whole are read unmasked, the one holding entry ``n - 1`` (if ragged) masked.

    ``k_len`` is the cache length (static). ``load_k(ks, rows)`` / ``load_v(ks, rows)`` read
    the ``[block_k, D]`` key / value block ``ks``, rows outside the ``rows`` mask (None: all
    in) as 0.
    """
    block_q, d = q.shape

    def body(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        ks = pl.ds(start, block_k)
        rows = row_mask(start, block_k, n) if masked else None
        s = dot(q, load_k(ks, rows), trans_b=True, precision=precision)
        if masked:
            s = jnp.where(rows[None, :], s, -jnp.inf)
        return online_softmax_step(acc, m, l, s, load_v(ks, rows), c, precision)

    whole, carry = 0, online_softmax_init(block_q, d)
    if k_len >= block_k:  # else no block is whole (and an unmasked load would overrun the cache)
        whole = n // block_k
        carry = lax.fori_loop(0, whole, functools.partial(body, masked=False), carry)
    acc, _, l = lax.fori_loop(whole, pl.cdiv(n, block_k), functools.partial(body, masked=True), carry)
    return acc / jnp.where(l == 0.0, 1.0, l)[:, None]


def _cache_kernel(n_ref, q_ref, k_ref, v_ref, o_ref, *, q_len, **kw):
    """One query block against the ``[K, D]`` cache block of its (row, head)."""
    block_q = q_ref.shape[0]
    q_rows = row_mask(pl.program_id(0) * block_q, block_q, q_len)
    out = _attend_cache(
        load_rows(q_ref, q_rows), n_ref[()],
        lambda ks, rows: load_rows(k_ref.at[ks, :], rows), lambda ks, rows: load_rows(v_ref.at[ks, :], rows), **kw,
    )
    store_rows(o_ref, out.astype(o_ref.dtype), q_rows)


def _stacked_cache_kernel(layer_ref, n_ref, q_ref, k_ref, v_ref, o_ref, *, q_len, **kw):
    """As ``_cache_kernel``, reading layer ``layer_ref[0]`` of the whole ``[X, B, K, A, D]`` caches."""
    layer, b, h = layer_ref[0], pl.program_id(1), pl.program_id(2)
    block_q = q_ref.shape[0]
    q_rows = row_mask(pl.program_id(0) * block_q, block_q, q_len)
    out = _attend_cache(
        load_rows(q_ref, q_rows), n_ref[()],
        lambda ks, rows: load_rows(k_ref.at[layer, b, ks, h, :], rows),
        lambda ks, rows: load_rows(v_ref.at[layer, b, ks, h, :], rows),
        **kw,
    )
    store_rows(o_ref, out.astype(o_ref.dtype), q_rows)


def _cache_call(q, k, v, n_B, layer, *, scale, block_q, block_k, num_warps, num_stages, precision, interpret):
    """``layer`` None: k, v are ``[B, K, A, D]``; else int32 ``[1]`` and k, v are stacked ``[X, B, K, A, D]``."""
    B, Q, A, D = q.shape
    nq = pl.cdiv(Q, block_q)
    kw = dict(c=scale * LOG2E, block_k=block_k, k_len=k.shape[-3], precision=precision,
              q_len=Q if Q % block_q else None)
    q_spec = pl.BlockSpec((SQ, block_q, SQ, D), lambda i, b, h: (b, i, h, 0))
    n_spec = pl.BlockSpec((SQ,), lambda i, b, h: (b,))
    if layer is None:
        K = k.shape[1]
        kv_spec = pl.BlockSpec((SQ, K, SQ, D), lambda i, b, h: (b, 0, h, 0))
        kernel, in_specs, args = _cache_kernel, [n_spec, q_spec, kv_spec, kv_spec], (n_B, q, k, v)
    else:
        # the stacked caches stay whole (no block of them is copied); the kernel indexes them
        whole = pl.BlockSpec(k.shape, lambda i, b, h: (0,) * k.ndim)
        layer_spec = pl.BlockSpec((1,), lambda i, b, h: (0,))
        kernel = _stacked_cache_kernel
        in_specs, args = [layer_spec, n_spec, q_spec, whole, whole], (layer, n_B, q, k, v)
    return pl.pallas_call(
        functools.partial(kernel, **kw),
        grid=(nq, B, A),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="hart_cache_attention",
        metadata=tile_metadata(block_q, block_k, num_warps, num_stages),
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _forward_only(q, k, v, n_B, layer, kw):
    return _cache_call(q, k, v, n_B, layer, **dict(kw))


def _forward_only_fwd(q, k, v, n_B, layer, kw):
    return _cache_call(q, k, v, n_B, layer, **dict(kw)), None


def _forward_only_bwd(kw, res, g):
    raise NotImplementedError(
        "cache_attention is forward-only (sampling); differentiate level_attention instead"
    )


_forward_only.defvjp(_forward_only_fwd, _forward_only_bwd)


def stacked_layer_index(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | int) -> jax.Array:
    """Check stacked ``[X, B, K, A, D]`` caches and a scalar block index; returns the index
    as int32 ``[1]``, clamped to ``[0, X)`` like ``lax.dynamic_slice``."""
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"with layer, k_cache and v_cache must be stacked [X, B, K, A, D] of one shape, "
            f"got {k_cache.shape} and {v_cache.shape}"
        )
    layer = jnp.asarray(layer)
    if layer.ndim != 0 or not jnp.issubdtype(layer.dtype, jnp.integer):
        raise ValueError(f"layer must be an integer scalar, got shape {layer.shape} dtype {layer.dtype}")
    return jnp.clip(layer.astype(jnp.int32), 0, k_cache.shape[0] - 1)[None]


def check_cache_inputs(
    q_BQAD: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | int | None
) -> jax.Array | None:
    """Shape / dtype checks of ``cache_attention``'s inputs (clear ValueErrors); with
    ``layer``, the checked block index as int32 ``[1]`` (see ``stacked_layer_index``)."""
    if layer is None:
        check_qkv(q_BQAD, k_cache, v_cache, k_name="k_cache")
        return None
    layer_1 = stacked_layer_index(k_cache, v_cache, layer)
    one_layer = jax.ShapeDtypeStruct(k_cache.shape[1:], k_cache.dtype)
    check_qkv(q_BQAD, one_layer, one_layer, k_name="k_cache")
    return layer_1


def cache_attention(
    q_BQAD: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    valid_len: jax.Array | int,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
    config: CacheAttentionConfig | None = None,
    precision: lax.Precision = lax.Precision.HIGHEST,
    interpret: bool = False,
) -> jax.Array:
    """Queries of one scale against cache entries ``[0, valid_len)``; forward only.

    Args:
      q_BQAD: the scale's queries.
      k_cache, v_cache: the cache ``[B, K, A, D]`` (q's dtype); with ``layer``, every
        block's caches stacked ``[X, B, K, A, D]``.
      valid_len: int scalar or int ``[B]``: number of filled cache entries (clamped to K).
      scale: softmax scale (HART: ``0.25 / sqrt(D)``).
      layer: int scalar (may be traced): the block whose caches to read. The kernel
        indexes the stacked arrays itself, so no per-layer copy of the cache is made
        (unless D needs padding). Clamped to
        ``[0, X)`` like ``lax.dynamic_slice``.
      config, precision, interpret: as for ``level_attention``.

    Returns:
      ``[B, Q, A, D]`` in the input dtype.
    """
    layer_1 = check_cache_inputs(q_BQAD, k_cache, v_cache, layer)
    check_scale(scale)
    Lm_axis = 1 if layer_1 is None else 2
    cfg = config or CacheAttentionConfig()
    B, Q, A, D = q_BQAD.shape
    K = k_cache.shape[Lm_axis]
    n_B = jnp.clip(valid_len_1d(valid_len, B), 0, K)

    block_q, block_k, num_warps, num_stages = cfg.tiles_for(Q)
    block_q, block_k = fit_block(block_q, Q), fit_block(block_k, K)
    Dp = padded_head_dim(D)  # HART's 64 is not padded
    if layer_1 is not None and Dp != D:
        # padding would copy the whole stack: copy just this layer instead
        k_cache, v_cache = (
            lax.dynamic_index_in_dim(c, layer_1[0], axis=0, keepdims=False) for c in (k_cache, v_cache)
        )
        layer_1 = None
    q, k, v = (pad_axis(x, -1, Dp) for x in (q_BQAD, k_cache, v_cache))
    kw = (
        ("scale", float(scale)),
        ("block_q", block_q),
        ("block_k", block_k),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
        ("precision", precision),
        ("interpret", bool(interpret)),
    )
    o = _forward_only(q, k, v, n_B, layer_1, kw)
    return o if Dp == D else o[..., :D]
