"""Build everything a tokenizer run needs from a config (``task="tokenizer"``), and its loop.

``build_tokenizer(config)`` -> ``TokenizerComponents`` (mesh, autoencoder, discriminator,
objective, optimizers, the weights to start from, the frozen perceptual network);
``train_tokenizer(config, workdir)`` runs the loop of ``run_control`` (shared with the
transformer): resume from the workdir's newest good checkpoint (state, EMA, discriminator,
step, RNG and the grain iterator), TensorBoard + progress bar, checkpoints on the interval,
at the end and on SIGTERM, ``TrainingDiverged`` on a non-finite loss (nothing saved, the
last good checkpoint stays).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
from hart_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from hart_jax.train import checkpointing, run_control
from hart_jax.train.distributed import maybe_initialize_distributed
from hart_jax.train.loop import DTYPES
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
    """Run (or resume) tokenizer training in ``workdir``; returns the last step's metrics
    (resume, SIGTERM and failed starts as ``hart_jax.train.loop.train``)."""
    from hart_jax.data.pipeline import check_source, make_loader

    maybe_initialize_distributed(config)
    c = config
    if not c.data.name and not c.data.path:
        raise ValueError("no training data: set data.name (+ data.data_dir) or data.path")
    check_source(c.data.get("name", ""), c.data.get("data_dir", ""), c.data.get("path", ""))
    workdir = Path(workdir).absolute()
    primary = jax.process_index() == 0
    with run_control.CleanFailedStart(workdir, primary) as guard:
        mngr = checkpointing.make_manager(
            workdir, every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save
        )
        try:
            # a checkpoint replaces init_from's weights
            comp = build_tokenizer(config, load_init=mngr.latest_step() is None)
            loader = make_loader(c.data, kind="image", resolution=comp.resolution,
                                 global_batch=int(c.train.batch_size), seed=int(c.seed))
            data_iter = iter(loader)
            step0, state, shardings = run_control.resume_or_create(mngr, comp, data_iter, workdir, primary,
                                                                   comp.create_state)
            if step0 is None and primary:
                n_train, n_all = count_trainable(state.params, comp.labels)
                log.info("tokenizer: %d of %d parameters trainable (%s)", n_train, n_all,
                         c.tokenizer_train.trainable)
            step_fn = comp.make_step(shardings)
        except BaseException:
            mngr.close()
            raise
        batch_size = int(c.train.batch_size)

        def one_step(state: Any, local: Mapping[str, np.ndarray], step: int) -> tuple[Any, Any, dict[str, float]]:
            state, metrics = step_fn(state, comp.global_batch(local), comp.frozen_params)
            return state, metrics, {}

        def derive(m: dict[str, float], dt: float) -> dict[str, float]:
            m = dict(m, step_time=dt, images_per_s=batch_size / dt)
            m["psnr_hybrid" if m["continuous"] else "psnr_discrete"] = m["psnr"]
            return m

        task = run_control.LoopTask(
            step=one_step, derive=derive, bar_keys=("loss", "rec", "psnr", "d"),
            nonfinite_keys=("loss", "grad_norm", "d", "d_grad_norm"),
        )
        meta = {"config": json.loads(c.to_json_best_effort()), "resolution": comp.resolution, "task": "tokenizer"}
        return run_control.run_loop(c, workdir, mngr, data_iter, state, task, meta, guard)
