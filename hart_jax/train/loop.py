"""Build everything a run needs from a config, and the training loop.

``build(config)`` -> ``Components`` (mesh, model, frozen tokenizer / text encoder,
optimizer, sharded state creation, the jitted step); ``train(config, workdir)`` runs
the loop of ``run_control``: resume from the workdir's newest good checkpoint if there is
one (state, EMA, step, RNG and the grain iterator), log to TensorBoard / console,
checkpoint on the interval, at the end and on SIGTERM, stop with ``TrainingDiverged`` on a
non-finite loss (the last good checkpoint stays the latest).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
from hart_jax.models.transformer import REMAT_POLICIES, HARTTransformer, T2IConfig
from hart_jax.train import checkpointing, run_control
from hart_jax.train.distributed import maybe_initialize_distributed
from hart_jax.train.objective import FrozenModels, ObjectiveConfig, keep_count
from hart_jax.train.run_control import TrainingDiverged  # noqa: F401 (re-exported)
from hart_jax.train.sharding import batch_divisor, batch_sharding, make_mesh, tree_shardings
from hart_jax.train.state import TrainState, abstract_state, create_sharded_state, make_optimizer, make_schedule
from hart_jax.train.step import make_train_step

log = logging.getLogger("hart_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _model_config(config: Any) -> T2IConfig:
    d = dict(config.model)
    d["patch_nums"] = tuple(int(p) for p in d["patch_nums"])
    return T2IConfig(**d)


def _tokenizer(config: Any, tcfg: T2IConfig) -> tuple[HARTAutoEncoder, Any]:
    tk = dict(config.tokenizer)
    ckpt = tk.pop("checkpoint", "")
    if ckpt:
        from hart_jax.checkpoint import load_converted

        cfg_dict, variables = load_converted(ckpt, kind="tokenizer")
        tok_cfg = TokenizerConfig.from_hf_dict(cfg_dict, source=f"{ckpt}/config.json")
    else:
        for k in ("ch_mult", "v_patch_nums"):
            tk[k] = tuple(tk[k])
        tok_cfg = TokenizerConfig(**tk)
        variables = None
    if (tok_cfg.vocab_size, tok_cfg.z_channels) != (tcfg.vocab_size, tcfg.z_channels):
        raise ValueError(
            f"tokenizer vocab/z_channels ({tok_cfg.vocab_size}, {tok_cfg.z_channels}) differ from the model's "
            f"({tcfg.vocab_size}, {tcfg.z_channels})"
        )
    model = HARTAutoEncoder(tok_cfg)
    if variables is None:
        log.warning("tokenizer.checkpoint is empty: using a randomly initialised tokenizer (tests only)")
        variables = random_tokenizer_variables(model, tcfg.patch_nums[-1] * tok_cfg.downsample, int(config.seed) + 1)
    return model, variables


def random_tokenizer_variables(model: HARTAutoEncoder, side: int, seed: int) -> Any:
    """Random tokenizer variables drawn with numpy (no compile): kernels normal / sqrt(fan-in),
    biases 0, norm scales 1, codebook uniform(-1/V, 1/V) as VAR. For tests only."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, side, side, 3)))
    rng = np.random.default_rng(seed)
    v = model.cfg.vocab_size

    def one(path, s):
        name = str(path[-1].key) if hasattr(path[-1], "key") else ""
        if name == "embedding":
            return rng.uniform(-1 / v, 1 / v, s.shape).astype(s.dtype)
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)
        if name == "scale":
            return np.ones(s.shape, s.dtype)
        return np.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


