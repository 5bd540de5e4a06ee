"""The jitted training step: gradient accumulation, clipping + AdamW, EMA, a finite guard.

``make_train_step`` returns ``step(state, batch, frozen_params, n_keep) -> (state, metrics)``,
jitted with explicit in/out shardings, the state donated and ``n_keep`` static. The batch
(global, leading axis B) is split into ``grad_accum`` micro-batches by striding (row
``i * A + a`` goes to micro-batch ``a``), so every micro-batch keeps the batch sharding.
When the loss or the gradient norm is not finite the step returns the input state
unchanged (with ``metrics["finite"] == 0``) so the caller can stop on a good state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hart_jax.models.transformer import HARTTransformer
from hart_jax.train.objective import FrozenModels, ObjectiveConfig, hart_loss, prepare_batch
from hart_jax.train.sharding import batch_sharding
from hart_jax.train.state import TrainState


def split_micro(x: jax.Array, accum: int) -> jax.Array:
    """``[B, ...]`` -> ``[A, B / A, ...]`` with micro-batch ``a`` = rows ``a, a + A, ...``."""
    b = x.shape[0]
    if b % accum:
        raise ValueError(f"batch size {b} is not a multiple of grad_accum={accum}")
    return jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``decay * ema + (1 - decay) * params`` (fp32)."""
    return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)


def train_step_fn(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    frozen_params: Mapping[str, Any],
    n_keep: int,
    *,
    model: HARTTransformer,
    frozen: FrozenModels,
    ocfg: ObjectiveConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float,
    grad_accum: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (un-jitted; see ``make_train_step``)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    micro = jax.tree_util.tree_map(lambda x: split_micro(x, grad_accum), dict(batch))

    def micro_grads(a: jax.Array, mb: Mapping[str, jax.Array]):
        prep = prepare_batch(mb, model.cfg, frozen, frozen_params)
        loss_fn = functools.partial(hart_loss, model=model, ocfg=ocfg, key=jax.random.fold_in(key, a), n_keep=n_keep, **prep)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, metrics

    if grad_accum == 1:
        grads, metrics = micro_grads(jnp.int32(0), jax.tree_util.tree_map(lambda x: x[0], micro))
    else:
        def body(carry, xs):
            g_acc, m_acc = carry
            a, mb = xs
            g, m = micro_grads(a, mb)
            return (jax.tree_util.tree_map(jnp.add, g_acc, g), jax.tree_util.tree_map(jnp.add, m_acc, m)), None

        zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        shapes = jax.eval_shape(micro_grads, jnp.int32(0), jax.tree_util.tree_map(lambda x: x[0], micro))[1]
        zeros_m = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (jnp.arange(grad_accum), micro))
        grads = jax.tree_util.tree_map(lambda g: g / grad_accum, grads)
        metrics = jax.tree_util.tree_map(lambda m: m / grad_accum, metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, ema_decay)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, rng=state.rng)
    out = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(
        metrics,
        grad_norm=grad_norm,
        param_norm=optax.tree.norm(params),
        update_norm=optax.tree.norm(updates),
        lr=jnp.asarray(schedule(state.step), jnp.float32),
        finite=finite.astype(jnp.float32),
    )
    return out, metrics


def batch_shardings(batch_like: Mapping[str, Any], mesh: jax.sharding.Mesh, rules: Any) -> dict[str, Any]:
    """Every batch array split along its leading axis by the ``batch`` rule."""
    return {k: batch_sharding(mesh, rules) for k in batch_like}


def make_train_step(
    *,
    model: HARTTransformer,
    frozen: FrozenModels,
    ocfg: ObjectiveConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float,
    grad_accum: int,
    mesh: jax.sharding.Mesh,
    rules: Any,
    state_shardings: Any,
    batch_keys: tuple[str, ...],
    frozen_shardings: Any,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted, sharded step: ``step(state, batch, frozen_params, n_keep)``."""
    fn = functools.partial(
        train_step_fn, model=model, frozen=frozen, ocfg=ocfg, tx=tx, schedule=schedule,
        ema_decay=ema_decay, grad_accum=grad_accum,
    )
    bsh = batch_shardings(batch_keys, mesh, rules)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, bsh, frozen_shardings),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
        static_argnums=(3,),
    )
    rules_list = list(rules)

    def step(state, batch, frozen_params, n_keep):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules_list):
            return jitted(state, batch, frozen_params, int(n_keep))

    step.jitted = jitted  # type: ignore[attr-defined]
    step.lower = lambda *a: _lower(jitted, mesh, rules_list, *a)  # type: ignore[attr-defined]
    return step


def _lower(jitted, mesh, rules, *args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted.lower(*args)
