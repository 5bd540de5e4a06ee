"""The jitted tokenizer training step: generator update, discriminator update, EMA, finite guard.

``make_tokenizer_step`` returns ``step(state, batch, frozen) -> (state, metrics)``, jitted
with explicit in/out shardings and the state donated. ``batch["image"]`` is uint8
``[B, Hi, Wi, 3]`` (converted to [-1, 1] inside); ``frozen`` holds the perceptual
network's params (``{}`` without one). Per step, with ``key = fold_in(rng, step)``:

  1. generator: ``tokenizer_objective.generator_grads`` (path draw from ``fold_in(key, 0)``),
     frozen leaves masked, AdamW (``optim``), EMA of the trainable leaves;
  2. discriminator on ``(x, sg(out))`` of the same forward, AdamW (``disc_optim``); before
     ``disc_start`` its params, batch stats and optimizer state are kept as they were and
     neither it nor the adversarial term is computed (``lax.cond``: warm-up steps cost what
     an autoencoder-only step costs);
  3. a NaN/inf generator loss or gradient norm (or, once active, discriminator loss or
     gradient norm) returns the input state unchanged with ``metrics["finite"] == 0``.

There is no gradient accumulation: BatchNorm statistics and the adaptive weight are
per-batch quantities, so micro-batches would not reproduce the full batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hart_jax.models.autoencoder import HARTAutoEncoder
from hart_jax.models.discriminator import NLayerDiscriminator
from hart_jax.train.sharding import batch_sharding
from hart_jax.train.tokenizer_objective import (
    PerceptualFn, TokenizerLossConfig, discriminator_grads, generator_grads, to_float_images,
)
from hart_jax.train.tokenizer_state import TokenizerTrainState, ema_update_trainable, mask_frozen


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)


def tokenizer_step_fn(
    state: TokenizerTrainState,
    batch: Mapping[str, jax.Array],
    frozen: Any,
    *,
    model: HARTAutoEncoder,
    disc: NLayerDiscriminator,
    lcfg: TokenizerLossConfig,
    patch_nums: Sequence[int],
    labels: Any,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    disc_schedule: optax.Schedule,
    ema_decay: float,
    perceptual_fn: PerceptualFn | None = None,
) -> tuple[TokenizerTrainState, dict[str, jax.Array]]:
    """One generator + discriminator step (un-jitted; see ``make_tokenizer_step``)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    x = to_float_images(batch["image"])
    active = state.step >= lcfg.disc_start

    disc_vars = {"params": state.disc_params, "batch_stats": state.disc_batch_stats}
    grads, fake, gm = generator_grads(
        state.params, disc_vars, x, jax.random.fold_in(key, 0), active, frozen, model=model, disc=disc,
        lcfg=lcfg, patch_nums=patch_nums, perceptual_fn=perceptual_fn,
    )
    grads = mask_frozen(grads, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update_trainable(state.ema_params, params, ema_decay, labels)
    grad_norm = optax.tree.norm(grads)

    def disc_update(_):
        dgrads, dstats, dm = discriminator_grads(state.disc_params, state.disc_batch_stats, x, fake, disc=disc,
                                                 lcfg=lcfg)
        dupdates, dopt = disc_tx.update(dgrads, state.disc_opt_state, state.disc_params)
        return optax.apply_updates(state.disc_params, dupdates), dstats, dopt, dm, optax.tree.norm(dgrads)

    def disc_hold(_):  # before disc_start: kept as they were, and not computed
        z = jnp.zeros((), jnp.float32)
        return (state.disc_params, state.disc_batch_stats, state.disc_opt_state,
                dict(d=z, logits_real=z, logits_fake_d=z), z)

    dparams, dstats, dopt, dm, d_grad_norm = jax.lax.cond(active, disc_update, disc_hold, None)

    finite = jnp.isfinite(gm["loss"]) & jnp.isfinite(grad_norm)
    finite &= ~active | (jnp.isfinite(dm["d"]) & jnp.isfinite(d_grad_norm))
    new = TokenizerTrainState(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
        disc_params=dparams, disc_batch_stats=dstats, disc_opt_state=dopt, rng=state.rng,
    )
    out = _select(finite, new, state)
    metrics = dict(
        gm, **dm,
        grad_norm=grad_norm, param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates),
        d_grad_norm=d_grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32),
        d_lr=jnp.asarray(disc_schedule(state.step), jnp.float32), finite=finite.astype(jnp.float32),
    )
    return out, metrics


def make_tokenizer_step(
    *,
    model: HARTAutoEncoder,
    disc: NLayerDiscriminator,
    lcfg: TokenizerLossConfig,
    patch_nums: Sequence[int],
    labels: Any,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    disc_schedule: optax.Schedule,
    ema_decay: float,
    mesh: jax.sharding.Mesh,
    rules: Any,
    state_shardings: Any,
    frozen_shardings: Any,
    perceptual_fn: PerceptualFn | None = None,
) -> Callable[..., tuple[TokenizerTrainState, dict[str, jax.Array]]]:
    """The jitted, sharded step: ``step(state, {"image": uint8 [B, Hi, Wi, 3]}, frozen)``."""
    fn = functools.partial(
        tokenizer_step_fn, model=model, disc=disc, lcfg=lcfg, patch_nums=tuple(patch_nums), labels=labels, tx=tx,
        disc_tx=disc_tx, schedule=schedule, disc_schedule=disc_schedule, ema_decay=ema_decay,
        perceptual_fn=perceptual_fn,
    )
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, {"image": batch_sharding(mesh, rules)}, frozen_shardings),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )
    rules_list = list(rules)

    def step(state, batch, frozen):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules_list):
            return jitted(state, {"image": batch["image"]}, frozen)

    step.jitted = jitted  # type: ignore[attr-defined]
    return step