@dataclasses.dataclass
class Components:
    """What ``build`` assembles (everything but the data and the checkpoints)."""

    config: Any
    mesh: jax.sharding.Mesh
    rules: list
    tcfg: T2IConfig
    model: HARTTransformer
    frozen: FrozenModels
    frozen_params: Any
    frozen_shardings: Any
    ocfg: ObjectiveConfig
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    resolution: int
    text_tokenizer: Any = None
    text_prefix: str | None = None

    @property
    def n_last(self) -> int:
        return self.tcfg.patch_nums[-1] ** 2

    def batch_keys(self) -> tuple[str, ...]:
        """Arrays the step takes: image (or precomputed codes) + condition."""
        img = ("codes", "last_layer_gt") if self.config.data.codes else ("image",)
        if self.tcfg.is_c2i:
            return img + ("label",)
        if self.config.data.context == "prompt":
            return img + ("input_ids", "attention_mask", "context_mask", "context_position_ids")
        return img + ("context", "context_mask", "context_position_ids")

    def create_state(self, params: Any = None) -> tuple[TrainState, Any]:
        """Sharded initial state (fresh, or around ``params``)."""
        return create_sharded_state(
            self.model, self.tx, int(self.config.seed), self.mesh, self.rules, params=params,
            release_style=True, init_std=float(self.config.init_std),
        )

    def abstract_state(self) -> TrainState:
        return abstract_state(self.model, self.tx)

    def make_step(self, state_shardings: Any, batch_keys: tuple[str, ...] | None = None) -> Callable:
        c = self.config
        return make_train_step(
            model=self.model, frozen=self.frozen, ocfg=self.ocfg, tx=self.tx, schedule=self.schedule,
            ema_decay=float(c.optim.ema_decay), grad_accum=int(c.train.grad_accum), mesh=self.mesh,
            rules=self.rules, state_shardings=state_shardings,
            batch_keys=batch_keys or self.batch_keys(), frozen_shardings=self.frozen_shardings,
        )

    def keep_for_step(self, step: int) -> int:
        """The static kept-token count of ``step`` (host RNG seeded by (seed, step))."""
        o = self.config.objective
        rng = np.random.default_rng([int(self.config.seed), int(step)])
        return keep_count(rng, self.n_last, int(o.keep_quantum), bool(o.token_drop))

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Per-process numpy batch -> global arrays sharded along the batch axis."""
        sh = batch_sharding(self.mesh, self.rules)
        return {k: jax.make_array_from_process_local_data(sh, np.asarray(local[k])) for k in self.batch_keys()}

    def tokens_per_step(self, n_keep: int) -> int:
        """Transformer sequence tokens per optimizer step (level-0 block included)."""
        mid = sum(p * p for p in self.tcfg.patch_nums[1:-1])
        return int(self.config.train.batch_size) * (self.tcfg.first_l + mid + n_keep)


def build(config: Any, devices: Any = None) -> Components:
    """Mesh, models, optimizer and objective from ``config`` (see ``configs/train.py``)."""
    tcfg = _model_config(config)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    rules = [tuple(r) if not isinstance(r[1], (list, tuple)) else (r[0], tuple(r[1])) for r in config.mesh.rules]
    bs, accum = int(config.train.batch_size), int(config.train.grad_accum)
    div = batch_divisor(mesh, rules)
    if bs % accum or (bs // accum) % div:
        raise ValueError(
            f"train.batch_size={bs} must split into grad_accum={accum} micro-batches each divisible by the "
            f"{div} batch shards of the mesh {dict(mesh.shape)}"
        )
    remat = str(config.train.get("remat", "none"))
    if remat not in REMAT_POLICIES:
        raise ValueError(f"train.remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    log.info("block rematerialisation (train.remat): %s", remat)
    model = HARTTransformer(tcfg, dtype=DTYPES[config.compute_dtype], remat=remat)
    tok_model, tok_vars = _tokenizer(config, tcfg)
    text_model, text_params, text_tok, prefix = None, None, None, None
    if not tcfg.is_c2i and config.data.context == "prompt":
        if not config.text_encoder:
            raise ValueError("data.context='prompt' needs text_encoder (a converted Qwen2 directory)")
        from hart_jax.loading import load_text_encoder
        from hart_jax.models.text_encoder import Qwen2Model
        from hart_jax.prompts import load_tokenizer

        qcfg, text_params, prefix, _ = load_text_encoder(config.text_encoder)
        text_model = Qwen2Model(qcfg, dtype=DTYPES[config.compute_dtype])
        text_tok = load_tokenizer(config.text_encoder)
    frozen = FrozenModels(tok_model, text_model)
    frozen_params = {"tokenizer": tok_vars, "text": text_params}
    frozen_shardings = tree_shardings(frozen_params, mesh, rules)
    frozen_params = jax.device_put(frozen_params, frozen_shardings)
    o = config.objective
    ocfg = ObjectiveConfig(
        cond_drop_rate=float(o.cond_drop_rate), cond_drop_bug=bool(o.cond_drop_bug),
        diffusion_batch_mul=int(o.diffusion_batch_mul), ce_weight=float(o.ce_weight),
        diff_weight=float(o.diff_weight), diff_target=str(o.diff_target),
    )
    schedule = make_schedule(config.optim, int(config.train.num_steps))
    tx = make_optimizer(config.optim, schedule)
    resolution = tcfg.patch_nums[-1] * tok_model.cfg.downsample
    return Components(
        config=config, mesh=mesh, rules=rules, tcfg=tcfg, model=model, frozen=frozen, frozen_params=frozen_params,
        frozen_shardings=frozen_shardings, ocfg=ocfg, schedule=schedule, tx=tx, resolution=resolution,
        text_tokenizer=text_tok, text_prefix=prefix,
    )


def _init_params_from(path: str) -> Any:
    from hart_jax.loading import load_transformer

    _, variables = load_transformer(path)
    return variables["params"]


def train(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training in ``workdir``; returns the last step's metrics.

    Resumes from the newest checkpoint that restores (damaged newer ones are moved aside);
    SIGTERM saves and stops at the next step boundary; a run that fails before its first
    step leaves nothing on disk (``hart_jax.train.run_control``)."""
    from hart_jax.data.pipeline import check_source, make_loader

    maybe_initialize_distributed(config)
    c = config
    if not c.data.name and not c.data.path:
        raise ValueError("no training data: set data.name (+ data.data_dir) or data.path")
    check_source(c.data.get("name", ""), c.data.get("data_dir", ""), c.data.get("path", ""))
    workdir = Path(workdir).absolute()
    primary = jax.process_index() == 0
    with run_control.CleanFailedStart(workdir, primary) as guard:
        comp = build(config)
        mngr = checkpointing.make_manager(
            workdir, every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save
        )
        try:
            init_params = _init_params_from(c.init_from) if (c.init_from and mngr.latest_step() is None) else None
            loader = make_loader(
                c.data, kind="c2i" if comp.tcfg.is_c2i else "t2i", resolution=comp.resolution,
                global_batch=int(c.train.batch_size), seed=int(c.seed), tokenizer=comp.text_tokenizer,
                prefix=comp.text_prefix, max_length=comp.tcfg.context_token or 300,
            )
            data_iter = iter(loader)
            _, state, shardings = run_control.resume_or_create(
                mngr, comp, data_iter, workdir, primary, lambda: comp.create_state(init_params)
            )
            if primary:
                print(f"train.remat={comp.model.remat} (block rematerialisation)", flush=True)
            step_fn = comp.make_step(shardings)
        except BaseException:
            mngr.close()
            raise
        compiled: set[int] = set()

        def one_step(state: Any, local: Mapping[str, np.ndarray], step: int) -> tuple[Any, Any, dict[str, float]]:
            n_keep = comp.keep_for_step(step)
            state, metrics = step_fn(state, comp.global_batch(local), comp.frozen_params, n_keep)
            extra = {"kept_tokens": n_keep, "compiled_this_step": float(n_keep not in compiled)}
            compiled.add(n_keep)
            return state, metrics, extra

        def derive(m: dict[str, float], dt: float) -> dict[str, float]:
            return dict(m, step_time=dt, tokens_per_s=comp.tokens_per_step(int(m["kept_tokens"])) / dt)

        task = run_control.LoopTask(step=one_step, derive=derive, bar_keys=("loss", "ce", "diff", "lr"))
        meta = {"config": json.loads(c.to_json_best_effort()), "resolution": comp.resolution}
        return run_control.run_loop(c, workdir, mngr, data_iter, state, task, meta, guard)


from hart_jax.train.memory import memory_report  # noqa: E402,F401  (moved; kept importable from here)
