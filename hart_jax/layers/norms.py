"""RMSNorm as HART's fused CUDA kernel computes it.

``y = cast(x_f32 * rsqrt(mean(x_f32^2) + eps), x.dtype) * weight`` — the statistic in
fp32, the normalised value rounded to the activation dtype before the weight. The
module always owns a weight (the release's ``ln_wo_grad`` norms included).

Dimensions (docs/design.md): N rows (any leading axes); C channels (the normalised last axis).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_normalize(x_NC: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in fp32, cast back to x.dtype."""
    x32 = x_NC.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x_NC.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable ``scale`` (torch ``weight``), initialised to ones."""

    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_NC: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x_NC.shape[-1],), self.param_dtype)
        return rms_normalize(x_NC, self.eps) * scale.astype(x_NC.dtype)
