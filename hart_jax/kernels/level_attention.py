"""Flash attention (forward + backward) under HART's level mask, in Pallas (Triton backend).

Key k is visible to query q iff ``level(k) <= level(q)``. In training the text
tokens are level 0 (they see each other fully) and scale s is level s; the last
scale may keep only a subset of its tokens, so the kernel takes per-token level
ids (``[L]`` or ``[B, L]``) and never assumes contiguous level blocks.

Schedule (FlashAttention-2):
- forward, grid ``(q blocks, B, A)``: one program per query block runs an online
  softmax over key blocks ``[0, hi)`` and stores the output and the base-2
  log-sum-exp;
- backward: one kernel per key block accumulates dk and dv over query blocks
  ``[lo, nq)``; one kernel per query block accumulates dq over key blocks
  ``[0, hi)`` (each backward kernel may have its own tiles).
``hi`` and ``lo`` come from small per-block tables built outside the kernel
(``kv_bounds``, ``q_bounds``: max / min levels per block): every block outside the
loop range is fully masked, whatever the order of the levels, and for HART's
sorted layout the loops cover exactly the blocks that see anything. The tables
also mark the blocks every query of the block sees whole (``full``, ``flo``): those
are read with no mask at all (no level loads, compares or selects); only the
blocks on a level boundary and a ragged last block are masked element by element.

No input is padded along the sequence: when a length is not a multiple of its
block, the last block overhangs the array and its rows past the end are masked out
of every load and store (``load_rows`` / ``store_rows``), so HART's 9750 tokens cost
no padded copy of q, k, v, do and no slice of o. Only a head dim that is not a power
of two >= 16 is zero-padded (Triton's dot needs it; HART's 64 is not).

The softmax scale is not applied to the scores: ``c = scale * log2(e)`` enters
only the exp2 argument, ``exp2(s * c - m * c)`` (the running max ``m`` is kept
unscaled), which the compiler fuses into one FMA per score; the log-sum-exp is
base 2 of the scaled logits in the forward and both backward kernels. Logits,
softmax and accumulators are fp32 for bf16 and fp32 inputs; fp32 matmuls run at
full IEEE precision (``precision=HIGHEST``, no TF32) unless told otherwise.

Dimensions (docs/design.md): B batch; L tokens; Q query tokens; K key tokens;
A heads; D head dim (padded to a power of two); n blocks (query or key blocks).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from hart_jax.kernels.compat import SQUEEZED as SQ
from hart_jax.kernels.compat import dot, load, store, triton_compiler_params
from hart_jax.kernels.reference import levels_2d

LOG2E = math.log2(math.e)
INT32_MIN = int(np.iinfo(np.int32).min)  # level of a query row past the end: it sees no key
INT32_MAX = int(np.iinfo(np.int32).max)  # level of a key row past the end: no query sees it


@dataclasses.dataclass(frozen=True)
class LevelAttentionConfig:
    """Tile sizes and Triton launch parameters (powers of two; blocks >= 16).

    ``block_q`` .. ``num_stages``: the forward kernel. ``*_bwd``: the backward kernels, dk/dv
    and dq; the dq kernel takes its own ``*_dq`` values where they are set (None: the
    ``*_bwd`` value). Per-GPU values: ``hart_jax/kernels/tile_table.json`` (picked by
    ``hart_jax.attention`` when the caller names no config); these defaults serve every
    other device.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    num_warps_dq: int | None = None
    num_stages_dq: int | None = None

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "block_q_dq", "block_k_dq"):
            b = getattr(self, f)
            if b is None and f.endswith("_dq"):
                continue
            if b < 16 or b & (b - 1):
                raise ValueError(f"LevelAttentionConfig.{f} must be a power of two >= 16, got {b}")

    def dq_tiles(self) -> tuple[int, int, int, int]:
        """The dq kernel's ``(block_q, block_k, num_warps, num_stages)``, ``*_bwd`` filling the unset."""
        pick = lambda own, shared: shared if own is None else own  # noqa: E731
        return (
            pick(self.block_q_dq, self.block_q_bwd),
            pick(self.block_k_dq, self.block_k_bwd),
            pick(self.num_warps_dq, self.num_warps_bwd),
            pick(self.num_stages_dq, self.num_stages_bwd),
        )


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels are specialised on (hashable; a custom_vjp nondiff arg)."""

    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    block_q_dq: int
    block_k_dq: int
    num_warps_dq: int
    num_stages_dq: int
    precision: lax.Precision
    interpret: bool


def round_up(n: int, m: int) -> int:
    """Smallest multiple of ``m`` that is >= ``n``."""
    return -(-n // m) * m


def fit_block(block: int, length: int) -> int:
    """The block size actually used: ``block``, shrunk for short sequences (>= 16)."""
    return max(16, min(block, pl.next_power_of_2(max(length, 1))))


def padded_head_dim(d: int) -> int:
    """Head dim as the kernels see it: a power of two >= 16."""
    return max(16, pl.next_power_of_2(d))


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, k_name: str = "k") -> None:
    """Shape and dtype checks shared by the attention kernels (clear ValueErrors)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, {k_name}, v must be [B, L, A, D], got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and v must have the same shape, got {k.shape} and {v.shape}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {q.shape} and {k_name} {k.shape} differ in batch, heads or head dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, {k_name}, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention inputs must be float32, bfloat16 or float16, got {q.dtype}")


