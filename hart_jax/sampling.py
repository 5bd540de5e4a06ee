"""HART's sampling procedure (``autoregressive_infer_cfg``) as one jittable function.

Dimensions (docs/design.md): B batch (images); R doubled batch (2B rows with
classifier-free guidance, conditional rows first); T context tokens; l scale tokens;
V vocabulary (codebook size); Z latent channels; C channels (model width); S scales.

Per scale s = 0..N-2: run the scale's tokens through the blocks against the KV cache,
logits -> CFG ``(1+t) cond - t uncond`` with ``t = cfg * s / (N-1)`` -> top-k (600 for
s < 7, else 300, as the release hard-codes) / top-p masking -> sample (or argmax in
greedy mode) -> code vector (or, with ``more_smooth``, a Gumbel-softmax mixture of
codebook rows at ``tau = max(0.27 (1 - 0.95 r), 0.005)``) -> f_hat += φ(bicubic(.)) ->
next input ``area(f_hat, pn_{s+1})``. The last scale reuses the previous scale's ratio
(``stale_last_ratio``, the release's behaviour) for CFG, Gumbel and the diffusion head;
the diffusion head samples the continuous residual conditioned on
``decoder_norm(h + word_embed(E[idx]))``; f_hat += code + residual (no φ); decode to an
image in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from hart_jax.attention import constrain_for_kernels
from hart_jax.kernels.cache_attention import padded_cache_length
from hart_jax.models.autoencoder import HARTAutoEncoder
from hart_jax.models.transformer import HARTTransformer

Params = Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings that shape the program (static: one compile per distinct value).
    The guidance scale and the random keys are runtime inputs of ``sample_images``.

    ``top_k=None`` is the release's stage rule (600 for s < 7, else 300); an int
    applies to every scale (0 disables). ``greedy`` takes the argmax instead of
    sampling (parity checks). ``stale_last_ratio=False`` uses ``t = cfg`` at the last
    scale instead of the release's reused ``(N-2)/(N-1)`` ratio. ``scan_layers`` runs
    the blocks of each stage in a ``fori_loop`` indexing the stacked block params (one
    block body to compile instead of depth x stages copies; same numbers); without it
    each block is unrolled on its slice of the stack.
    """

    top_k: int | None = None
    top_p: float = 0.0
    more_smooth: bool = True
    greedy: bool = False
    diffusion: bool = True
    stale_last_ratio: bool = True
    temperature: float = 1.0
    scan_layers: bool = True

    def stage_top_k(self, si: int, vocab: int) -> int:
        """The top-k used at scale ``si`` (clamped to the vocabulary)."""
        k = (600 if si < 7 else 300) if self.top_k is None else self.top_k
        return min(k, vocab)

    def ratio(self, si: int, num_scales: int) -> float:
        """Guidance ratio ``r`` of scale si (the last scale reuses the previous one)."""
        n1 = num_scales - 1
        if si == n1 and self.stale_last_ratio:
            si = n1 - 1
        return si / n1


@flax.struct.dataclass
class InjectedNoise:
    """Noise recorded from a reference run, replacing the random draws (parity tests).

    ``gumbel[s]``: ``[B, l_s, V]`` Gumbel noise of scale s (``more_smooth``);
    ``diff_init``: ``[B*l, Z]``; ``diff_steps``: ``[J, 2B*l, Z]`` (l of the last scale).
    """

    gumbel: Sequence[jax.Array] | None = None
    diff_init: jax.Array | None = None
    diff_steps: jax.Array | None = None


