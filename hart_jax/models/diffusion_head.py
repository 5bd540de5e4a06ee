"""HART's residual diffusion head (MAR-style ``DiffLoss`` + ``SimpleMLPAdaLN``).

Dimensions (docs/design.md):
  N rows (one per token; with CFG the conditional rows are the first half);
  B batch; L tokens; Z latent channels (the target, 32 at 1024 px);
  C channels of the condition (the transformer's ``embed_dim``, 1536; this module's
  ``z_channels``, MAR's name); M head width (``diff_width``, 1024); O head outputs (2Z);
  J respaced steps (8); F frequency embedding size (256).

The network maps ``(x_t [N, Z], t [N], z [N, C])`` to ``[N, 2Z]``: ε followed by the
learned-range variance value v (``frac = (v + 1) / 2``). The sampler runs the respaced
IDDPM chain (x0 clipped to [-1, 1], the network sees the ORIGINAL step index) and
returns ``x0 * vae_scale``; training targets are divided by ``vae_scale`` (0.6).
Guidance (``forward_with_cfg``) applies to ε only: ``(1 + s) ε_cond - s ε_uncond``.
Schedule math is fp32 on float64-computed constants (``hart_jax.diffusion``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hart_jax.diffusion import DiffusionSchedule, create_schedule
from hart_jax.layers.embeddings import TimestepEmbedder

Dtype = Any
PrecisionLike = Any

__all__ = [
    "DiffLoss",
    "FinalLayer",
    "ResBlock",
    "SimpleMLPAdaLN",
    "draw_training_noise",
    "tile_rows",
]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """AdaLN modulation ``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """``x + gate * MLP(LN(x) * (1 + scale) + shift)``; ``[shift, scale, gate]`` from SiLU(y)."""

    channels: int
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.in_ln = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype)
        self.mlp_0 = nn.Dense(self.channels, **kw)
        self.mlp_2 = nn.Dense(self.channels, **kw)
        self.adaLN_modulation_1 = nn.Dense(3 * self.channels, **kw)

    def __call__(self, x_NM: jax.Array, y_NM: jax.Array) -> jax.Array:
        shift, scale, gate = jnp.split(self.adaLN_modulation_1(nn.silu(y_NM)), 3, axis=-1)
        h_NM = modulate(self.in_ln(x_NM), shift, scale)
        h_NM = self.mlp_2(nn.silu(self.mlp_0(h_NM)))
        return x_NM + gate * h_NM


