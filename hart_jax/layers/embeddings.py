"""Sinusoidal timestep embedding and the two-layer MLP that embeds it.

Dimensions (docs/design.md): N rows (one timestep each); F frequency embedding size (256);
f frequencies (F/2); C channels (the embedder's hidden size).

Used twice in HART: the diffusion head embeds the diffusion step (0..999), and the
transformer (``use_timestep_embed``) embeds the integer scale level of each token.
Layout is ``[cos, sin]`` (cosine half first), fp32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
PrecisionLike = Any


@functools.lru_cache(maxsize=None)
def timestep_frequencies(half: int, max_period: float = 10000.0) -> np.ndarray:
    """``exp(-ln(max_period) * k / half)`` for k < half, as an fp32 numpy constant.

    The exponent is formed in fp32 (as the reference does) and the exponential is
    taken in float64 and rounded once, so the constant does not depend on the
    backend's fp32 ``exp`` (XLA's and PyTorch's differ by an ulp on some entries,
    which a timestep near 1000 amplifies to ~3e-5).
    """
    arg = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    out = np.exp(arg.astype(np.float64)).astype(np.float32)
    out.setflags(write=False)
    return out


def timestep_embedding(t_N: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of ``t_N`` (``[N]``) -> ``[N, dim]`` fp32.

    ``t`` may be integer or fractional; an odd ``dim`` gets one trailing zero column.
    """
    t_N = jnp.asarray(t_N)
    if t_N.ndim != 1:
        raise ValueError(f"timestep_embedding expects a 1-D array of timesteps, got shape {t_N.shape}")
    if dim < 2:
        raise ValueError(f"timestep_embedding needs dim >= 2, got {dim}")
    freqs_f = jnp.asarray(timestep_frequencies(dim // 2, float(max_period)))
    args_Nf = t_N.astype(jnp.float32)[:, None] * freqs_f[None, :]
    emb_NF = jnp.concatenate([jnp.cos(args_Nf), jnp.sin(args_Nf)], axis=-1)
    if dim % 2:
        emb_NF = jnp.concatenate([emb_NF, jnp.zeros_like(emb_NF[:, :1])], axis=-1)
    return emb_NF


class TimestepEmbedder(nn.Module):
    """``Linear(F -> W) -> SiLU -> Linear(W -> W)`` on the sinusoidal embedding.

    Params ``mlp_0`` / ``mlp_2`` mirror the PyTorch ``mlp.0`` / ``mlp.2``.
    """

    hidden_size: int
    frequency_embedding_size: int = 256
    max_period: float = 10000.0
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.mlp_0 = nn.Dense(self.hidden_size, **kw)
        self.mlp_2 = nn.Dense(self.hidden_size, **kw)

    def __call__(self, t_N: jax.Array) -> jax.Array:
        """``[N]`` timesteps -> ``[N, W]`` embeddings (in ``dtype``)."""
        t_freq_NF = timestep_embedding(t_N, self.frequency_embedding_size, self.max_period)
        return self.mlp_2(nn.silu(self.mlp_0(t_freq_NF.astype(self.dtype))))
