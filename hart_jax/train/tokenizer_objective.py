"""The hybrid tokenizer's training objective (VQGAN-style, as the release's modules imply).

Dimensions (docs/design.md): B batch; H height (image); W width (image); C channels (3);
h small height (the discriminator's logits map); w small width; V vocabulary (codebook
size); S scales.

Generator (the autoencoder), one forward ``HARTAutoEncoder.__call__`` per step:
  ``nll  = recon_weight * rec(out, x) + perceptual_weight * mean LPIPS(out, x)``
  ``loss = nll + vq_weight * vq_loss + factor * lambda * g(D(out))``
with ``out`` the unclamped reconstruction, the decoder fed the discrete-only latent with
probability ``skip_continuous_prob`` (else the hybrid one, = the continuous f); ``rec``
is MSE (``"l2"``, the release's) or L1; ``g`` is ``-mean(logits)`` (hinge) or
``mean(softplus(-logits))`` (vanilla); ``factor`` is 1 from step ``disc_start`` on, else
0 (then no adversarial gradient at all); ``lambda`` is VQGAN's adaptive weight
``clip(|grad_last nll| / (|grad_last g| + 1e-4), 0, 1e4) * disc_weight`` (detached),
``last`` = ``decoder/conv_out/kernel``, or ``disc_weight`` alone.

Discriminator: ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(sg(out)))))`` (hinge, as
taming's ``hinge_d_loss``) or the vanilla softplus form, real and fake batches in two
train-mode calls (each normalised with its own batch statistics, running stats updated
real then fake, as taming's two calls do).

The gradient costs one forward and one full backward of the autoencoder: ``jax.vjp``
of ``params -> (out, vq_loss)`` is pulled back once with the combined cotangent, and
twice more for lambda with only the last conv's kernel kept (XLA drops the rest). Before
``disc_start`` the adversarial branch (discriminator forward / backward, lambda) is skipped
by a ``lax.cond`` and the discriminator's own update likewise (``tokenizer_step``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from hart_jax.models.autoencoder import HARTAutoEncoder
from hart_jax.models.discriminator import NLayerDiscriminator

# (frozen perceptual params, x_BHWC, y_BHWC) -> per-image distance [B]; inputs in [-1, 1].
PerceptualFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

LAST_LAYER = ("decoder", "conv_out", "kernel")
ADAPTIVE_MAX = 1e4


@dataclasses.dataclass(frozen=True)
class TokenizerLossConfig:
    """Static settings of the tokenizer objective (the config section ``tokenizer_loss``)."""

    rec_loss: str = "l2"  # "l2" (the release's MSE) | "l1"
    recon_weight: float = 1.0
    vq_weight: float = 1.0
    skip_continuous_prob: float = 0.5  # the paper's 50/50 alternation
    perceptual_weight: float = 1.0
    perceptual_weights: str = ""  # local LPIPS weights; empty: no perceptual loss
    disc_weight: float = 0.8
    disc_start: int = 0
    disc_loss: str = "hinge"  # "hinge" | "vanilla"
    adaptive_weight: bool = True

    def __post_init__(self) -> None:
        if self.rec_loss not in ("l2", "l1"):
            raise ValueError(f"tokenizer_loss.rec_loss must be 'l2' or 'l1', got {self.rec_loss!r}")
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"tokenizer_loss.disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
        if not 0.0 <= self.skip_continuous_prob <= 1.0:
            raise ValueError(f"tokenizer_loss.skip_continuous_prob must be in [0, 1], got {self.skip_continuous_prob}")

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> "TokenizerLossConfig":
        """From a config section (unknown keys are an error naming them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise ValueError(f"tokenizer_loss: unknown field(s) {', '.join(extra)}")
        return cls(**dict(d))

    @property
    def perceptual(self) -> bool:
        return bool(self.perceptual_weights) and self.perceptual_weight > 0


# ------------------------------------------------------------------ pieces
def to_float_images(img_BHWC: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [-1, 1] (``x / 127.5 - 1``); float input is passed through."""
    if jnp.issubdtype(img_BHWC.dtype, jnp.floating):
        return img_BHWC.astype(jnp.float32)
    return img_BHWC.astype(jnp.float32) / 127.5 - 1.0


def reconstruction_loss(out_BHWC: jax.Array, x_BHWC: jax.Array, kind: str = "l2") -> jax.Array:
    """Mean squared (``l2``) or absolute (``l1``) error over every pixel and channel."""
    d = out_BHWC.astype(jnp.float32) - x_BHWC.astype(jnp.float32)
    return jnp.mean(jnp.square(d)) if kind == "l2" else jnp.mean(jnp.abs(d))


def generator_adv_loss(logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """``-mean(D(out))`` (hinge) or ``mean(softplus(-D(out)))`` (vanilla, non-saturating)."""
    if kind == "hinge":
        return -jnp.mean(logits_fake)
    return jnp.mean(jax.nn.softplus(-logits_fake))


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """taming's ``hinge_d_loss`` / ``vanilla_d_loss`` (both halved)."""
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def adaptive_weight(nll_last: jax.Array, g_last: jax.Array, disc_weight: float) -> jax.Array:
    """VQGAN: ``clip(|nll_last| / (|g_last| + 1e-4), 0, 1e4) * disc_weight``, detached."""
    w = jnp.linalg.norm(nll_last.ravel()) / (jnp.linalg.norm(g_last.ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, ADAPTIVE_MAX) * disc_weight)


def last_layer(tree: Mapping[str, Any]) -> jax.Array:
    """The decoder's last conv kernel (``decoder/conv_out/kernel``) of a params/grads tree."""
    for k in LAST_LAYER:
        tree = tree[k]
    return tree


def psnr(out_BHWC: jax.Array, x_BHWC: jax.Array) -> jax.Array:
    """PSNR in dB of the clamped reconstruction against ``x`` (both in [-1, 1], peak-to-peak 2)."""
    mse = jnp.mean(jnp.square(jnp.clip(out_BHWC, -1.0, 1.0) - x_BHWC))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def codebook_stats(idx_list: Sequence[jax.Array], vocab_size: int) -> dict[str, jax.Array]:
    """Per scale k, from the batch's indices: ``usage/s{k}`` (fraction of the V codes used)
    and ``perplexity/s{k}`` (exp of the entropy of the code histogram, in [1, V]), plus
    ``usage/mean`` and ``perplexity/mean`` over scales."""
    out: dict[str, jax.Array] = {}
    us, ps = [], []
    for k, idx in enumerate(idx_list):
        hist = jnp.bincount(idx.ravel(), length=vocab_size).astype(jnp.float32)
        p = hist / jnp.sum(hist)
        ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
        out[f"usage/s{k}"] = jnp.mean((hist > 0).astype(jnp.float32))
        out[f"perplexity/s{k}"] = jnp.exp(ent)
        us.append(out[f"usage/s{k}"])
        ps.append(out[f"perplexity/s{k}"])
    out["usage/mean"] = jnp.mean(jnp.stack(us))
    out["perplexity/mean"] = jnp.mean(jnp.stack(ps))
    return out


# --------------------------------------------------------------- gradients
def generator_grads(
    params: Any,
    disc_vars: Mapping[str, Any],
    x_BHWC: jax.Array,
    key: jax.Array,
    active: jax.Array,
    frozen: Any = None,
    *,
    model: HARTAutoEncoder,
    disc: NLayerDiscriminator,
    lcfg: TokenizerLossConfig,
    patch_nums: Sequence[int],
    perceptual_fn: PerceptualFn | None = None,
) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    """Gradient of the generator loss w.r.t. every autoencoder param.

    ``key`` feeds the ``"quantize"`` stream (the path draw); ``active`` (bool []) is
    ``step >= disc_start``: without it the gradient is exactly that of
    ``nll + vq_weight * vq`` and the discriminator is not run at all (``lax.cond``; the
    adversarial metrics ``g``, ``adaptive_lambda``, ``logits_fake`` read 0). ``frozen`` holds the perceptual network's params.
    Returns ``(grads, sg(out) [B, Hi, Wi, 3], metrics)``.
    """
    pn = tuple(patch_nums)

    def fwd(p):
        r = model.apply({"params": p}, x_BHWC, pn, lcfg.skip_continuous_prob, rngs={"quantize": key})
        return (r["out"], r["vq_loss"]), (r["idx"], r["use_continuous"])

    (out, vq), pullback, (idx, cont) = jax.vjp(fwd, params, has_aux=True)

    def nll_fn(o):
        rec = reconstruction_loss(o, x_BHWC, lcfg.rec_loss)
        perc = jnp.zeros((), jnp.float32)
        if perceptual_fn is not None and lcfg.perceptual_weight > 0:
            perc = jnp.mean(perceptual_fn(frozen, o, x_BHWC).astype(jnp.float32))
        return lcfg.recon_weight * rec + lcfg.perceptual_weight * perc, (rec, perc)

    def g_fn(o):
        logits, _ = disc.apply(dict(disc_vars), o, train=True, mutable=["batch_stats"])  # stats: the D step's
        return generator_adv_loss(logits, lcfg.disc_loss), logits

    (nll, (rec, perc)), d_nll = jax.value_and_grad(nll_fn, has_aux=True)(out)
    no_vq = jnp.zeros_like(vq)

    def adversarial(_):
        (g, logits_fake), d_g = jax.value_and_grad(g_fn, has_aux=True)(out)
        if lcfg.adaptive_weight:
            nll_last = last_layer(pullback((d_nll, no_vq))[0])
            g_last = last_layer(pullback((d_g, no_vq))[0])
            lam = adaptive_weight(nll_last, g_last, lcfg.disc_weight)
        else:
            lam = jnp.asarray(lcfg.disc_weight, jnp.float32)
        return d_nll + lam * d_g, g, lam, jnp.mean(logits_fake)

    def warm_up(_):  # before disc_start nothing of the discriminator runs
        z = jnp.zeros((), jnp.float32)
        return d_nll, z, z, z

    d_out, g, lam, logits_fake = jax.lax.cond(active, adversarial, warm_up, None)
    (grads,) = pullback((d_out, jnp.asarray(lcfg.vq_weight, vq.dtype)))
    loss = nll + lcfg.vq_weight * vq + lam * g
    metrics = dict(
        loss=loss, rec=rec, perceptual=perc, vq=vq, nll=nll, g=g, adaptive_lambda=lam,
        disc_active=active.astype(jnp.float32), logits_fake=logits_fake,
        psnr=psnr(out, x_BHWC), continuous=cont.astype(jnp.float32),
        **codebook_stats(idx, model.cfg.vocab_size),
    )
    return grads, jax.lax.stop_gradient(out), metrics


def discriminator_grads(
    disc_params: Any,
    disc_stats: Any,
    x_BHWC: jax.Array,
    fake_BHWC: jax.Array,
    *,
    disc: NLayerDiscriminator,
    lcfg: TokenizerLossConfig,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """Gradient of the discriminator loss; returns ``(grads, new batch_stats, metrics)``."""

    def loss_fn(dp):
        lr_, m1 = disc.apply({"params": dp, "batch_stats": disc_stats}, x_BHWC, train=True, mutable=["batch_stats"])
        lf, m2 = disc.apply(
            {"params": dp, "batch_stats": m1.get("batch_stats", disc_stats)}, fake_BHWC, train=True,
            mutable=["batch_stats"],
        )
        return discriminator_loss(lr_, lf, lcfg.disc_loss), (m2.get("batch_stats", disc_stats), lr_, lf)

    (d, (stats, lr_, lf)), grads = jax.value_and_grad(loss_fn, has_aux=True)(disc_params)
    return grads, stats, dict(d=d, logits_real=jnp.mean(lr_), logits_fake_d=jnp.mean(lf))
