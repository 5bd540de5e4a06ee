"""The training objective, as the release's training forward computes it.

Dimensions (docs/design.md): B batch; T context tokens; E text width; Z latent channels;
V vocabulary (codebook size); S scales; L tokens; k kept tokens (of the last scale;
``mid`` = the tokens of scales 1..S-2).

Per batch:
  1. frozen tokenizer (in the step, or codes from the data): per-scale indices,
     ``last_layer_gt`` (residual before the last discrete scale) and the teacher-
     forcing inputs ``x_BLZ``; frozen text encoder (in the step) or cached context;
  2. conditioning dropout for CFG: text rows zeroed (raw context, before
     ``context_norm``), labels replaced by the null class, with probability
     ``cond_drop_rate`` (``cond_drop_bug`` reproduces the release's ``randn < rate``,
     which drops ~54% at 0.1);
  3. token dropping: K of the last scale's tokens kept per sample (random order,
     ascending positions); K is static per compiled step (see ``keep_count``);
  4. cross-entropy of every logits row against the next scale's token (mean over the
     1 + mid + K rows and the batch);
  5. diffusion loss on the kept tokens' ``last_layer_gt - E[idx]``, ``idx`` sampled from
     the model's own last-scale logits (top-k 600, top-p 0.96; ground truth where the
     logits are not finite, or always with ``diff_target="gt"``), rows tiled
     ``diffusion_batch_mul`` times.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.models.autoencoder import HARTAutoEncoder
from hart_jax.models.transformer import HARTTransformer, T2IConfig
from hart_jax.sampling import top_k_top_p_mask
from hart_jax.train.sharding import with_logical

MIN_KEEP = 32


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Static settings of the loss."""

    cond_drop_rate: float = 0.1
    cond_drop_bug: bool = False
    diffusion_batch_mul: int = 4
    ce_weight: float = 1.0
    diff_weight: float = 1.0
    diff_target: str = "sampled"  # "sampled" (the release) | "gt"
    top_k: int = 600
    top_p: float = 0.96

    def __post_init__(self) -> None:
        if self.diff_target not in ("sampled", "gt"):
            raise ValueError(f"diff_target must be 'sampled' or 'gt', got {self.diff_target!r}")
        if not 0.0 <= self.cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")


