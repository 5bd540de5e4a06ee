"""Build everything a run needs from a config, and the training loop.

``build(config)`` -> ``Components`` (mesh, model, frozen tokenizer / text encoder,
optimizer, sharded state creation, the jitted step); ``train(config, workdir)`` runs
the loop: resume from the workdir's latest checkpoint if there is one (state, EMA,
step, RNG and the grain iterator), log to TensorBoard / console, checkpoint on the
interval and at the end, stop with ``TrainingDiverged`` on a non-finite loss (the
last good checkpoint stays the latest).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hart_jax.errors import HartError
from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
from hart_jax.models.transformer import HARTTransformer, T2IConfig
from hart_jax.train import checkpointing
from hart_jax.train.distributed import example_ids_path, maybe_initialize_distributed
from hart_jax.train.metrics import EventWriter, Progress
from hart_jax.train.objective import FrozenModels, ObjectiveConfig, keep_count
from hart_jax.train.sharding import batch_divisor, batch_sharding, make_mesh, tree_shardings
from hart_jax.train.state import TrainState, abstract_state, create_sharded_state, make_optimizer, make_schedule
from hart_jax.train.step import make_train_step

log = logging.getLogger("hart_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainingDiverged(HartError):
    """The loss (or gradient norm) became NaN or infinite."""


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
    model = HARTTransformer(tcfg, dtype=DTYPES[config.compute_dtype])
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
    from hart_jax.checkpoint import load_converted

    _, variables = load_converted(path, kind="transformer")
    return variables["params"] if "params" in variables else variables


def train(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training in ``workdir``; returns the last step's metrics."""
    from hart_jax.data.pipeline import make_loader

    maybe_initialize_distributed(config)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    comp = build(config)
    c = config
    primary = jax.process_index() == 0
    if not c.data.name and not c.data.path:
        raise ValueError("no training data: set data.name (+ data.data_dir) or data.path")
    mngr = checkpointing.make_manager(
        workdir, every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save
    )
    latest = mngr.latest_step()
    init_params = _init_params_from(c.init_from) if (c.init_from and latest is None) else None
    state, shardings = comp.create_state(init_params)
    loader = make_loader(
        c.data, kind="c2i" if comp.tcfg.is_c2i else "t2i", resolution=comp.resolution,
        global_batch=int(c.train.batch_size), seed=int(c.seed), tokenizer=comp.text_tokenizer,
        prefix=comp.text_prefix, max_length=comp.tcfg.context_token or 300,
    )
    data_iter = iter(loader)
    if latest is not None:
        state = checkpointing.restore(mngr, latest, comp.abstract_state(), shardings, data_iter)
        if primary:
            print(f"resumed from {workdir}/checkpoints/{latest}", flush=True)
    start = int(jax.device_get(state.step))
    num_steps = int(c.train.num_steps)
    step_fn = comp.make_step(shardings)
    meta = {"config": json.loads(c.to_json_best_effort()), "resolution": comp.resolution}
    if primary:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    writer = EventWriter(workdir / "tensorboard") if (primary and c.log.tensorboard) else None
    bar = Progress(num_steps, start, bool(c.log.progress) and primary)
    ids_log = open(example_ids_path(workdir), "a") if c.log.example_ids else None
    last: dict[str, Any] = {}
    t_prev = time.perf_counter()
    compiled: set[int] = set()
    try:
        for step in range(start, num_steps):
            local = next(data_iter)
            n_keep = comp.keep_for_step(step)
            batch = comp.global_batch(local)
            state, metrics = step_fn(state, batch, comp.frozen_params, n_keep)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            if not m["finite"]:
                mngr.wait_until_finished()
                good = mngr.latest_step()
                raise TrainingDiverged(
                    f"step {step + 1}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; stopped without "
                    f"saving. The last good checkpoint is "
                    + (f"{workdir}/checkpoints/{good}" if good is not None else "none (no checkpoint yet)")
                )
            m["step_time"] = dt
            m["tokens_per_s"] = comp.tokens_per_step(n_keep) / dt
            m["kept_tokens"] = n_keep
            m["compiled_this_step"] = float(n_keep not in compiled)
            compiled.add(n_keep)
            last = dict(m, step=step + 1)
            if ids_log is not None:
                ids_log.write(json.dumps({"step": step + 1, "ids": [int(i) for i in np.asarray(local["id"])]}) + "\n")
                ids_log.flush()
            if writer is not None and ((step + 1) % int(c.log.every_steps) == 0 or step + 1 == num_steps):
                writer.scalars(step + 1, {f"train/{k}": v for k, v in m.items()})
                writer.flush()
            bar.update(1, loss=m["loss"], ce=m["ce"], diff=m["diff"], lr=m["lr"])
            checkpointing.save(mngr, step + 1, state, data_iter, meta, force=step + 1 == num_steps)
            if int(c.train.sigkill_at_step) == step + 1:
                mngr.wait_until_finished()
                if ids_log is not None:
                    ids_log.close()
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        bar.close()
        if writer is not None:
            writer.close()
        if ids_log is not None and not ids_log.closed:
            ids_log.close()
    return last


def memory_report(config: Any, devices: Any = None) -> dict[str, Any]:
    """Per-device bytes of params + optimizer state + EMA under the config's mesh and rules
    (shapes only: nothing is allocated or compiled)."""
    from hart_jax.train.sharding import per_device_bytes, total_bytes

    tcfg = _model_config(config)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    rules = [tuple(r) if not isinstance(r[1], (list, tuple)) else (r[0], tuple(r[1])) for r in config.mesh.rules]
    tx = make_optimizer(config.optim, make_schedule(config.optim, int(config.train.num_steps)))
    st = abstract_state(HARTTransformer(tcfg), tx)
    sh = tree_shardings(st, mesh, rules)
    out: dict[str, Any] = {"mesh": dict(mesh.shape), "num_params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(st.params)))}
    for name in ("params", "opt_state", "ema_params"):
        out[f"{name}_total_bytes"] = total_bytes(getattr(st, name))
        out[f"{name}_per_device_bytes"] = per_device_bytes(getattr(st, name), getattr(sh, name))
    out["total_bytes"] = total_bytes(st)
    out["per_device_bytes"] = per_device_bytes(st, sh)
    return out
