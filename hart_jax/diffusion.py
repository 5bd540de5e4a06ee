"""Gaussian-diffusion schedules of HART's residual head (IDDPM/ADM conventions).

All constants are float64 numpy arrays, computed the way the reference computes
them (Python/numpy float64, ``cumprod`` of ``1 - beta``), and cast to fp32 only
when a step gathers them (``DiffusionSchedule.f32``).

Dimensions (docs/design.md): U diffusion steps (original, 1000); J respaced steps (kept).

Index k = 0..J-1 is a respaced step, ``timestep_map[k]`` its original step (what the
network sees).

* ``named_beta_schedule("cosine", 1000)``: ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)``
  with ``abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)``.
* ``space_timesteps(T, "8")`` keeps ``[0, 143, 285, 428, 571, 714, 856, 999]``; the
  respaced betas are ``1 - abar[t_k] / abar[t_{k-1}]`` (``abar`` before the first = 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DiffusionSchedule",
    "betas_for_alpha_bar",
    "create_schedule",
    "named_beta_schedule",
    "space_timesteps",
]


# ----------------------------------------------------------------- betas
def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)``, float64."""
    out = []
    for i in range(num_timesteps):
        lo = i / num_timesteps
        hi = (i + 1) / num_timesteps
        out.append(min(1 - alpha_bar(hi) / alpha_bar(lo), max_beta))
    return np.array(out, dtype=np.float64)


def _cosine_alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """``"cosine"`` (IDDPM, HART's choice) or ``"linear"`` (DDPM, scaled to ``num_timesteps``)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, _cosine_alpha_bar)
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r} (expected 'cosine' or 'linear')")


# ------------------------------------------------------------- respacing
def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Original steps kept when respacing ``num_timesteps`` steps (sorted).

    ``section_counts``: ``"8"`` / ``"10,15,20"`` / a sequence of ints — the process is
    cut into that many equal sections (earlier sections take the remainder), each
    strided to its count with evenly spaced, Python-``round``ed offsets;
    ``"ddimN"`` — the integer stride giving exactly N steps from 0 (DDIM).
    ``""`` or ``None`` keeps every step.
    """
    if section_counts is None or section_counts == "":
        return list(range(num_timesteps))
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                want = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} of {num_timesteps} steps with an integer stride")
        try:
            section_counts = [int(s) for s in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected comma-separated integers or 'ddimN'"
            ) from None
    counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("respacing needs at least one section")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.add(start + round(pos))
            pos += stride
        start += size
    return sorted(kept)


# --------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    """Constants of one (possibly respaced) diffusion process, float64 ``[S]`` each."""

    timestep_map: np.ndarray  # int64: original step of each respaced step
    betas: np.ndarray
    log_betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def num_timesteps(self) -> int:
        """S, the number of (respaced) steps."""
        return int(self.betas.shape[0])

    def f32(self, name: str) -> jax.Array:
        """The named constant cast to an fp32 ``[S]`` array (float64 -> fp32, as the reference)."""
        return jnp.asarray(np.asarray(getattr(self, name), dtype=np.float32))

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: Sequence[int]) -> "DiffusionSchedule":
        """All derived constants of a beta sequence (GaussianDiffusion's float64 formulas)."""
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"a diffusion schedule needs at least 2 steps, got betas of shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        consts = dict(
            timestep_map=np.asarray(list(timestep_map), dtype=np.int64),
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            # entry 0 of the posterior variance is 0: its log is replaced by entry 1's
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )
        for v in consts.values():
            v.setflags(write=False)
        return cls(**consts)


def _respace(betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Betas of the kept steps: ``1 - abar[t_k] / abar[t_{k-1}]`` from the base process."""
    keep = set(int(t) for t in use_timesteps)
    base_ac = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64), axis=0)
    last = 1.0
    new_betas, tmap = [], []
    for i, ac in enumerate(base_ac):
        if i in keep:
            new_betas.append(1 - ac / last)
            last = ac
            tmap.append(i)
    return np.array(new_betas, dtype=np.float64), tmap


@functools.lru_cache(maxsize=None)
def _create_schedule_cached(
    respacing: str | tuple[int, ...], noise_schedule: str, num_timesteps: int
) -> DiffusionSchedule:
    betas = named_beta_schedule(noise_schedule, num_timesteps)
    spec = list(respacing) if isinstance(respacing, tuple) else respacing
    new_betas, tmap = _respace(betas, space_timesteps(num_timesteps, spec))
    return DiffusionSchedule.from_betas(new_betas, tmap)


def create_schedule(
    respacing: str | int | Sequence[int] | None = "",
    noise_schedule: str = "cosine",
    num_timesteps: int = 1000,
) -> DiffusionSchedule:
    """The (respaced) schedule of ``create_diffusion(respacing, noise_schedule)``.

    ``""``/``None`` keeps all ``num_timesteps`` steps (the training process; its
    betas are recomputed from ``abar`` like any respacing); ``"8"`` is HART's sampler.
    Cached per arguments; the returned arrays are read-only.
    """
    if respacing is None:
        respacing = ""
    if isinstance(respacing, int):
        respacing = str(respacing)
    if not isinstance(respacing, str):
        respacing = tuple(int(x) for x in respacing)
    return _create_schedule_cached(respacing, noise_schedule, int(num_timesteps))
