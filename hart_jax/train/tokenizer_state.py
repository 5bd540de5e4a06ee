"""Train state of the hybrid tokenizer + its PatchGAN, the trainable set, sharded creation.

``TokenizerTrainState`` holds the autoencoder's fp32 ``params``, their optax state and
EMA, the discriminator's ``disc_params`` / ``disc_batch_stats`` / ``disc_opt_state``, the
step and the base RNG key (raw ``uint32`` key data, as the transformer's state).

Trainable sets (``tokenizer_train.trainable``):
  ``"all"``: everything (training from scratch);
  ``"decoder"``: the release's hybrid fine-tuning (``freeze_codebook_for_hybrid=True``):
  only ``decoder`` + ``post_quant_conv`` (and ``decoder2`` / ``post_quant_conv2``) train;
  the encoder, ``quant_conv`` and the quantizer (codebook and φ convs) are frozen.
Frozen leaves get ``optax.set_to_zero`` (no optimizer state) and their EMA is a copy,
so both keep their values bit-exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hart_jax.models.autoencoder import HARTAutoEncoder
from hart_jax.models.discriminator import NLayerDiscriminator
from hart_jax.train.sharding import tree_shardings
from hart_jax.train.state import check_params_like, make_optimizer

TRAINABLE = ("all", "decoder")
DECODER_PARTS = ("decoder", "post_quant_conv", "decoder2", "post_quant_conv2")


@flax.struct.dataclass
class TokenizerTrainState:
    """Everything a tokenizer training step reads and writes (a pytree)."""

    step: jax.Array  # int32 []
    params: Any  # autoencoder, fp32
    opt_state: Any
    ema_params: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any
    rng: jax.Array  # uint32 key data


def trainable_labels(params: Mapping[str, Any], trainable: str) -> dict[str, Any]:
    """``"train"`` / ``"freeze"`` for every leaf, by the top-level module name."""
    if trainable not in TRAINABLE:
        raise ValueError(f"tokenizer_train.trainable must be one of {TRAINABLE}, got {trainable!r}")
    return {
        k: jax.tree_util.tree_map(lambda _: "train" if (trainable == "all" or k in DECODER_PARTS) else "freeze", v)
        for k, v in params.items()
    }


def make_generator_optimizer(
    ocfg: Mapping[str, Any], schedule: optax.Schedule, labels: Mapping[str, Any]
) -> optax.GradientTransformation:
    """``make_optimizer`` (clipping + AdamW) on the trainable leaves, zero updates elsewhere."""
    return optax.multi_transform({"train": make_optimizer(ocfg, schedule), "freeze": optax.set_to_zero()}, labels)


def mask_frozen(tree: Any, labels: Any) -> Any:
    """Frozen leaves replaced by zeros (statically, so XLA drops what computed them)."""
    return jax.tree_util.tree_map(lambda x, l: x if l == "train" else jnp.zeros_like(x), tree, labels)


def ema_update_trainable(ema: Any, params: Any, decay: float, labels: Any) -> Any:
    """``decay * ema + (1 - decay) * params`` on trainable leaves; frozen leaves copy ``params``."""
    return jax.tree_util.tree_map(
        lambda e, p, l: e * decay + (1.0 - decay) * p.astype(e.dtype) if l == "train" else p, ema, params, labels
    )


CODEBOOK_INITS = ("uniform", "normal")


def init_autoencoder(model: HARTAutoEncoder, key: jax.Array, side: int, codebook_init: str = "uniform") -> Any:
    """Fresh fp32 autoencoder params: Flax's default initialisers (LeCun-normal conv kernels,
    i.e. truncated normal with std ``sqrt(1 / fan_in)``, zero biases, unit norm scales),
    codebook uniform(-1/V, 1/V) as VAR / taming (``codebook_init="uniform"``) or normal with
    std ``sqrt(1 / C)`` (``"normal"``, Flax's ``nn.Embed`` default: codes start at the scale of
    the latent, which short runs need to spread their codes).

    Drawn on the shapes of ``jax.eval_shape(model.init)`` from one truncated-normal vector
    for all kernels, so creating the state compiles neither the model's forward nor one
    random program per leaf."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, side, side, model.cfg.in_channels)))
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes["params"])
    names = [str(getattr(p[-1], "key", "")) for p, _ in flat]
    sizes = [int(np.prod(s.shape)) if n == "kernel" else 0 for n, (_, s) in zip(names, flat)]
    k_kernels, k_codebook = jax.random.split(key)
    # flax's lecun_normal: truncated normal on [-2, 2] rescaled to unit variance
    z = jax.random.truncated_normal(k_kernels, -2.0, 2.0, (max(sum(sizes), 1),), jnp.float32) / 0.87962566103423978
    v = model.cfg.vocab_size
    out, offset = [], 0
    for name, (_, s), n in zip(names, flat, sizes):
        if name == "embedding":
            if codebook_init == "normal":
                out.append(jax.random.normal(k_codebook, s.shape, jnp.float32) * np.float32(np.sqrt(1.0 / s.shape[-1])))
            elif codebook_init == "uniform":
                out.append(jax.random.uniform(k_codebook, s.shape, jnp.float32, -1.0 / v, 1.0 / v))
            else:
                raise ValueError(f"codebook_init must be one of {CODEBOOK_INITS}, got {codebook_init!r}")
        elif name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            out.append(z[offset : offset + n].reshape(s.shape) * np.float32(np.sqrt(1.0 / fan_in)))
            offset += n
        elif name == "scale":
            out.append(jnp.ones(s.shape, jnp.float32))
        else:
            out.append(jnp.zeros(s.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def init_disc(disc: NLayerDiscriminator, key: jax.Array) -> dict[str, Any]:
    """Fresh discriminator variables ``{"params", "batch_stats"}`` (taming's init)."""
    side = max(32, 2 ** (disc.cfg.n_layers + 2))
    v = disc.init(key, jnp.zeros((1, side, side, disc.cfg.in_channels), jnp.float32), train=False)
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}


def make_tokenizer_state(
    params: Any, disc_vars: Mapping[str, Any], tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation, rng_data: jax.Array,
) -> TokenizerTrainState:
    """A step-0 state (EMA = params)."""
    return TokenizerTrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params), disc_params=disc_vars["params"],
        disc_batch_stats=disc_vars.get("batch_stats", {}), disc_opt_state=disc_tx.init(disc_vars["params"]),
        rng=rng_data,
    )


