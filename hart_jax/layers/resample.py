"""Resampling exactly as PyTorch's ``F.interpolate`` defines it, for NHWC arrays.

HART moves latents between scales with ``mode="area"`` (downsampling) and
``mode="bicubic", align_corners=False`` (upsampling). ``jax.image.resize`` uses a
different cubic kernel (a=-0.5) and edge handling, so both are written here as
separable linear maps: a constant ``[out, in]`` matrix per axis, built once in
numpy and applied with two einsums at full fp32 precision.

Dimensions (docs/design.md): B batch; H height (input); W width (input);
h small height (output, smaller or not); w small width (output); C channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
_CUBIC_A = -0.75  # PyTorch's upsample_bicubic2d kernel constant


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of adaptive average pooling along one axis.

    Output i averages input ``[floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))``;
    windows overlap when the sizes do not divide.
    """
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = np.float32(1.0) / np.float32(end - start)
    return m


def _cubic_weights(t: np.float32) -> tuple[np.float32, ...]:
    """Keys cubic convolution weights for taps x0-1..x0+2 (fp32 like PyTorch)."""
    a = np.float32(_CUBIC_A)
    one = np.float32(1.0)

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + one

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return far(t + one), near(t), near(one - t), far(np.float32(2.0) - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PyTorch bicubic (a=-0.75, align_corners=False).

    Source coordinate ``(dst + 0.5) * n_in / n_out - 0.5`` (unclamped); the four
    taps are clamped to the border (edge replication). Same size is the identity.
    """
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    for i in range(n_out):
        x = scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5)
        x0 = np.floor(x)
        t = np.float32(x - x0)
        for k, w in enumerate(_cubic_weights(t)):
            j = int(min(max(int(x0) - 1 + k, 0), n_in - 1))
            m[i, j] += w
    return m


def _apply_separable(x_BHWC: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    dtype = x_BHWC.dtype
    x = jnp.einsum("ph,bhwc->bpwc", jnp.asarray(mh, dtype), x_BHWC, precision=_HIGHEST)
    return jnp.einsum("qw,bpwc->bpqc", jnp.asarray(mw, dtype), x, precision=_HIGHEST)


def area_resize(x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """``F.interpolate(mode="area")`` on NHWC: adaptive average pooling to ``size``."""
    p, q = (size, size) if isinstance(size, int) else size
    _, h, w, _ = x_BHWC.shape
    if (h, w) == (p, q):
        return x_BHWC
    return _apply_separable(x_BHWC, area_matrix(h, p), area_matrix(w, q))


def bicubic_resize(x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """``F.interpolate(mode="bicubic", align_corners=False)`` on NHWC."""
    p, q = (size, size) if isinstance(size, int) else size
    _, h, w, _ = x_BHWC.shape
    if (h, w) == (p, q):
        return x_BHWC
    return _apply_separable(x_BHWC, bicubic_matrix(h, p), bicubic_matrix(w, q))


def nearest_upsample2x(x_BHWC: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling (each pixel repeated 2x2)."""
    return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
