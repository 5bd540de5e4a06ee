"""Train state, the release's weight initialisation, the optimizer and sharded creation.

``TrainState`` holds fp32 master ``params``, the optax state, the EMA of the params
(``ema_params``, what sampling loads by default), the step and the base RNG key (raw
``uint32`` key data so that checkpoints hold a plain array). The state is created
inside one jitted function whose ``out_shardings`` come from the logical-axis rules,
after ``jax.eval_shape`` gave its structure, so the full model never sits on one device.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from hart_jax.models.transformer import HARTTransformer, T2IConfig, init_variables
from hart_jax.train.sharding import path_str, tree_shardings


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree)."""

    step: jax.Array  # int32 []
    params: Any  # fp32 master weights (the "params" collection)
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # uint32 key data


# ------------------------------------------------------------ init weights
def _trunc_normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32) * std


def _xavier_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    fan_in, fan_out = shape[0], shape[-1]
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -a, a)


def release_init(params: Mapping[str, Any], cfg: T2IConfig, key: jax.Array, init_std: float = 0.02) -> Any:
    """Re-initialise ``params`` as the release's ``init_weights`` does.

    Transformer: every Dense kernel and embedding trunc-normal(``init_std``; < 0 means
    ``sqrt(1 / (3C))``), biases 0, norm scales 1; ``head`` kernel x0.02; ``head_nm.ada_lin``
    x0.5; each block's ``attn.proj`` / sqrt(2 depth); per-block ``ada_lin`` columns of
    (gamma1, gamma2) x1e-5 and the rest x0.5. ``pos_start`` and ``q_bias``/``v_bias`` keep
    the model's own init (trunc-normal sqrt(1/3C), zeros). Diffusion head: xavier-uniform
    Dense kernels, zero biases, time-MLP normal(0.02), zeroed AdaLN modulations and final
    linear. The blocks are one stack ``blocks/...`` (leading depth axis), drawn elementwise alike.
    """
    c = cfg.embed_dim
    std = init_std if init_std >= 0 else math.sqrt(1 / c / 3)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree_util.tree_structure(params)
    keys = jax.random.split(key, len(flat))
    out = []
    for (path, x), k in zip(flat, keys):
        p = path_str(path)
        shape, leaf = x.shape, x
        if p.startswith("diffloss/"):
            if p.endswith("kernel"):
                if "adaLN_modulation" in p or "final_layer/linear" in p:
                    leaf = jnp.zeros(shape, jnp.float32)
                elif "time_embed/" in p:
                    leaf = jax.random.normal(k, shape, jnp.float32) * 0.02
                else:
                    leaf = _xavier_uniform(k, shape)
            elif p.endswith("bias"):
                leaf = jnp.zeros(shape, jnp.float32)
            elif p.endswith("scale"):
                leaf = jnp.ones(shape, jnp.float32)
        elif p.endswith("kernel") or p.endswith("embedding"):
            leaf = _trunc_normal(k, shape, std)
            if p == "head/kernel":
                leaf = leaf * 0.02
            elif p == "head_nm/ada_lin/kernel":
                leaf = leaf * 0.5
            elif p.endswith("attn/proj/kernel"):
                leaf = leaf / math.sqrt(2 * cfg.depth)
            elif p.startswith("blocks/") and p.endswith("ada_lin/kernel"):
                col = jnp.arange(shape[-1])
                leaf = leaf * jnp.where(col < 2 * c, 1e-5, 0.5)
        elif p.endswith("bias") and not p.endswith(("q_bias", "v_bias")):
            leaf = jnp.zeros(shape, jnp.float32)
        elif p.endswith("scale") and not p.endswith("scale_mul_1H11"):
            leaf = jnp.ones(shape, jnp.float32)
        out.append(leaf.astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------- optimizer
def make_schedule(ocfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine to ``lr * min_lr_ratio``."""
    lr = float(ocfg["lr"])
    warmup = int(ocfg.get("warmup_steps", 0))
    decay = max(int(ocfg.get("decay_steps", 0)) or num_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=decay,
        end_value=lr * float(ocfg.get("min_lr_ratio", 0.1)),
    )


def make_optimizer(ocfg: Mapping[str, Any], schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; weight decay on >= 2-D parameters only."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)  # noqa: E731
    parts = []
    clip = float(ocfg.get("grad_clip", 0.0))
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(
        optax.adamw(
            schedule, b1=float(ocfg.get("b1", 0.9)), b2=float(ocfg.get("b2", 0.95)), eps=float(ocfg.get("eps", 1e-8)),
            weight_decay=float(ocfg.get("weight_decay", 0.0)), mask=decay_mask,
        )
    )
    return optax.chain(*parts)


# ------------------------------------------------------------------ create
def init_params(model: HARTTransformer, key: jax.Array, *, release_style: bool = True, init_std: float = 0.02) -> Any:
    """Fresh fp32 params (the ``params`` collection)."""
    k_init, k_re = jax.random.split(key)
    params = init_variables(model.cfg, k_init)["params"]
    return release_init(params, model.cfg, k_re, init_std) if release_style else params


def make_state(params: Any, tx: optax.GradientTransformation, rng_data: jax.Array) -> TrainState:
    """A step-0 state around ``params`` (EMA = params)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params), rng=rng_data,
    )


def create_sharded_state(
    model: HARTTransformer,
    tx: optax.GradientTransformation,
    seed: int,
    mesh: jax.sharding.Mesh,
    rules: Any,
    *,
    params: Any = None,
    release_style: bool = True,
    init_std: float = 0.02,
) -> tuple[TrainState, Any]:
    """Create the state directly in its shardings; returns ``(state, state_shardings)``.

    ``params`` (e.g. a converted release checkpoint, host arrays) replaces the fresh
    init; they are placed shard by shard with ``jax.device_put``.
    """
    key = jax.random.PRNGKey(seed)
    k_params, k_train = jax.random.split(key)
    rng_data = jax.random.key_data(k_train) if jnp.issubdtype(k_train.dtype, jax.dtypes.prng_key) else k_train

    def build(p):
        if p is None:
            p = init_params(model, k_params, release_style=release_style, init_std=init_std)
        p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), p)
        return make_state(p, tx, rng_data)

    abstract = jax.eval_shape(build, params)
    shardings = tree_shardings(abstract, mesh, rules)
    if params is None:
        state = jax.jit(lambda: build(None), out_shardings=shardings)()
    else:
        want = jax.eval_shape(lambda: init_params(model, k_params, release_style=False))
        check_params_like(params, want)
        placed = jax.device_put(params, shardings.params)
        state = jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(placed)
    return state, shardings


def check_params_like(params: Any, want: Any) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped parameter."""
    got = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    exp = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    problems = [f"missing {k}" for k in sorted(exp.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - exp.keys())]
    problems += [f"{k}: shape {got[k]} != {exp[k]}" for k in sorted(exp.keys() & got.keys()) if got[k] != exp[k]]
    if problems:
        raise ValueError("parameters do not fit the configured model: " + "; ".join(problems[:20]))


def abstract_state(model: HARTTransformer, tx: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs of the state (no compute, no memory)."""
    return jax.eval_shape(
        lambda: make_state(
            init_params(model, jax.random.PRNGKey(0), release_style=False), tx, jnp.zeros((2,), jnp.uint32)
        )
    )


def cast_tree(tree: Any, dtype: Any) -> Any:
    """Floating leaves cast to ``dtype``."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