class FinalLayer(nn.Module):
    """``Linear(LN_noaffine(x) * (1 + scale) + shift)``; ``[shift, scale]`` from SiLU(y)."""

    model_channels: int
    out_channels: int
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.norm_final = nn.LayerNorm(
            epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False, dtype=self.dtype
        )
        self.linear = nn.Dense(self.out_channels, **kw)
        self.adaLN_modulation_1 = nn.Dense(2 * self.model_channels, **kw)

    def __call__(self, x_NM: jax.Array, y_NM: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation_1(nn.silu(y_NM)), 2, axis=-1)
        return self.linear(modulate(self.norm_final(x_NM), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: ``input_proj(x)`` through ``num_res_blocks`` AdaLN ResBlocks
    conditioned on ``y = time_embed(t) + cond_embed(z)``, then ``final_layer``."""

    in_channels: int
    model_channels: int
    out_channels: int
    z_channels: int
    num_res_blocks: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.time_embed = TimestepEmbedder(
            self.model_channels, frequency_embedding_size=self.frequency_embedding_size, **kw
        )
        self.cond_embed = nn.Dense(self.model_channels, **kw)
        self.input_proj = nn.Dense(self.model_channels, **kw)
        self.res_blocks = [ResBlock(self.model_channels, **kw) for _ in range(self.num_res_blocks)]
        self.final_layer = FinalLayer(self.model_channels, self.out_channels, **kw)

    def check_inputs(self, x_NZ: jax.Array, t_N: jax.Array, c_NC: jax.Array) -> None:
        """Raise ``ValueError`` naming the first mis-shaped input."""
        if x_NZ.ndim != 2 or x_NZ.shape[1] != self.in_channels:
            raise ValueError(f"x must be [N, {self.in_channels}], got shape {tuple(x_NZ.shape)}")
        n = x_NZ.shape[0]
        if c_NC.ndim != 2 or c_NC.shape != (n, self.z_channels):
            raise ValueError(f"c must be [N={n}, {self.z_channels}], got shape {tuple(c_NC.shape)}")
        if t_N.shape != (n,):
            raise ValueError(f"t must be [N={n}] timesteps, got shape {tuple(t_N.shape)}")

    def __call__(self, x_NZ: jax.Array, t_N: jax.Array, c_NC: jax.Array) -> jax.Array:
        """``[N, Z]``, ``[N]`` original timesteps, ``[N, C]`` -> ``[N, out_channels]``."""
        x_NZ, t_N, c_NC = jnp.asarray(x_NZ), jnp.asarray(t_N), jnp.asarray(c_NC)
        self.check_inputs(x_NZ, t_N, c_NC)
        x_NM = self.input_proj(x_NZ)
        y_NM = self.time_embed(t_N) + self.cond_embed(c_NC)
        for block in self.res_blocks:
            x_NM = block(x_NM, y_NM)
        return self.final_layer(x_NM, y_NM)

    def forward_with_cfg(
        self, x_NZ: jax.Array, t_N: jax.Array, c_NC: jax.Array, cfg_scale: float | jax.Array
    ) -> jax.Array:
        """Guided output: the first half of ``x`` is fed for both halves (cond z first,
        uncond z second); ε = ``(1 + s) ε_cond - s ε_uncond`` for both halves, the
        variance channels stay per half."""
        x_NZ = jnp.asarray(x_NZ)
        n = x_NZ.shape[0] if x_NZ.ndim else 0
        if n % 2:
            raise ValueError(f"forward_with_cfg needs an even number of rows (cond then uncond), got {n}")
        half_NZ = x_NZ[: n // 2]
        out_NO = self(jnp.concatenate([half_NZ, half_NZ], axis=0), t_N, c_NC)
        eps_NZ, rest_NZ = out_NO[:, : self.in_channels], out_NO[:, self.in_channels :]
        cond_NZ, uncond_NZ = eps_NZ[: n // 2], eps_NZ[n // 2 :]
        guided_NZ = cond_NZ * (1 + cfg_scale) - cfg_scale * uncond_NZ
        return jnp.concatenate([jnp.concatenate([guided_NZ, guided_NZ], axis=0), rest_NZ], axis=1)


# ----------------------------------------------------------------- helpers
def tile_rows(x: jax.Array, mul: int) -> jax.Array:
    """``x.repeat(mul, 1)`` of PyTorch: the whole 2-D ``[N, ...]`` block copied ``mul`` times."""
    return jnp.tile(x, (int(mul), 1))


def draw_training_noise(
    key: jax.Array, rows: int, channels: int, num_timesteps: int = 1000
) -> tuple[jax.Array, jax.Array]:
    """``t ~ U{0..num_timesteps-1}`` ``[rows]`` (int32) and ε ~ N(0, 1) ``[rows, channels]`` fp32."""
    k_t, k_n = jax.random.split(key)
    t_N = jax.random.randint(k_t, (rows,), 0, num_timesteps, dtype=jnp.int32)
    noise_NZ = jax.random.normal(k_n, (rows, channels), jnp.float32)
    return t_N, noise_NZ


def _static_cfg(cfg: Any) -> float:
    """The guidance value as a Python float (it picks the branch and the batch layout)."""
    try:
        return float(cfg)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            "cfg must be a concrete number (it decides whether the head runs guided, "
            "which changes shapes); pass it as a static argument under jit"
        ) from None


def _approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(
    x: jax.Array, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """Log-probability of ``x`` under a Gaussian discretized to bins of width 2/255 on [-1, 1]."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    inner = jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    return jnp.where(x < -0.999, log_cdf_plus, inner)


def _normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


# -------------------------------------------------------------------- head
class DiffLoss(nn.Module):
    """The residual head: owns ``net`` (params at ``net/...``), the training loss and
    the sampler. Inside the transformer it is the submodule ``diffloss``."""

    target_channels: int
    z_channels: int
    width: int
    depth: int
    num_sampling_steps: str | int = "8"
    noise_schedule: str = "cosine"
    num_train_timesteps: int = 1000
    vae_scale: float = 0.6
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        self.net = SimpleMLPAdaLN(
            in_channels=self.target_channels,
            model_channels=self.width,
            out_channels=2 * self.target_channels,
            z_channels=self.z_channels,
            num_res_blocks=self.depth,
            dtype=self.dtype,
            precision=self.precision,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], target_channels: int, **overrides: Any) -> "DiffLoss":
        """Build from a ``HARTForT2I`` ``config.json`` dict (``diff_width``, ``diff_depth``,
        ``embed_dim``, ``num_sampling_steps``, ``sampler``) and the tokenizer's Z."""
        missing = [k for k in ("diff_width", "diff_depth", "embed_dim") if k not in config]
        if missing:
            raise ValueError(f"transformer config lacks {', '.join(missing)} (needed by the diffusion head)")
        sampler = config.get("sampler", "iddpm")
        if sampler != "iddpm":
            raise ValueError(f"sampler={sampler!r} is not supported (only 'iddpm')")
        kw = dict(
            target_channels=int(target_channels),
            z_channels=int(config["embed_dim"]),
            width=int(config["diff_width"]),
            depth=int(config["diff_depth"]),
            num_sampling_steps=str(config.get("num_sampling_steps", "8")),
        )
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------ schedules
    @property
    def train_schedule(self) -> DiffusionSchedule:
        """All ``num_train_timesteps`` steps of the cosine process (training)."""
        return create_schedule("", self.noise_schedule, self.num_train_timesteps)

    @property
    def gen_schedule(self) -> DiffusionSchedule:
        """The respaced sampling process (``num_sampling_steps``, e.g. ``"8"``)."""
        return create_schedule(str(self.num_sampling_steps), self.noise_schedule, self.num_train_timesteps)

    # ---------------------------------------------------------------- loss
    def __call__(
        self, target_NZ: jax.Array, z_NC: jax.Array, t_N: jax.Array, noise_NZ: jax.Array,
        mask_N: jax.Array | None = None,
    ) -> jax.Array:
        """Same as ``loss`` (used by ``init``)."""
        return self.loss(target_NZ, z_NC, t_N, noise_NZ, mask_N)

    def loss_per_row(
        self, target_NZ: jax.Array, z_NC: jax.Array, t_N: jax.Array, noise_NZ: jax.Array
    ) -> jax.Array:
        """``[N]`` IDDPM losses: ε-MSE (mean over Z) + learned-range VB term (bits).

        ``x_start = target / vae_scale``; ``x_t = sqrt(abar_t) x_start + sqrt(1 - abar_t) ε``;
        the VB term sees the ε prediction through ``stop_gradient`` (only v learns from it);
        at ``t == 0`` it is the discretized decoder NLL, otherwise KL(q(x_{t-1}|x_t,x_0) || p).
        """
        target_NZ, z_NC = jnp.asarray(target_NZ), jnp.asarray(z_NC)
        t_N, noise_NZ = jnp.asarray(t_N), jnp.asarray(noise_NZ)
        c = self.target_channels
        if target_NZ.ndim != 2 or target_NZ.shape[1] != c:
            raise ValueError(f"target must be [N, {c}], got shape {tuple(target_NZ.shape)}")
        if noise_NZ.shape != target_NZ.shape:
            raise ValueError(f"noise must have the target's shape {tuple(target_NZ.shape)}, got {tuple(noise_NZ.shape)}")
        if t_N.shape != target_NZ.shape[:1]:
            raise ValueError(f"t must be [N={target_NZ.shape[0]}], got shape {tuple(t_N.shape)}")
        if not jnp.issubdtype(t_N.dtype, jnp.integer):
            raise ValueError(f"t must hold integer timesteps, got dtype {t_N.dtype}")
        sched = self.train_schedule

        def at(name: str) -> jax.Array:
            return sched.f32(name)[t_N][:, None]

        x_start = target_NZ.astype(jnp.float32) / self.vae_scale
        noise_NZ = noise_NZ.astype(jnp.float32)
        x_t = at("sqrt_alphas_cumprod") * x_start + at("sqrt_one_minus_alphas_cumprod") * noise_NZ
        t_model = jnp.asarray(sched.timestep_map, jnp.int32)[t_N]
        out_NO = self.net(x_t, t_model, z_NC).astype(jnp.float32)
        eps_NZ, v_NZ = out_NO[:, :c], out_NO[:, c:]
        mse_N = jnp.mean((noise_NZ - eps_NZ) ** 2, axis=-1)

        coef1, coef2 = at("posterior_mean_coef1"), at("posterior_mean_coef2")
        min_log = at("posterior_log_variance_clipped")
        true_mean = coef1 * x_start + coef2 * x_t
        eps_detached = jax.lax.stop_gradient(eps_NZ)
        x0_pred = at("sqrt_recip_alphas_cumprod") * x_t - at("sqrt_recipm1_alphas_cumprod") * eps_detached
        model_mean = coef1 * x0_pred + coef2 * x_t
        frac = (v_NZ + 1) / 2
        model_log_var = frac * at("log_betas") + (1 - frac) * min_log
        kl_N = jnp.mean(_normal_kl(true_mean, min_log, model_mean, model_log_var), axis=-1) / math.log(2.0)
        nll_N = -jnp.mean(
            _discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var), axis=-1
        ) / math.log(2.0)
        vb_N = jnp.where(t_N == 0, nll_N, kl_N)
        return mse_N + vb_N

    def loss(
        self, target_NZ: jax.Array, z_NC: jax.Array, t_N: jax.Array, noise_NZ: jax.Array,
        mask_N: jax.Array | None = None,
    ) -> jax.Array:
        """Scalar training loss: mean over rows (or ``sum(loss * mask) / sum(mask)``)."""
        per_row = self.loss_per_row(target_NZ, z_NC, t_N, noise_NZ)
        if mask_N is None:
            return jnp.mean(per_row)
        mask_N = jnp.asarray(mask_N, jnp.float32)
        if mask_N.shape != per_row.shape:
            raise ValueError(f"mask must be [N={per_row.shape[0]}], got shape {tuple(mask_N.shape)}")
        return jnp.sum(per_row * mask_N) / jnp.sum(mask_N)

    def tiled_loss(
        self,
        target_BLZ: jax.Array,
        z_BLC: jax.Array,
        batch_mul: int,
        *,
        key: jax.Array | None = None,
        t: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> jax.Array:
        """The transformer's ``forward_diff_loss``: flatten tokens to rows, tile both
        ``batch_mul`` times (whole block, not interleaved), then ``loss``.

        Give either ``key`` (draws ``t`` and ε for the ``batch_mul * rows`` tiled rows)
        or both ``t`` ``[N]`` and ``noise`` ``[N, Z]`` (N = rows x ``diffusion_batch_mul``) in tiled order (parity).
        """
        target_BLZ, z_BLC = jnp.asarray(target_BLZ), jnp.asarray(z_BLC)
        c, d = self.target_channels, self.z_channels
        if target_BLZ.ndim < 2 or target_BLZ.shape[-1] != c:
            raise ValueError(f"target must be [..., {c}], got shape {tuple(target_BLZ.shape)}")
        if z_BLC.shape[:-1] != target_BLZ.shape[:-1] or z_BLC.shape[-1] != d:
            raise ValueError(
                f"z must be {tuple(target_BLZ.shape[:-1]) + (d,)} to match the target, got {tuple(z_BLC.shape)}"
            )
        if batch_mul < 1:
            raise ValueError(f"batch_mul must be >= 1, got {batch_mul}")
        target_NZ = tile_rows(target_BLZ.reshape(-1, c), batch_mul)
        z_NC = tile_rows(z_BLC.reshape(-1, d), batch_mul)
        if key is not None:
            if t is not None or noise is not None:
                raise ValueError("give either key or (t, noise), not both")
            t, noise = draw_training_noise(key, target_NZ.shape[0], c, self.train_schedule.num_timesteps)
        elif t is None or noise is None:
            raise ValueError("tiled_loss needs a key, or both t and noise")
        return self.loss(target_NZ, z_NC, t, noise)

    # -------------------------------------------------------------- sampling
    def sample(
        self,
        z_NC: jax.Array,
        cfg: float,
        *,
        init_noise: jax.Array,
        step_noise: jax.Array,
        temperature: float | jax.Array = 1.0,
        guided: bool | None = None,
    ) -> jax.Array:
        """Run the respaced IDDPM chain with injected noise; returns ``[N, Z]`` × ``vae_scale``.

        ``guided`` (optional) fixes the branch explicitly so that ``cfg`` may be a traced
        value (the caller then handles the ``cfg == 1.0`` case itself).

        ``cfg`` (a concrete number): exactly 1.0 runs the plain network, anything else
        runs ``forward_with_cfg`` (``z`` = cond rows then uncond rows). ``init_noise`` is
        ``[N/2, Z]`` with CFG (duplicated to both halves) or ``[N, Z]`` without;
        ``step_noise[j]`` ``[N, Z]`` is the noise of loop iteration j (respaced step
        ``S-1-j``; the last one is unused). With CFG all N rows are returned (as the
        reference does); only the first N/2 (conditional) rows are the samples.
        """
        if guided is None:
            guidance = _static_cfg(cfg)
            guided = guidance != 1.0
        else:
            guidance = cfg
        z_NC = jnp.asarray(z_NC)
        init_noise, step_noise = jnp.asarray(init_noise, jnp.float32), jnp.asarray(step_noise, jnp.float32)
        c = self.target_channels
        if z_NC.ndim != 2 or z_NC.shape[1] != self.z_channels:
            raise ValueError(f"z must be [N, {self.z_channels}], got shape {tuple(z_NC.shape)}")
        n = z_NC.shape[0]
        if guided and n % 2:
            raise ValueError(f"with guidance z must hold cond rows then uncond rows (even N), got N={n}")
        n_init = n // 2 if guided else n
        if init_noise.shape != (n_init, c):
            raise ValueError(
                f"init_noise must be [{n_init}, {c}] ({'N/2 with CFG' if guided else 'N without CFG'}), "
                f"got shape {tuple(init_noise.shape)}"
            )
        sched = self.gen_schedule
        s = sched.num_timesteps
        if step_noise.shape != (s, n, c):
            raise ValueError(f"step_noise must be [S={s}, N={n}, {c}], got shape {tuple(step_noise.shape)}")

        x_NZ = jnp.concatenate([init_noise, init_noise], axis=0) if guided else init_noise
        # fp32 [S] constants, gathered by the respaced step k inside the loop
        log_beta = sched.f32("log_betas")
        log_post_var = sched.f32("posterior_log_variance_clipped")
        recip = sched.f32("sqrt_recip_alphas_cumprod")
        recipm1 = sched.f32("sqrt_recipm1_alphas_cumprod")
        coef1, coef2 = sched.f32("posterior_mean_coef1"), sched.f32("posterior_mean_coef2")
        tmap = jnp.asarray(sched.timestep_map, jnp.int32)

        def step(mdl: "DiffLoss", carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            j, x = carry
            k = s - 1 - j  # loop iteration j runs respaced step S-1-j
            t_N = jnp.full((n,), tmap[k], jnp.int32)
            if guided:
                out = mdl.net.forward_with_cfg(x, t_N, z_NC, guidance)
            else:
                out = mdl.net(x, t_N, z_NC)
            out = out.astype(jnp.float32)
            eps, v = out[:, :c], out[:, c:]
            frac = (v + 1) / 2
            log_var = frac * log_beta[k] + (1 - frac) * log_post_var[k]
            x0 = jnp.clip(recip[k] * x - recipm1[k] * eps, -1.0, 1.0)
            mean = coef1[k] * x0 + coef2[k] * x
            noise_term = jnp.exp(0.5 * log_var) * step_noise[j] * temperature
            return j + 1, mean + jnp.where(k != 0, noise_term, 0.0)  # no noise at the last step

        _, x_NZ = nn.while_loop(lambda mdl, carry: carry[0] < s, step, self, (jnp.int32(0), x_NZ))
        return x_NZ * self.vae_scale

    def sample_with_key(
        self, z_NC: jax.Array, cfg: float, key: jax.Array, temperature: float | jax.Array = 1.0
    ) -> jax.Array:
        """``sample`` with its initial and per-step noise drawn from ``key`` (deterministic per key)."""
        guided = _static_cfg(cfg) != 1.0
        z_NC = jnp.asarray(z_NC)
        if z_NC.ndim != 2:
            raise ValueError(f"z must be [N, {self.z_channels}], got shape {tuple(z_NC.shape)}")
        n, c, s = z_NC.shape[0], self.target_channels, self.gen_schedule.num_timesteps
        k_init, k_step = jax.random.split(key)
        init_noise = jax.random.normal(k_init, ((n // 2 if guided else n), c), jnp.float32)
        step_noise = jax.random.normal(k_step, (s, n, c), jnp.float32)
        return self.sample(z_NC, cfg, init_noise=init_noise, step_noise=step_noise, temperature=temperature)
