"""Build everything a tokenizer run needs from a config (``task="tokenizer"``), and its loop.

``build_tokenizer(config)`` -> ``TokenizerComponents`` (mesh, autoencoder, discriminator,
objective, optimizers, the weights to start from, the frozen perceptual network);
``train_tokenizer(config, workdir)`` runs the loop with the transformer's machinery:
resume from the workdir's latest checkpoint (state, EMA, discriminator, step, RNG and the
grain iterator), TensorBoard + progress bar, checkpoints on the interval and at the end,
``TrainingDiverged`` on a non-finite loss (nothing saved, the last good checkpoint stays).
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
import numpy as np
import optax

from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
from hart_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from hart_jax.train import checkpointing
from hart_jax.train.distributed import example_ids_path, maybe_initialize_distributed
from hart_jax.train.loop import DTYPES, TrainingDiverged
from hart_jax.train.metrics import EventWriter, Progress
from hart_jax.train.sharding import batch_divisor, batch_sharding, make_mesh, tree_shardings
from hart_jax.train.state import make_optimizer, make_schedule
from hart_jax.train.tokenizer_objective import PerceptualFn, TokenizerLossConfig
from hart_jax.train.tokenizer_state import (
    TokenizerTrainState, abstract_tokenizer_state, count_trainable, create_tokenizer_state, init_autoencoder,
    make_generator_optimizer, trainable_labels,
)
from hart_jax.train.tokenizer_step import make_tokenizer_step

log = logging.getLogger("hart_jax.train")


def tokenizer_config_from(config: Any) -> TokenizerConfig:
    """``TokenizerConfig`` of the config's ``tokenizer`` section."""
    tk = dict(config.tokenizer)
    for k in ("ch_mult", "v_patch_nums"):
        if k in tk:
            tk[k] = tuple(int(x) for x in tk[k])
    return TokenizerConfig(**tk)


def _rules(config: Any) -> list:
    return [tuple(r) if not isinstance(r[1], (list, tuple)) else (r[0], tuple(r[1])) for r in config.mesh.rules]


def load_init_weights(config: Any, tok_cfg: TokenizerConfig, dcfg: DiscriminatorConfig) -> tuple[Any, Any]:
    """``(params, disc_vars)`` from ``init_from`` (each ``None`` when not given / not present).

    The directory's tokenizer config must equal the configured one (``v_patch_nums``
    aside); its discriminator, if it holds one and ``tokenizer_train.init_discriminator``,
    must have the configured architecture."""
    path = str(config.init_from)
    if not path:
        return None, None
    from hart_jax.checkpoint import load_converted
    from hart_jax.loading import load_discriminator

    cfg_d, variables = load_converted(path, kind="tokenizer")
    src = TokenizerConfig.from_hf_dict(cfg_d, source=f"{path}/config.json")
    diff = [
        f"{f.name}={getattr(src, f.name)!r} (config: {getattr(tok_cfg, f.name)!r})"
        for f in dataclasses.fields(TokenizerConfig)
        if f.name != "v_patch_nums" and getattr(src, f.name) != getattr(tok_cfg, f.name)
    ]
    if diff:
        raise ValueError(f"init_from {path} holds a different tokenizer: " + ", ".join(diff))
    params = variables["params"] if "params" in variables else variables
    disc_vars = None
    if bool(config.tokenizer_train.get("init_discriminator", True)):
        found = load_discriminator(path)
        if found is not None:
            got_cfg, disc_vars = found
            if got_cfg != dcfg:
                raise ValueError(
                    f"init_from {path} holds a discriminator {got_cfg} but the config asks for {dcfg} "
                    "(set tokenizer_train.init_discriminator=False to start a fresh one)"
                )
    return params, disc_vars


def load_perceptual(path: str) -> tuple[PerceptualFn, Any]:
    """LPIPS from local weights (``hart_jax.models.lpips``, imported only here)."""
    if not Path(path).exists():
        raise ValueError(f"tokenizer_loss.perceptual_weights: {path} not found")
    try:
        from hart_jax.models.lpips import load_lpips, lpips_distance
    except ImportError as e:
        raise ValueError(f"tokenizer_loss.perceptual_weights is set but LPIPS is unavailable ({e})") from None

    module, params = load_lpips(path)
    return (lambda p, x, y: lpips_distance(module, p, x, y)), params


