"""Pure-jnp references for HART's attention: dense masked softmax in fp32.

These define what the Pallas kernels compute, and are the ``xla`` implementation
of the dispatcher (``hart_jax.attention``).

Mask rules:
- training (``level_attention_reference``): key k is visible to query q iff
  ``level(k) <= level(q)``. Text tokens are level 0 and see each other fully.
- sampling (``cache_attention_reference``): every cached key with index
  ``< valid_len`` is visible.

A query that sees no key at all outputs zeros (and gets zero gradients); with
HART's masks this never happens for a real token, only for padding.

Dimensions (docs/design.md): B batch; Q query tokens; K key tokens; A heads; D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def levels_2d(levels: jax.Array, batch: int, length: int, name: str) -> jax.Array:
    """``[L]`` or ``[B, L]`` integer level ids -> int32 ``[B, L]`` (shape-checked)."""
    levels = jnp.asarray(levels)
    if not jnp.issubdtype(levels.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer level ids, got dtype {levels.dtype}")
    if levels.ndim == 1:
        levels = jnp.broadcast_to(levels[None], (batch, levels.shape[0]))
    if levels.shape != (batch, length):
        raise ValueError(f"{name} must have shape [{length}] or [{batch}, {length}], got {levels.shape}")
    return levels.astype(jnp.int32)


def level_mask(q_levels_BQ: jax.Array, k_levels_BK: jax.Array) -> jax.Array:
    """Boolean ``[B, Q, K]``: key visible to query iff ``level(k) <= level(q)``."""
    return k_levels_BK[:, None, :] <= q_levels_BQ[:, :, None]


def masked_attention_reference(
    q_BQAD: jax.Array,
    k_BKAD: jax.Array,
    v_BKAD: jax.Array,
    mask_BQK: jax.Array,
    scale: float,
    matmul_dtype: jnp.dtype | None = None,
    precision: jax.lax.PrecisionLike = _HIGHEST,
) -> jax.Array:
    """Softmax attention under a boolean ``[B, Q, K]`` mask; output in q's dtype.

    Logits, softmax and accumulation are fp32. ``matmul_dtype`` (default fp32) is
    the operand dtype of the two matmuls: the fp32 default is the ground truth;
    the ``xla`` implementation passes the input dtype (bf16 operands, fp32
    accumulation, like the fused kernels).
    """
    mdt = jnp.float32 if matmul_dtype is None else matmul_dtype
    q = q_BQAD.astype(mdt)
    k = k_BKAD.astype(mdt)
    v = v_BKAD.astype(mdt)
    s_BAQK = jnp.einsum(
        "bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32
    ) * scale
    mask = mask_BQK[:, None, :, :]
    s_BAQK = jnp.where(mask, s_BAQK, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s_BAQK, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s_BAQK - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum(
        "bhqk,bkhd->bqhd", p.astype(mdt), v, precision=precision, preferred_element_type=jnp.float32
    )
    return o.astype(q_BQAD.dtype)


def level_attention_reference(
    q_BQAD: jax.Array,
    k_BKAD: jax.Array,
    v_BKAD: jax.Array,
    q_levels: jax.Array,
    k_levels: jax.Array,
    scale: float,
    matmul_dtype: jnp.dtype | None = None,
    precision: jax.lax.PrecisionLike = _HIGHEST,
) -> jax.Array:
    """HART's training attention: ``level(k) <= level(q)``; levels ``[L]`` or ``[B, L]``."""
    B, Q = q_BQAD.shape[:2]
    K = k_BKAD.shape[1]
    mask = level_mask(levels_2d(q_levels, B, Q, "q_levels"), levels_2d(k_levels, B, K, "k_levels"))
    return masked_attention_reference(q_BQAD, k_BKAD, v_BKAD, mask, scale, matmul_dtype, precision)


def valid_len_1d(valid_len: jax.Array | int, batch: int) -> jax.Array:
    """Scalar or ``[B]`` valid cache length -> int32 ``[B]`` (shape-checked)."""
    valid_len = jnp.asarray(valid_len)
    if not jnp.issubdtype(valid_len.dtype, jnp.integer):
        raise ValueError(f"valid_len must be an integer, got dtype {valid_len.dtype}")
    if valid_len.ndim == 0:
        valid_len = jnp.broadcast_to(valid_len, (batch,))
    if valid_len.shape != (batch,):
        raise ValueError(f"valid_len must be a scalar or have shape [{batch}], got {valid_len.shape}")
    return valid_len.astype(jnp.int32)


def cache_attention_reference(
    q_BQAD: jax.Array,
    k_cache_BKAD: jax.Array,
    v_cache_BKAD: jax.Array,
    valid_len: jax.Array | int,
    scale: float,
    matmul_dtype: jnp.dtype | None = None,
    precision: jax.lax.PrecisionLike = _HIGHEST,
) -> jax.Array:
    """Sampling attention: the queries see every cached key with index ``< valid_len``."""
    B, Q = q_BQAD.shape[:2]
    K = k_cache_BKAD.shape[1]
    n_B = valid_len_1d(valid_len, B)
    visible_BK = jnp.arange(K, dtype=jnp.int32)[None, :] < n_B[:, None]
    mask = jnp.broadcast_to(visible_BK[:, None, :], (B, Q, K))
    return masked_attention_reference(
        q_BQAD, k_cache_BKAD, v_cache_BKAD, mask, scale, matmul_dtype, precision
    )