def top_k_top_p_mask(logits_BlV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Logits with everything outside the top-k (ties kept) and the top-p nucleus set to -inf."""
    out = logits_BlV
    if top_k > 0:
        kth = jax.lax.top_k(out, top_k)[0][..., -1:]
        out = jnp.where(out < kth, -jnp.inf, out)
    if top_p > 0:
        order = jnp.argsort(out, axis=-1)  # ascending
        sorted_logits = jnp.take_along_axis(out, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove = cum <= (1.0 - top_p)
        remove = remove.at[..., -1].set(False)
        inv = jnp.argsort(order, axis=-1)
        out = jnp.where(jnp.take_along_axis(remove, inv, axis=-1), -jnp.inf, out)
    return out


def cfg_mix(logits_RlV: jax.Array, t: float) -> jax.Array:
    """Guided logits ``(1 + t) cond - t uncond`` from ``[2B, l, V]`` (cond rows first)."""
    b = logits_RlV.shape[0] // 2
    return (1 + t) * logits_RlV[:b] - t * logits_RlV[b:]


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """Per-image raw keys ``[B, 2]``: a single key is split, ``[B, 2]`` passes through."""
    key = jnp.asarray(key)
    if key.ndim == 1:
        return jax.random.split(key, batch)
    if key.shape != (batch, 2):
        raise ValueError(f"keys must be one PRNG key or one per image [{batch}, 2], got shape {key.shape}")
    return key


def _fold(keys_B2: jax.Array, tag: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (0, None))(keys_B2, tag)


def choose_tokens(
    logits_BlV: jax.Array,
    si: int,
    ratio: float,
    scfg: SamplingConfig,
    codebook_VZ: jax.Array,
    keys_B2: jax.Array,
    gumbel_BlV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sample scale ``si``'s indices ``[B, l]`` from guided logits and return their code
    vectors ``[B, l, Z]``: codebook rows, or with ``more_smooth`` the Gumbel-softmax
    mixture ``softmax((masked * (1 + r) + g) / tau) @ E`` on the top-k/top-p-masked logits.
    Each image draws from its own key (``keys_B2``), so results do not depend on batching."""
    masked = top_k_top_p_mask(logits_BlV, scfg.stage_top_k(si, codebook_VZ.shape[0]), scfg.top_p)
    if scfg.greedy:
        idx = jnp.argmax(masked, axis=-1).astype(jnp.int32)
    else:
        draw = lambda k, lg: jax.random.categorical(k, lg, axis=-1)
        idx = jax.vmap(draw)(_fold(keys_B2, 2 * si), masked).astype(jnp.int32)
    if not scfg.more_smooth:
        return idx, jnp.take(codebook_VZ, idx, axis=0)
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    if gumbel_BlV is not None:
        g = jnp.asarray(gumbel_BlV, jnp.float32)
    else:
        g = jax.vmap(lambda k: jax.random.gumbel(k, masked.shape[1:], jnp.float32))(_fold(keys_B2, 2 * si + 1))
    w = jax.nn.softmax((masked * (1 + ratio) + g) / tau, axis=-1)
    return idx, jnp.einsum("blv,vc->blc", w, codebook_VZ, precision=jax.lax.Precision.HIGHEST)


def diffusion_noise(keys_B2: jax.Array, tokens: int, channels: int, steps: int) -> tuple[jax.Array, jax.Array]:
    """Per-image diffusion noise: initial ``[B*l, Z]`` and per-step ``[J, 2B*l, Z]``
    (the unconditional rows reuse the conditional rows' noise; their samples are discarded)."""
    tag = 10_000
    init = jax.vmap(lambda k: jax.random.normal(k, (tokens, channels)))(_fold(keys_B2, tag))
    step = jax.vmap(lambda k: jax.random.normal(k, (steps, tokens, channels)))(_fold(keys_B2, tag + 1))
    b = keys_B2.shape[0]
    step = step.transpose(1, 0, 2, 3).reshape(steps, b * tokens, channels)
    return init.reshape(b * tokens, channels), jnp.concatenate([step, step], axis=1)


def cfg_inputs(
    context: jax.Array, context_mask: jax.Array, context_position_ids: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double the batch for guidance: unconditional rows have zero context, position
    ids 0 and mask ``[1, 0, ..., 0]`` (as the release builds them)."""
    ctx = jnp.concatenate([context, jnp.zeros_like(context)], 0)
    pos = jnp.concatenate([context_position_ids, jnp.zeros_like(context_position_ids)], 0)
    unc = jnp.zeros_like(context_mask).at[:, 0].set(True)
    return ctx, jnp.concatenate([context_mask, unc], 0), pos


def sample_images(
    t2i: HARTTransformer,
    t2i_vars: Params,
    tok: HARTAutoEncoder,
    tok_vars: Params,
    context: jax.Array,
    context_mask: jax.Array,
    context_position_ids: jax.Array,
    keys: jax.Array,
    guidance: float | jax.Array = 4.5,
    scfg: SamplingConfig = SamplingConfig(),
    injected: InjectedNoise | None = None,
    return_trace: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """Generate ``[B, H, W, 3]`` images in [0, 1] from text features.

    ``context [B, T, E]`` (Qwen2 last hidden states), ``context_mask [B, T]`` bool,
    ``context_position_ids [B, T]`` int; for the class-conditional variant ``context``
    is int labels ``[B]`` and the other two are None. ``keys``: one PRNG key, or one
    per image ``[B, 2]`` (image i's draws depend on its key only, so a batch equals
    single calls with the same keys). ``guidance`` (the CFG scale, may be traced; 1.0
    exactly runs the diffusion head unguided, as the release does). Random draws
    are replaced by ``injected`` noise where given. ``return_trace`` also returns a dict of every stage's
    CFG logits, indices, hidden states, f_hat and inputs (checked against fixtures).
    Jit with ``t2i``, ``tok``, ``scfg`` and ``return_trace`` static.
    """
    cfg = t2i.cfg
    pn = cfg.patch_nums
    n = len(pn)
    b = context.shape[0]
    trace: dict[str, Any] = {}
    apply = lambda method, *a: t2i.apply(t2i_vars, *a, method=method)
    codebook = tok_vars["params"]["quantize"]["embedding"]["embedding"]
    quant = lambda fn, *a: tok.apply(tok_vars, *a, method=lambda m, *x: fn(m.quantize, *x))

    if cfg.is_c2i:  # class labels [B]; unconditional rows get the null class
        ctx2 = jnp.concatenate([context, jnp.full_like(context, cfg.num_classes)], 0)
        mask2 = pos2 = None
    else:
        ctx2, mask2, pos2 = cfg_inputs(context, context_mask, context_position_ids)
    cond, sos = apply(HARTTransformer.condition, ctx2)
    lvl = apply(HARTTransformer.level_embedding)
    cache_shape = (2 * b, padded_cache_length(cfg.seq_len), cfg.num_heads, cfg.head_dim)
    # under a context mesh: rows (and heads) split the way the attention kernels read them
    pin = lambda x, layout: constrain_for_kernels(x, layout, 2 * b, cfg.num_heads)  # noqa: E731
    if scfg.scan_layers:
        caches = (pin(jnp.zeros((cfg.depth,) + cache_shape, t2i.dtype), "NBLHD"),) * 2
    else:
        caches = [(pin(jnp.zeros(cache_shape, t2i.dtype), "BLHD"),) * 2 for _ in range(cfg.depth)]
    f_hat = jnp.zeros((b, pn[-1], pn[-1], cfg.z_channels), jnp.float32)
    x = sos + lvl[0]
    keys_B2 = row_keys(keys, b)

    def pick(si: int, logits_RlV: jax.Array, ratio: float) -> tuple[jax.Array, jax.Array]:
        logits = cfg_mix(logits_RlV, guidance * ratio)
        trace[f"logits_cfg_s{si}"] = logits
        gumbel = None if injected is None or injected.gumbel is None else injected.gumbel[si]
        idx, emb = choose_tokens(logits, si, ratio, scfg, codebook, keys_B2, gumbel)
        trace[f"idx_s{si}"] = idx
        return idx, emb

    for si in range(n - 1):
        with jax.named_scope(f"stage_{si}"):  # stage names in the compiled program (bench/hlo_stats.py)
            ratio = scfg.ratio(si, n)
            h, caches = apply(HARTTransformer.stage, x, si, caches, cond, pos2, mask2)
            trace[f"hidden_s{si}"] = h
            if si == 0:
                h = h[:, -1:]
            idx, emb = pick(si, apply(HARTTransformer.logits, h, cond), ratio)
            emb = emb.reshape(b, pn[si], pn[si], cfg.z_channels)
            f_hat, nxt = quant(lambda q, *a: q.next_autoregressive_input(si, pn, *a), f_hat, emb)
            trace[f"fhat_s{si}"] = f_hat
            trace[f"next_in_s{si + 1}"] = nxt
            x = apply(lambda m, t: m.word_embed(t), nxt.reshape(b, -1, cfg.z_channels)) + lvl[si + 1]
            x = jnp.concatenate([x, x], 0)

    # ------------------------------------------------------------ last scale
    si = n - 1
    ratio = scfg.ratio(si, n)
    with jax.named_scope(f"stage_{si}"):
        h, _ = apply(HARTTransformer.stage, x, si, caches, cond, pos2, mask2)
        trace[f"hidden_s{si}"] = h
        idx, emb = pick(si, apply(HARTTransformer.logits, h, cond), ratio)
    l = pn[-1] ** 2
    if scfg.diffusion:
        hard = jnp.take(codebook, idx, axis=0)
        z = apply(HARTTransformer.diffusion_condition, h, jnp.concatenate([hard, hard], 0))
        z = z.reshape(2 * b * l, -1)
        t_last = guidance * ratio
        trace["diff_z"] = z
        if injected is not None and injected.diff_init is not None:
            init, steps = jnp.asarray(injected.diff_init), jnp.asarray(injected.diff_steps)
        else:
            init = steps = None  # drawn per image inside the head call

        def run_head(guided: bool):
            def fn(m, z, init, steps):
                if init is None:
                    sched_steps = m.diffloss.gen_schedule.num_timesteps
                    init, steps = diffusion_noise(keys_B2, l, cfg.z_channels, sched_steps)
                if not guided:  # every row denoised on its own: the uncond rows need noise too
                    init = jnp.concatenate([init, init], 0)
                return m.diffloss.sample(
                    z, t_last, init_noise=init, step_noise=steps, temperature=scfg.temperature, guided=guided
                )

            return lambda z: t2i.apply(t2i_vars, z, init, steps, method=fn)

        with jax.named_scope("diffusion_head"):
            if isinstance(t_last, (int, float)):
                res = run_head(t_last != 1.0)(z)
            else:
                res = jax.lax.cond(t_last == 1.0, run_head(False), run_head(True), z)
        trace["diff_out"] = res
        emb = emb + res[: b * l].reshape(b, l, -1)
    f_hat = f_hat + emb.reshape(b, pn[-1], pn[-1], cfg.z_channels)
    trace["fhat_final"] = f_hat
    with jax.named_scope("decoder"):
        img = (tok.apply(tok_vars, f_hat, method=HARTAutoEncoder.decode) + 1.0) * 0.5
    return (img, trace) if return_trace else img