def keep_count(rng: np.random.Generator, n_last: int, quantum: int = 1, enabled: bool = True) -> int:
    """Host-side draw of the number of kept last-scale tokens.

    The release draws one drop ratio per batch from a normal(1, 0.25) truncated to
    [0.5, 1] and drops ``min(ceil(n_last * ratio), n_last - 32)`` tokens. In JAX the kept
    count is a static shape, so it is rounded UP to a multiple of ``quantum`` (at most
    ``n_last``): each distinct value compiles the step once (at 4096 tokens and quantum
    256 there are at most 8). ``enabled=False`` keeps every token.
    """
    if not enabled:
        return n_last
    while True:
        r = rng.normal(1.0, 0.25)
        if 0.5 <= r <= 1.0:
            break
    n_drop = max(min(math.ceil(n_last * r), n_last - MIN_KEEP), 0)
    k = n_last - n_drop
    q = max(int(quantum), 1)
    return int(min(n_last, -(-k // q) * q))


def cond_dropout(key: jax.Array, batch: int, rate: float, bug: bool) -> jax.Array:
    """``[B]`` bool: rows whose condition is dropped (``uniform < rate``, or ``normal < rate``)."""
    u = jax.random.normal(key, (batch,)) if bug else jax.random.uniform(key, (batch,))
    return u < rate


def kept_indices(key: jax.Array, batch: int, n_last: int, n_keep: int) -> jax.Array:
    """``[B, K]`` ascending positions of the kept tokens (a random order per sample,
    the first ``n_last - K`` of it dropped)."""
    perms = jax.vmap(lambda k: jax.random.permutation(k, n_last))(jax.random.split(key, batch))
    return jnp.sort(perms[:, n_last - n_keep :], axis=1).astype(jnp.int32)


def tokenize_images(
    tok_model: HARTAutoEncoder, tok_vars: Any, images: jax.Array, patch_nums: tuple[int, ...]
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """uint8 (or [-1, 1] float) images -> (indices per scale, last_layer_gt, x_BLZ), no gradient."""
    img = images.astype(jnp.float32) / 127.5 - 1.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)

    def fn(m: HARTAutoEncoder, x: jax.Array):
        f = m.encode(x)
        idx, frest = m.quantize.f_to_idx_and_frest(f, patch_nums)
        return idx, frest, m.quantize.teacher_forcing_inputs(idx, patch_nums)

    idx, frest, x_BLZ = jax.lax.stop_gradient(tok_model.apply(tok_vars, img, method=fn))
    return list(idx), frest, x_BLZ


def teacher_inputs_from_codes(
    tok_model: HARTAutoEncoder, tok_vars: Any, codes_BL: jax.Array, patch_nums: tuple[int, ...]
) -> tuple[list[jax.Array], jax.Array]:
    """Precomputed flat indices ``[B, sum pn^2]`` -> (indices per scale, x_BLZ)."""
    idx, start = [], 0
    for pn in patch_nums:
        idx.append(codes_BL[:, start : start + pn * pn].astype(jnp.int32))
        start += pn * pn
    x = tok_model.apply(tok_vars, idx, method=lambda m, i: m.quantize.teacher_forcing_inputs(i, patch_nums))
    return idx, jax.lax.stop_gradient(x)


def codebook(tok_vars: Any) -> jax.Array:
    """The tokenizer's codebook ``[V, Z]``."""
    return tok_vars["params"]["quantize"]["embedding"]["embedding"]


def hart_loss(
    params: Any,
    model: HARTTransformer,
    ocfg: ObjectiveConfig,
    *,
    context: jax.Array,
    context_position_ids: jax.Array | None,
    context_mask: jax.Array | None,
    indices: list[jax.Array],
    last_layer_gt: jax.Array,
    x_BLZ: jax.Array,
    codebook_VZ: jax.Array,
    key: jax.Array,
    n_keep: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss ``ce_weight * CE + diff_weight * diffusion`` and its terms.

    ``context``: raw text features ``[B, T, E]`` or class labels ``[B]``.
    """
    cfg: T2IConfig = model.cfg
    b = x_BLZ.shape[0]
    n_last = cfg.patch_nums[-1] ** 2
    k_drop, k_keep, k_idx, k_diff = jax.random.split(key, 4)

    drop = cond_dropout(k_drop, b, ocfg.cond_drop_rate, ocfg.cond_drop_bug)
    if cfg.is_c2i:
        context = jnp.where(drop, cfg.num_classes, context.astype(jnp.int32))
    else:
        context = jnp.where(drop[:, None, None], 0.0, context.astype(jnp.float32))
        context = with_logical(context, ("batch", "length", "act_embed"))
    x_BLZ = with_logical(x_BLZ, ("batch", "length", "act_embed"))

    kept = None if n_keep >= n_last else kept_indices(k_keep, b, n_last, n_keep)
    last_gt_Bk = indices[-1] if kept is None else jnp.take_along_axis(indices[-1], kept, axis=1)
    cont_BkZ = last_layer_gt if kept is None else jnp.take_along_axis(last_layer_gt, kept[..., None], axis=1)
    targets = jnp.concatenate([i.astype(jnp.int32) for i in indices[:-1]] + [last_gt_Bk.astype(jnp.int32)], axis=1)

    def fwd(m: HARTTransformer):
        logits, h, _ = m.teacher_forced(context, x_BLZ, context_position_ids, context_mask, kept)
        logits = with_logical(logits, ("batch", "length", "vocab"))
        last = jax.lax.stop_gradient(logits[:, logits.shape[1] - n_keep :])
        if ocfg.diff_target == "sampled":
            masked = top_k_top_p_mask(last, min(ocfg.top_k, cfg.vocab_size), ocfg.top_p)
            idx = jax.random.categorical(k_idx, masked, axis=-1)
            ok = jnp.all(jnp.isfinite(last), axis=-1)
            idx = jnp.where(ok, idx, last_gt_Bk)
        else:
            idx = last_gt_Bk
        code = jnp.take(codebook_VZ, idx, axis=0).astype(jnp.float32)
        z = m.diffusion_condition(h, code)
        diff = m.diffloss.tiled_loss(cont_BkZ - code, z.astype(jnp.float32), ocfg.diffusion_batch_mul, key=k_diff)
        return logits, diff, idx

    logits, diff, idx = model.apply({"params": params}, method=fwd)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jnp.mean(logz - picked)
    total = ocfg.ce_weight * ce + ocfg.diff_weight * diff
    metrics = {
        "loss": total,
        "ce": ce,
        "diff": diff,
        "acc": jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)),
        "acc_last_sampled": jnp.mean((idx == last_gt_Bk).astype(jnp.float32)),
        "cond_dropped": jnp.mean(drop.astype(jnp.float32)),
    }
    return total, metrics


def prepare_batch(
    batch: Mapping[str, jax.Array],
    cfg: T2IConfig,
    frozen: "FrozenModels",
    frozen_params: Mapping[str, Any],
) -> dict[str, Any]:
    """Run the frozen tokenizer / text encoder on a (micro-)batch as needed."""
    pn = tuple(cfg.patch_nums)
    tok_vars = frozen_params["tokenizer"]
    if "codes" in batch:
        indices, x = teacher_inputs_from_codes(frozen.tokenizer, tok_vars, batch["codes"], pn)
        last_gt = batch["last_layer_gt"].astype(jnp.float32)
    else:
        indices, last_gt, x = tokenize_images(frozen.tokenizer, tok_vars, batch["image"], pn)
    out: dict[str, Any] = dict(indices=indices, last_layer_gt=last_gt, x_BLZ=x, codebook_VZ=codebook(tok_vars))
    if cfg.is_c2i:
        out.update(context=batch["label"], context_position_ids=None, context_mask=None)
    else:
        if "context" in batch:
            ctx = batch["context"]
        else:
            if frozen.text is None:
                raise ValueError("the batch has prompt token ids but no text encoder is configured")
            hidden = frozen.text.apply({"params": frozen_params["text"]}, batch["input_ids"], batch["attention_mask"])
            ctx = jax.lax.stop_gradient(hidden[:, -cfg.context_token :].astype(jnp.float32))
        out.update(
            context=ctx, context_position_ids=batch["context_position_ids"].astype(jnp.int32),
            context_mask=batch["context_mask"].astype(bool),
        )
    return out


@dataclasses.dataclass(frozen=True)
class FrozenModels:
    """The frozen modules (hashable; their params travel separately)."""

    tokenizer: HARTAutoEncoder
    text: Any = None  # hart_jax.models.text_encoder.Qwen2Model or None