def _keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    key = jax.random.PRNGKey(seed)
    k_params, k_train = jax.random.split(key)
    k_ae, k_disc = jax.random.split(k_params)
    rng_data = jax.random.key_data(k_train) if jnp.issubdtype(k_train.dtype, jax.dtypes.prng_key) else k_train
    return k_ae, k_disc, rng_data


def create_tokenizer_state(
    model: HARTAutoEncoder,
    disc: NLayerDiscriminator,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    seed: int,
    mesh: jax.sharding.Mesh,
    rules: Any,
    *,
    side: int,
    params: Any = None,
    disc_vars: Mapping[str, Any] | None = None,
    codebook_init: str = "uniform",
) -> tuple[TokenizerTrainState, Any]:
    """Create the state directly in its shardings; returns ``(state, state_shardings)``.

    ``params`` (a converted tokenizer's) and ``disc_vars`` (a converted discriminator's,
    ``{"params", "batch_stats"}``) replace the fresh inits; both are checked against the
    configured models' shapes first (a ``ValueError`` naming every mismatch).
    """
    k_ae, k_disc, rng_data = _keys(seed)
    f32 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731

    def build(p, dv):
        p = init_autoencoder(model, k_ae, side, codebook_init) if p is None else f32(p)
        dv = init_disc(disc, k_disc) if dv is None else {"params": f32(dv["params"]), "batch_stats": f32(dv["batch_stats"])}
        return make_tokenizer_state(p, dv, tx, disc_tx, rng_data)

    if params is not None:
        check_params_like(params, jax.eval_shape(lambda: init_autoencoder(model, k_ae, side)))
    if disc_vars is not None:
        want = jax.eval_shape(lambda: init_disc(disc, k_disc))
        check_params_like(disc_vars, want)
        disc_vars = {"params": disc_vars["params"], "batch_stats": disc_vars.get("batch_stats", {})}
    abstract = jax.eval_shape(build, params, disc_vars)
    shardings = tree_shardings(abstract, mesh, rules)
    args, in_sh = [], []
    if params is not None:
        args.append(jax.device_put(params, shardings.params))
        in_sh.append(shardings.params)
    if disc_vars is not None:
        dsh = {"params": shardings.disc_params, "batch_stats": shardings.disc_batch_stats}
        args.append(jax.device_put(disc_vars, dsh))
        in_sh.append(dsh)

    def fn(*a):
        it = iter(a)
        return build(next(it) if params is not None else None, next(it) if disc_vars is not None else None)

    state = jax.jit(fn, in_shardings=tuple(in_sh), out_shardings=shardings)(*args)
    return state, shardings


def abstract_tokenizer_state(
    model: HARTAutoEncoder, disc: NLayerDiscriminator, tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation, side: int,
) -> TokenizerTrainState:
    """ShapeDtypeStructs of the state (no compute, no memory)."""
    return jax.eval_shape(
        lambda: make_tokenizer_state(
            init_autoencoder(model, jax.random.PRNGKey(0), side), init_disc(disc, jax.random.PRNGKey(1)), tx, disc_tx,
            jnp.zeros((2,), jnp.uint32),
        )
    )


def count_trainable(params: Any, labels: Any) -> tuple[int, int]:
    """``(trainable, total)`` scalar counts."""
    sizes = jax.tree_util.tree_map(lambda x, l: (int(np.prod(x.shape)), l == "train"), params, labels)
    leaves = jax.tree_util.tree_leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
    return sum(n for n, t in leaves if t), sum(n for n, _ in leaves)