@dataclasses.dataclass
class TokenizerComponents:
    """What ``build_tokenizer`` assembles (everything but the data and the checkpoints)."""

    config: Any
    mesh: jax.sharding.Mesh
    rules: list
    tok_cfg: TokenizerConfig
    model: HARTAutoEncoder
    dcfg: DiscriminatorConfig
    disc: NLayerDiscriminator
    lcfg: TokenizerLossConfig
    patch_nums: tuple[int, ...]
    resolution: int
    labels: Any
    schedule: optax.Schedule
    disc_schedule: optax.Schedule
    tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    perceptual_fn: PerceptualFn | None
    frozen_params: Any
    frozen_shardings: Any
    init_params: Any = None
    init_disc: Any = None

    @property
    def init_side(self) -> int:
        return self.tok_cfg.v_patch_nums[-1] * self.tok_cfg.downsample

    def create_state(self, params: Any = None, disc_vars: Any = None) -> tuple[TokenizerTrainState, Any]:
        """Sharded initial state (fresh, or around ``params`` / ``disc_vars``; default: ``init_from``'s)."""
        return create_tokenizer_state(
            self.model, self.disc, self.tx, self.disc_tx, int(self.config.seed), self.mesh, self.rules,
            side=self.init_side, params=self.init_params if params is None else params,
            disc_vars=self.init_disc if disc_vars is None else disc_vars,
            codebook_init=str(self.config.tokenizer_train.get("codebook_init", "uniform")),
        )

    def abstract_state(self) -> TokenizerTrainState:
        return abstract_tokenizer_state(self.model, self.disc, self.tx, self.disc_tx, self.init_side)

    def make_step(self, state_shardings: Any) -> Callable:
        return make_tokenizer_step(
            model=self.model, disc=self.disc, lcfg=self.lcfg, patch_nums=self.patch_nums, labels=self.labels,
            tx=self.tx, disc_tx=self.disc_tx, schedule=self.schedule, disc_schedule=self.disc_schedule,
            ema_decay=float(self.config.optim.ema_decay), mesh=self.mesh, rules=self.rules,
            state_shardings=state_shardings, frozen_shardings=self.frozen_shardings, perceptual_fn=self.perceptual_fn,
        )

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Per-process uint8 images -> a global array sharded along the batch axis."""
        sh = batch_sharding(self.mesh, self.rules)
        return {"image": jax.make_array_from_process_local_data(sh, np.asarray(local["image"]))}


def build_tokenizer(
    config: Any, devices: Any = None, perceptual: tuple[PerceptualFn, Any] | None = None, *, load_init: bool = True
) -> TokenizerComponents:
    """Mesh, models, objective and optimizers from a ``task="tokenizer"`` config.

    ``perceptual = (fn, params)`` replaces the LPIPS loaded from
    ``tokenizer_loss.perceptual_weights`` (tests); ``load_init=False`` skips reading
    ``init_from``'s weights (a resumed run: the checkpoint replaces them)."""
    tok_cfg = tokenizer_config_from(config)
    dcfg = DiscriminatorConfig(
        ndf=int(config.discriminator.ndf), n_layers=int(config.discriminator.n_layers),
        norm=str(config.discriminator.norm), in_channels=tok_cfg.in_channels,
    )
    lcfg = TokenizerLossConfig.from_config(config.tokenizer_loss)
    tt = config.tokenizer_train
    if int(config.train.grad_accum) != 1:
        raise ValueError("tokenizer training has no gradient accumulation: set train.grad_accum=1")
    if str(tt.trainable) == "decoder" and not config.init_from:
        raise ValueError("tokenizer_train.trainable='decoder' fine-tunes a converted tokenizer: set init_from")
    patch_nums = tuple(int(p) for p in (tt.patch_nums or tok_cfg.v_patch_nums))
    if not patch_nums or list(patch_nums) != sorted(patch_nums) or patch_nums[0] < 1:
        raise ValueError(f"tokenizer_train.patch_nums must be increasing positive ints, got {patch_nums}")
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    rules = _rules(config)
    bs, div = int(config.train.batch_size), batch_divisor(mesh, rules)
    if bs % div:
        raise ValueError(f"train.batch_size={bs} must be divisible by the {div} batch shards of the mesh {dict(mesh.shape)}")
    dtype = DTYPES[config.compute_dtype]
    model = HARTAutoEncoder(tok_cfg, dtype=dtype)
    disc = NLayerDiscriminator(dcfg, dtype=dtype)
    init_params, init_disc = load_init_weights(config, tok_cfg, dcfg) if load_init else (None, None)
    side = tok_cfg.v_patch_nums[-1] * tok_cfg.downsample
    abstract = jax.eval_shape(lambda: init_autoencoder(model, jax.random.PRNGKey(0), side))
    labels = trainable_labels(abstract, str(tt.trainable))
    schedule = make_schedule(config.optim, int(config.train.num_steps))
    disc_schedule = make_schedule(config.disc_optim, int(config.train.num_steps))
    tx = make_generator_optimizer(config.optim, schedule, labels)
    disc_tx = make_optimizer(config.disc_optim, disc_schedule)
    perceptual_fn, frozen = None, {}
    if perceptual is not None:
        perceptual_fn, frozen = perceptual
    elif lcfg.perceptual:
        perceptual_fn, frozen = load_perceptual(lcfg.perceptual_weights)
    frozen_shardings = tree_shardings(frozen, mesh, rules)
    frozen = jax.device_put(frozen, frozen_shardings)
    return TokenizerComponents(
        config=config, mesh=mesh, rules=rules, tok_cfg=tok_cfg, model=model, dcfg=dcfg, disc=disc, lcfg=lcfg,
        patch_nums=patch_nums, resolution=patch_nums[-1] * tok_cfg.downsample, labels=labels, schedule=schedule,
        disc_schedule=disc_schedule, tx=tx, disc_tx=disc_tx, perceptual_fn=perceptual_fn, frozen_params=frozen,
        frozen_shardings=frozen_shardings, init_params=init_params, init_disc=init_disc,
    )