def check_scale(scale: float) -> None:
    """The kernels keep the running max of unscaled scores, which needs ``scale > 0``."""
    if not float(scale) > 0:
        raise ValueError(f"the softmax scale must be positive, got {scale}")


def tile_metadata(block_q: int, block_k: int, num_warps: int, num_stages: int) -> dict[str, str]:
    """A kernel's tiles as ``pallas_call`` metadata (JSON in the lowered HLO; no effect on the kernel)."""
    return {"block_q": str(block_q), "block_k": str(block_k), "num_warps": str(num_warps),
            "num_stages": str(num_stages)}


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad ``x`` at the end of ``axis`` up to ``size`` (no-op when already there)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


# ----------------------------------------------------------------------------- block tables
# Built from the unpadded level ids (small int arrays, outside the kernels). A block pair is
# "visible" when some query of the q block may see some key of the k block, "whole" when every
# query sees every key (no mask needed). A kernel loops over one side's blocks with unmasked
# loads only where they hold no row past the end: the fwd / dq loops over key blocks never read
# a ragged last key block unmasked, the dk/dv loop never a ragged last query block. (The block
# a program owns is loaded masked once; its rows past the end compute finite garbage that
# stays in rows that are never stored.)


def _block_reduce(lev_BL: jax.Array, block: int, op, pad_value: int) -> jax.Array:
    """``op`` over each block of ``block`` ids ``[B, n]``; a ragged tail is filled with ``pad_value``."""
    B, L = lev_BL.shape
    P = round_up(L, block)
    return op(pad_axis(lev_BL, 1, P, pad_value).reshape(B, P // block, block), axis=-1)


def block_visibility(q_lev_BQ, k_lev_BK, block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """``(visible, whole)``, bool ``[B, nq, nk]`` (see above), over the real rows of each block."""
    qmax = _block_reduce(q_lev_BQ, block_q, jnp.max, INT32_MIN)
    qmin = _block_reduce(q_lev_BQ, block_q, jnp.min, INT32_MAX)
    kmin = _block_reduce(k_lev_BK, block_k, jnp.min, INT32_MAX)
    kmax = _block_reduce(k_lev_BK, block_k, jnp.max, INT32_MIN)
    return kmin[:, None, :] <= qmax[:, :, None], kmax[:, None, :] <= qmin[:, :, None]


def kv_bounds(q_lev_BQ, k_lev_BK, block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """int32 ``([B, nq], [B, nq])``: per query block, the key blocks ``[0, full)`` are seen whole
    by each query (read unmasked) and ``[full, hi)`` hold the rest of what it may see (masked)."""
    visible, whole = block_visibility(q_lev_BQ, k_lev_BK, block_q, block_k)
    whole = whole & (jnp.arange(whole.shape[2]) < k_lev_BK.shape[1] // block_k)  # a ragged key block: masked
    idx = jnp.arange(1, visible.shape[2] + 1, dtype=jnp.int32)
    hi = jnp.max(jnp.where(visible, idx, 0), axis=2).astype(jnp.int32)
    full = jnp.sum(jnp.cumprod(whole.astype(jnp.int32), axis=2), axis=2).astype(jnp.int32)
    return full, hi


def q_bounds(q_lev_BQ, k_lev_BK, block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """int32 ``([B, nk], [B, nk])``: per key block, the query blocks ``[lo, flo)`` may see some of
    it (masked), ``[flo, Q // block_q)`` see all of it (unmasked); a ragged last query block,
    if ``flo`` is below it, is read masked after them."""
    visible, whole = block_visibility(q_lev_BQ, k_lev_BK, block_q, block_k)
    nq = visible.shape[1]
    nq_whole = q_lev_BQ.shape[1] // block_q
    idx = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    lo = jnp.min(jnp.where(visible, idx, nq), axis=1).astype(jnp.int32)
    # a ragged query block is left out (the kernel reads it masked, last)
    trailing = jnp.sum(jnp.cumprod(whole[:, :nq_whole][:, ::-1].astype(jnp.int32), axis=1), axis=1)
    flo = jnp.maximum(nq_whole - trailing, lo).astype(jnp.int32)
    return lo, flo


# ----------------------------------------------------------------------------- kernels
# Scores stay unscaled in the loops: the softmax scale times log2(e) (``c``) meets them only in
# the exp2 argument ``s * c - m * c`` (one FMA per score); the running max is kept unscaled.


def online_softmax_init(block_q: int, d: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(acc, running max, running sum)`` before the first key block."""
    return (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )


def online_softmax_step(acc, m, l, s, v, c, precision):
    """Fold one key block into the running base-2 softmax: ``s`` are the block's unscaled,
    masked (-inf) logits ``[block_q, block_k]``, ``v`` its values, ``c`` the scale times
    log2(e) (> 0). ``m`` is the unscaled running max. Rows that have seen no visible key yet
    keep a zero accumulator."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    mc = jnp.where(m_new == -jnp.inf, 0.0, m_new * c)
    p = jnp.exp2(s * c - mc[:, None])
    alpha = jnp.exp2(m * c - mc)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_new, l


def row_mask(start, size: int, length: int | None):
    """bool ``[size]``: rows ``start + [0, size)`` that are ``< length`` (None: no mask needed)."""
    if length is None:
        return None
    return (start + jnp.arange(size, dtype=jnp.int32)) < length


def load_rows(ref, rows, other=0):
    """``ref`` (``[n]`` or ``[n, D]``), rows outside the ``rows`` mask (None: all in) read as ``other``."""
    if rows is None:
        return ref[...]
    mask = rows if len(ref.shape) == 1 else rows[:, None]
    return load(ref, mask=mask, other=other)


def store_rows(ref, val, rows) -> None:
    """Write ``val`` to the rows of ``ref`` inside the ``rows`` mask (None: all)."""
    store(ref, val, mask=None if rows is None else (rows if len(ref.shape) == 1 else rows[:, None]))


def _ragged(length: int, block: int) -> int | None:
    """``length`` if its last block is ragged (its loads need a row mask), else None."""
    return length if length % block else None


def _has_whole(ragged_len: int | None, block: int) -> bool:
    """Whether a length (``_ragged``'s result: None when a multiple of ``block``) has a whole
    block; if not, the unmasked loop is not even traced (its loads would overrun the array)."""
    return ragged_len is None or ragged_len >= block


def _fwd_kernel(
    full_ref, hi_ref, q_lev_ref, k_lev_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
    *, c, block_k, num_q_blocks, q_len, k_len, precision,
):
    """One query block: online softmax over key blocks ``[0, full)`` unmasked, then ``[full, hi)``
    masked; stores o and the base-2 lse of the scaled logits."""
    block_q, d = q_ref.shape
    q_rows = row_mask((num_q_blocks - 1 - pl.program_id(0)) * block_q, block_q, q_len)
    q = load_rows(q_ref, q_rows)
    q_lev = load_rows(q_lev_ref, q_rows, INT32_MIN)

    def body(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        ks = pl.ds(start, block_k)
        k_rows = row_mask(start, block_k, k_len) if masked else None
        s = dot(q, load_rows(k_ref.at[ks, :], k_rows), trans_b=True, precision=precision)
        if masked:
            visible = load_rows(k_lev_ref.at[ks], k_rows, INT32_MAX)[None, :] <= q_lev[:, None]
            s = jnp.where(visible, s, -jnp.inf)
        return online_softmax_step(acc, m, l, s, load_rows(v_ref.at[ks, :], k_rows), c, precision)

    full, carry = full_ref[()], online_softmax_init(block_q, d)
    if _has_whole(k_len, block_k):
        carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(full, hi_ref[()], functools.partial(body, masked=True), carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    store_rows(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype), q_rows)
    store_rows(lse_ref, jnp.where(empty, jnp.inf, m * c + jnp.log2(l_safe)), q_rows)


def _dkv_kernel(
    lo_ref, flo_ref, q_lev_ref, k_lev_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, c, scale, block_q, q_len, k_len, precision,
):
    """One key block: dk, dv accumulated over query blocks ``[lo, flo)`` masked, ``[flo, nq_whole)``
    unmasked, then the ragged last query block (if any) masked."""
    block_k, d = k_ref.shape
    k_rows = row_mask(pl.program_id(0) * block_k, block_k, k_len)
    k = load_rows(k_ref, k_rows)
    v = load_rows(v_ref, k_rows)
    k_lev = load_rows(k_lev_ref, k_rows, INT32_MAX)
    nq_whole = q_len // block_q

    def body(i, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        qs = pl.ds(start, block_q)
        q_rows = row_mask(start, block_q, _ragged(q_len, block_q)) if masked else None
        q = load_rows(q_ref.at[qs, :], q_rows)
        do = load_rows(do_ref.at[qs, :], q_rows)
        lse = load_rows(lse_ref.at[qs], q_rows)
        delta = load_rows(delta_ref.at[qs], q_rows)
        s = dot(q, k, trans_b=True, precision=precision)
        p = jnp.exp2(s * c - lse[:, None])
        if masked:
            q_lev = load_rows(q_lev_ref.at[qs], q_rows, INT32_MIN)
            p = jnp.where(k_lev[None, :] <= q_lev[:, None], p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
        dp = dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
        return dk, dv

    lo, flo = lo_ref[()], flo_ref[()]
    carry = (jnp.zeros((block_k, d), jnp.float32), jnp.zeros((block_k, d), jnp.float32))
    carry = lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
    if nq_whole:
        carry = lax.fori_loop(flo, nq_whole, functools.partial(body, masked=False), carry)
    if q_len % block_q:
        carry = lax.fori_loop(jnp.maximum(flo, nq_whole), nq_whole + 1, functools.partial(body, masked=True), carry)
    dk, dv = carry
    store_rows(dk_ref, (dk * scale).astype(dk_ref.dtype), k_rows)
    store_rows(dv_ref, dv.astype(dv_ref.dtype), k_rows)


def _dq_kernel(
    full_ref, hi_ref, q_lev_ref, k_lev_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
    *, c, scale, block_k, num_q_blocks, q_len, k_len, precision,
):
    """One query block: dq accumulated over key blocks ``[0, full)`` unmasked, ``[full, hi)`` masked."""
    block_q, d = q_ref.shape
    q_rows = row_mask((num_q_blocks - 1 - pl.program_id(0)) * block_q, block_q, q_len)
    q = load_rows(q_ref, q_rows)
    do = load_rows(do_ref, q_rows)
    q_lev = load_rows(q_lev_ref, q_rows, INT32_MIN)
    lse = load_rows(lse_ref, q_rows)
    delta = load_rows(delta_ref, q_rows)

    def body(j, dq, masked):
        start = pl.multiple_of(j * block_k, block_k)
        ks = pl.ds(start, block_k)
        k_rows = row_mask(start, block_k, k_len) if masked else None
        k = load_rows(k_ref.at[ks, :], k_rows)
        v = load_rows(v_ref.at[ks, :], k_rows)
        s = dot(q, k, trans_b=True, precision=precision)
        p = jnp.exp2(s * c - lse[:, None])
        if masked:
            visible = load_rows(k_lev_ref.at[ks], k_rows, INT32_MAX)[None, :] <= q_lev[:, None]
            p = jnp.where(visible, p, 0.0)
        dp = dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k, precision=precision)

    full, dq = full_ref[()], jnp.zeros((block_q, d), jnp.float32)
    if _has_whole(k_len, block_k):
        dq = lax.fori_loop(0, full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(full, hi_ref[()], functools.partial(body, masked=True), dq)
    store_rows(dq_ref, (dq * scale).astype(dq_ref.dtype), q_rows)


# ----------------------------------------------------------------------------- pallas calls
# Block shapes: SQ is a squeezed (indexed-away) dimension, so a ``(SQ, bq, SQ, D)`` block of a
# ``[B, L, A, D]`` array is a ``[bq, D]`` ref in the kernel and ``(SQ, SQ)`` of a table is a scalar.
# The last block of a ragged length overhangs the array: the kernels read and write its rows
# past the end only through masks, so no input is padded and no output sliced.


def _fwd_call(q, k, v, q_lev, k_lev, bounds, st: _Static):
    B, Q, A, D = q.shape
    K = k.shape[1]
    bq = st.block_q
    nq = pl.cdiv(Q, bq)
    rev = lambda i: nq - 1 - i  # noqa: E731  (heavy, late query blocks first)
    kernel = functools.partial(
        _fwd_kernel, c=st.scale * LOG2E, block_k=st.block_k, num_q_blocks=nq,
        q_len=_ragged(Q, bq), k_len=_ragged(K, st.block_k), precision=st.precision,
    )
    table = pl.BlockSpec((SQ, SQ), lambda i, b, h: (b, rev(i)))
    return pl.pallas_call(
        kernel,
        grid=(nq, B, A),
        in_specs=[
            table, table,
            pl.BlockSpec((SQ, bq), lambda i, b, h: (b, rev(i))),
            pl.BlockSpec((SQ, K), lambda i, b, h: (b, 0)),
            pl.BlockSpec((SQ, bq, SQ, D), lambda i, b, h: (b, rev(i), h, 0)),
            pl.BlockSpec((SQ, K, SQ, D), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((SQ, K, SQ, D), lambda i, b, h: (b, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((SQ, bq, SQ, D), lambda i, b, h: (b, rev(i), h, 0)),
            pl.BlockSpec((SQ, SQ, bq), lambda i, b, h: (b, h, rev(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, A, Q), jnp.float32),
        ],
        compiler_params=triton_compiler_params(st.num_warps, st.num_stages),
        interpret=st.interpret,
        name="hart_level_attention_fwd",
        metadata=tile_metadata(st.block_q, st.block_k, st.num_warps, st.num_stages),
    )(*bounds, q_lev, k_lev, q, k, v)


def _bwd_calls(q, k, v, q_lev, k_lev, dq_bounds, dkv_bounds, o, lse, do, st: _Static):
    B, Q, A, D = q.shape
    K = k.shape[1]
    bq, bk = st.block_q_bwd, st.block_k_bwd
    nk = pl.cdiv(K, bk)
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))

    full_q = pl.BlockSpec((SQ, Q, SQ, D), lambda j, b, h: (b, 0, h, 0))
    full_k = pl.BlockSpec((SQ, K, SQ, D), lambda j, b, h: (b, 0, h, 0))
    full_row_q = pl.BlockSpec((SQ, SQ, Q), lambda j, b, h: (b, h, 0))
    blk_k = pl.BlockSpec((SQ, bk, SQ, D), lambda j, b, h: (b, j, h, 0))
    table = pl.BlockSpec((SQ, SQ), lambda j, b, h: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel, c=st.scale * LOG2E, scale=st.scale, block_q=bq, q_len=Q,
            k_len=_ragged(K, bk), precision=st.precision,
        ),
        grid=(nk, B, A),
        in_specs=[
            table, table,
            pl.BlockSpec((SQ, Q), lambda j, b, h: (b, 0)),
            pl.BlockSpec((SQ, bk), lambda j, b, h: (b, j)),
            full_q, blk_k, blk_k, full_q, full_row_q, full_row_q,
        ],
        out_specs=[blk_k, blk_k],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=triton_compiler_params(st.num_warps_bwd, st.num_stages_bwd),
        interpret=st.interpret,
        name="hart_level_attention_dkv",
        metadata=tile_metadata(bq, bk, st.num_warps_bwd, st.num_stages_bwd),
    )(*dkv_bounds, q_lev, k_lev, q, k, v, do, lse, delta)

    bq, bk = st.block_q_dq, st.block_k_dq
    nq = pl.cdiv(Q, bq)
    rev = lambda i: nq - 1 - i  # noqa: E731
    blk_q = pl.BlockSpec((SQ, bq, SQ, D), lambda i, b, h: (b, rev(i), h, 0))
    blk_row_q = pl.BlockSpec((SQ, SQ, bq), lambda i, b, h: (b, h, rev(i)))
    table = pl.BlockSpec((SQ, SQ), lambda i, b, h: (b, rev(i)))
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel, c=st.scale * LOG2E, scale=st.scale, block_k=bk, num_q_blocks=nq,
            q_len=_ragged(Q, bq), k_len=_ragged(K, bk), precision=st.precision,
        ),
        grid=(nq, B, A),
        in_specs=[
            table, table,
            pl.BlockSpec((SQ, bq), lambda i, b, h: (b, rev(i))),
            pl.BlockSpec((SQ, K), lambda i, b, h: (b, 0)),
            blk_q, full_k, full_k, blk_q, blk_row_q, blk_row_q,
        ],
        out_specs=blk_q,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_compiler_params(st.num_warps_dq, st.num_stages_dq),
        interpret=st.interpret,
        name="hart_level_attention_dq",
        metadata=tile_metadata(bq, bk, st.num_warps_dq, st.num_stages_dq),
    )(*dq_bounds, q_lev, k_lev, q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, q_lev, k_lev, fwd_bounds, dq_bounds, dkv_bounds, st: _Static):
    return _fwd_call(q, k, v, q_lev, k_lev, fwd_bounds, st)[0]


def _flash_fwd(q, k, v, q_lev, k_lev, fwd_bounds, dq_bounds, dkv_bounds, st: _Static):
    o, lse = _fwd_call(q, k, v, q_lev, k_lev, fwd_bounds, st)
    return o, (q, k, v, q_lev, k_lev, dq_bounds, dkv_bounds, o, lse)


def _flash_bwd(st: _Static, res, do):
    q, k, v, q_lev, k_lev, dq_bounds, dkv_bounds, o, lse = res
    dq, dk, dv = _bwd_calls(q, k, v, q_lev, k_lev, dq_bounds, dkv_bounds, o, lse, do, st)
    return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public API


def level_attention(
    q_BQAD: jax.Array,
    k_BKAD: jax.Array,
    v_BKAD: jax.Array,
    q_levels: jax.Array,
    k_levels: jax.Array,
    *,
    scale: float,
    config: LevelAttentionConfig | None = None,
    precision: lax.Precision = lax.Precision.HIGHEST,
    interpret: bool = False,
) -> jax.Array:
    """Fused attention with ``level(k) <= level(q)`` masking; differentiable in q, k, v.

    Args:
      q_BQAD, k_BKAD, v_BKAD: float32 / bfloat16 / float16, same dtype.
      q_levels, k_levels: integer level ids, ``[Q]`` / ``[K]`` or ``[B, Q]`` / ``[B, K]``.
      scale: softmax scale (HART: ``0.25 / sqrt(D)``).
      config: tile sizes and launch parameters.
      precision: matmul precision inside the kernel; ``HIGHEST`` keeps fp32 inputs
        at IEEE fp32 (``DEFAULT`` lets Triton use TF32); no effect on bf16.
      interpret: run the kernels with the Pallas interpreter (CPU tests).

    Returns:
      ``[B, Q, A, D]`` in the input dtype.
    """
    check_qkv(q_BQAD, k_BKAD, v_BKAD)
    check_scale(scale)
    cfg = config or LevelAttentionConfig()
    B, Q, A, D = q_BQAD.shape
    K = k_BKAD.shape[1]
    q_lev = levels_2d(q_levels, B, Q, "q_levels")
    k_lev = levels_2d(k_levels, B, K, "k_levels")

    block_q_dq, block_k_dq, num_warps_dq, num_stages_dq = cfg.dq_tiles()
    st = _Static(
        scale=float(scale),
        block_q=fit_block(cfg.block_q, Q),
        block_k=fit_block(cfg.block_k, K),
        block_q_bwd=fit_block(cfg.block_q_bwd, Q),
        block_k_bwd=fit_block(cfg.block_k_bwd, K),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        num_warps_bwd=cfg.num_warps_bwd,
        num_stages_bwd=cfg.num_stages_bwd,
        block_q_dq=fit_block(block_q_dq, Q),
        block_k_dq=fit_block(block_k_dq, K),
        num_warps_dq=num_warps_dq,
        num_stages_dq=num_stages_dq,
        precision=precision,
        interpret=bool(interpret),
    )
    Dp = padded_head_dim(D)  # HART's 64 is not padded
    q, k, v = (pad_axis(x, 3, Dp) for x in (q_BQAD, k_BKAD, v_BKAD))
    fwd_bounds = kv_bounds(q_lev, k_lev, st.block_q, st.block_k)
    dq_bounds = kv_bounds(q_lev, k_lev, st.block_q_dq, st.block_k_dq)
    dkv_bounds = q_bounds(q_lev, k_lev, st.block_q_bwd, st.block_k_bwd)
    o = _flash(q, k, v, q_lev, k_lev, fwd_bounds, dq_bounds, dkv_bounds, st)
    return o if Dp == D else o[..., :D]
