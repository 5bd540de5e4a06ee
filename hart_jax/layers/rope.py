"""Rotary position embeddings of HART: 1-D for text tokens, HART's 2-D for image tokens.

Both use HF-Llama's rotate-half pairing (dim k with k + D/2). The 2-D variant has two
layouts (``ROPE_2D_LAYOUTS``):
  ``"hart"``      the release's ``[row*f, row*f, col*f, col*f]`` (four blocks of D/4): the two
                  members of a rotation pair get different angles (row vs column), so it is
                  not a rotation and attention scores depend on absolute positions. Reproduced
                  verbatim for the release's weights.
  ``"rotation"``  ``[row*f, col*f, row*f, col*f]``: each pair turns by one angle, half the
                  pairs by the row, half by the column (a true 2-D RoPE; scores depend on
                  relative positions only). The default for models trained here.

Dimensions (docs/design.md): B batch; L tokens; A heads; D head dim; f frequencies (D/4 for
2-D, D/2 for 1-D).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


ROPE_2D_LAYOUTS = ("hart", "rotation")


def inv_freq(head_dim: int, step: int, base: float = 10000.0) -> np.ndarray:
    """``1 / base ** (arange(0, D, step) / D)`` in fp32, as the reference computes it."""
    exps = np.arange(0, head_dim, step, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)


def rope_1d(pos_BL: jax.Array, head_dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[B, L, D]`` of 1-D positions (angle vector ``[p*f, p*f]``)."""
    f = jnp.asarray(inv_freq(head_dim, 2, base))
    ang = pos_BL.astype(jnp.float32)[..., None] * f  # elementwise, exact in fp32
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def rope_2d(pos_BL2: jax.Array, head_dim: int, base: float = 10000.0,
            layout: str = "hart") -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[B, L, D]`` of 2-D positions (row, col): ``[r*f, r*f, c*f, c*f]`` (``"hart"``)
    or ``[r*f, c*f, r*f, c*f]`` (``"rotation"``)."""
    if layout not in ROPE_2D_LAYOUTS:
        raise ValueError(f"rope_2d layout must be one of {ROPE_2D_LAYOUTS}, got {layout!r}")
    f = jnp.asarray(inv_freq(head_dim, 4, base))
    pos = pos_BL2.astype(jnp.float32)
    r = pos[..., 0:1] * f
    c = pos[..., 1:2] * f
    ang = jnp.concatenate([r, r, c, c] if layout == "hart" else [r, c, r, c], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def grid_positions(patch_nums: Sequence[int], pn_max: int) -> np.ndarray:
    """Float positions ``[sum pn^2, 2]`` of the row-major tokens of the given scales:
    ``(r / pn * pn_max, c / pn * pn_max)`` in fp32 (division first)."""
    out = []
    for pn in patch_nums:
        rr, cc = np.meshgrid(np.arange(pn), np.arange(pn), indexing="ij")
        coords = np.stack([rr, cc], -1).reshape(-1, 2).astype(np.float32)
        out.append(coords / np.float32(pn) * np.float32(pn_max))
    return np.concatenate(out, 0).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[-x2, x1]`` with x1, x2 the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BLAD: jax.Array, cos_BLD: jax.Array, sin_BLD: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` with cos/sin broadcast over heads (cast to x.dtype)."""
    cos = cos_BLD[:, :, None, :].astype(x_BLAD.dtype)
    sin = sin_BLD[:, :, None, :].astype(x_BLAD.dtype)
    return x_BLAD * cos + rotate_half(x_BLAD) * sin