def train_tokenizer(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) tokenizer training in ``workdir``; returns the last step's metrics."""
    from hart_jax.data.pipeline import make_loader

    maybe_initialize_distributed(config)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    c = config
    if not c.data.name and not c.data.path:
        raise ValueError("no training data: set data.name (+ data.data_dir) or data.path")
    primary = jax.process_index() == 0
    mngr = checkpointing.make_manager(
        workdir, every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save
    )
    latest = mngr.latest_step()
    try:
        comp = build_tokenizer(config, load_init=latest is None)  # a checkpoint replaces init_from's weights
    except BaseException:
        mngr.close()
        raise
    state, shardings = comp.create_state()
    loader = make_loader(c.data, kind="image", resolution=comp.resolution, global_batch=int(c.train.batch_size),
                         seed=int(c.seed))
    data_iter = iter(loader)
    if latest is not None:
        state = checkpointing.restore(mngr, latest, comp.abstract_state(), shardings, data_iter)
        if primary:
            print(f"resumed from {workdir}/checkpoints/{latest}", flush=True)
    elif primary:
        n_train, n_all = count_trainable(state.params, comp.labels)
        log.info("tokenizer: %d of %d parameters trainable (%s)", n_train, n_all, c.tokenizer_train.trainable)
    start = int(jax.device_get(state.step))
    num_steps = int(c.train.num_steps)
    step_fn = comp.make_step(shardings)
    meta = {"config": json.loads(c.to_json_best_effort()), "resolution": comp.resolution, "task": "tokenizer"}
    if primary:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    writer = EventWriter(workdir / "tensorboard") if (primary and c.log.tensorboard) else None
    bar = Progress(num_steps, start, bool(c.log.progress) and primary)
    ids_log = open(example_ids_path(workdir), "a") if c.log.example_ids else None
    last: dict[str, Any] = {}
    t_prev = time.perf_counter()
    try:
        for step in range(start, num_steps):
            local = next(data_iter)
            state, metrics = step_fn(state, comp.global_batch(local), comp.frozen_params)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            if not m["finite"]:
                mngr.wait_until_finished()
                good = mngr.latest_step()
                raise TrainingDiverged(
                    f"step {step + 1}: loss={m['loss']} grad_norm={m['grad_norm']} d={m['d']} "
                    f"d_grad_norm={m['d_grad_norm']} is not finite; stopped without saving. The last good checkpoint is "
                    + (f"{workdir}/checkpoints/{good}" if good is not None else "none (no checkpoint yet)")
                )
            m["psnr_hybrid" if m["continuous"] else "psnr_discrete"] = m["psnr"]
            m["step_time"] = dt
            m["images_per_s"] = int(c.train.batch_size) / dt
            last = dict(m, step=step + 1)
            if ids_log is not None:
                ids_log.write(json.dumps({"step": step + 1, "ids": [int(i) for i in np.asarray(local["id"])]}) + "\n")
                ids_log.flush()
            if writer is not None and ((step + 1) % int(c.log.every_steps) == 0 or step + 1 == num_steps):
                writer.scalars(step + 1, {f"train/{k}": v for k, v in m.items()})
                writer.flush()
            bar.update(1, loss=m["loss"], rec=m["rec"], psnr=m["psnr"], d=m["d"])
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
