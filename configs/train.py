"""Training presets (ml_collections): ``python train.py --config configs/train.py:PRESET``.

Presets:
  ``hart_0p7b_1024``: the release's 0.7B text-to-image model at 1024 px (cached text
      embeddings, bf16 compute, token dropping bucketed to multiples of 256);
  ``hart_c2i_d20`` / ``d24`` / ``d30``: class-conditional ImageNet 256 px sizes;
  ``tiny_t2i`` / ``tiny_c2i``: the fixture-sized models on 24 px images (tests, CPU);
  ``tokenizer_hart_1024``: fine-tune the release's hybrid tokenizer (decoder +
      post_quant_conv, as the release's ``freeze_codebook_for_hybrid``) from a converted
      release (``init_from``), bf16 compute, 1024 px;
  ``tokenizer_tiny``: the fixture-sized tokenizer trained from scratch on 24 px images.

Transformer sections (``task="transformer"``): ``model`` (``T2IConfig`` fields), ``tokenizer`` (``TokenizerConfig`` fields +
``checkpoint``: a converted tokenizer directory; empty = random init, only for tests),
``text_encoder`` (converted Qwen2 directory for ``data.context="prompt"``), ``data``,
``objective``, ``optim``, ``train``, ``mesh`` (+ ``rules``), ``checkpoint``, ``log``.

Tokenizer sections (``task="tokenizer"``, built by ``get_tokenizer_config``):
``tokenizer`` (``TokenizerConfig`` fields), ``init_from`` (converted tokenizer directory),
``discriminator``, ``tokenizer_loss``, ``tokenizer_train``, ``data``, ``optim`` (the
autoencoder's, + ``ema_decay``), ``disc_optim``, ``train``, ``mesh``, ``checkpoint``, ``log``.
"""

from typing import Any, Mapping

import ml_collections

from configs import tokenizer as tok_presets
from configs import transformer as tr_presets
from hart_jax.models.autoencoder import TokenizerConfig
from hart_jax.train.sharding import DEFAULT_RULES, TOKENIZER_RULES

TINY_C2I_MODEL = dict(
    tr_presets.PRESETS["tiny"], context_token=0, num_classes=10, disable_aln=False, use_timestep_embed=False,
    use_context_norm=False,
)


def _base(model: dict, tokenizer: str, kind: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "transformer"  # "transformer" | "tokenizer" (train.py dispatches on it)
    c.seed = 0
    c.distributed = distributed_section()
    c.model = ml_collections.ConfigDict(dict(model))
    c.model.attention_impl = "auto"
    c.init_from = ""  # converted release transformer directory (fine-tuning)
    c.init_std = 0.02  # release init; < 0: sqrt(1 / 3C)
    c.compute_dtype = "bfloat16"  # params stay fp32 (master weights)

    c.tokenizer = ml_collections.ConfigDict(dict(tok_presets.PRESETS[tokenizer]))
    c.tokenizer.checkpoint = ""
    c.text_encoder = ""

    c.data = ml_collections.ConfigDict()
    c.data.kind = kind
    c.data.name = ""
    c.data.data_dir = ""
    c.data.path = ""
    c.data.split = "train"
    c.data.context = "cached"  # "cached" embeddings in the records | "prompt" (text encoder in the step)
    c.data.codes = False  # True: records hold precomputed tokenizer codes (make_records --tokenizer)
    c.data.seed = -1  # -1: the run's seed
    c.data.shuffle = True
    c.data.random_crop = False
    c.data.random_flip = False
    c.data.worker_count = 0
    c.data.worker_buffer_size = 2
    c.data.image_key = "image"
    c.data.caption_key = "caption"
    c.data.label_key = "label"

    c.objective = ml_collections.ConfigDict()
    c.objective.cond_drop_rate = 0.1
    c.objective.cond_drop_bug = False  # True: the release's randn < rate (~54% at 0.1)
    c.objective.diffusion_batch_mul = 4
    c.objective.ce_weight = 1.0
    c.objective.diff_weight = 1.0
    c.objective.diff_target = "sampled"
    c.objective.token_drop = True
    c.objective.keep_quantum = 256

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 1000
    c.optim.decay_steps = 0  # 0: train.num_steps
    c.optim.min_lr_ratio = 0.1
    c.optim.grad_clip = 2.0
    c.optim.ema_decay = 0.9999

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # global, per optimizer step
    c.train.grad_accum = 1
    c.train.num_steps = 100_000
    c.train.remat = "none"  # rematerialise each block: "none" | "dots" (keep matmul outputs) | "full"
    c.train.sigkill_at_step = -1  # testing: SIGKILL this process after this step (pending saves finished)
    c.train.sigterm_at_step = -1  # testing: send this process SIGTERM after this step (a preemption)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = tuple(DEFAULT_RULES)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50
    c.log.tensorboard = True
    c.log.progress = True
    c.log.example_ids = False  # testing: append each step's example ids to WORKDIR/example_ids.jsonl
    return c


def distributed_section() -> ml_collections.ConfigDict:
    """``jax.distributed.initialize`` settings (``hart_jax/train/distributed.py``); empty / -1:
    from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
    JAX_LOCAL_DEVICE_IDS) or JAX's SLURM / Open MPI detection."""
    d = ml_collections.ConfigDict()
    d.mode = "auto"  # "auto": when a setting or a multi-task launcher is present; "on"; "off"
    d.coordinator_address = ""  # HOST:PORT of process 0
    d.num_processes = -1
    d.process_id = -1
    d.local_device_ids = ""  # comma-separated
    d.initialization_timeout = 300  # seconds
    return d


def _data_section(kind: str) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.kind = kind
    d.name = ""
    d.data_dir = ""
    d.path = ""
    d.split = "train"
    d.seed = -1  # -1: the run's seed
    d.shuffle = True
    d.random_crop = False
    d.random_flip = False
    d.worker_count = 0
    d.worker_buffer_size = 2
    d.image_key = "image"
    return d


def _optim_section(lr: float) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.lr = lr
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.05
    o.warmup_steps = 0
    o.decay_steps = 0  # 0: train.num_steps
    o.min_lr_ratio = 1.0  # 1: constant after the warmup
    o.grad_clip = 1.0
    return o


def get_tokenizer_config(
    tokenizer: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """A tokenizer training config (``task="tokenizer"``) around ``tokenizer`` (the fields of
    ``hart_jax.models.autoencoder.TokenizerConfig``, e.g. ``configs.tokenizer.PRESETS[...]``),
    then ``overrides`` as ``{"section.field": value}`` (e.g. ``{"train.batch_size": 16}``).

    Defaults: train everything from scratch, fp32, 50/50 discrete/hybrid decoding, MSE +
    VQ loss, hinge PatchGAN (taming's, ndf 64, 3 layers, BatchNorm) with the adaptive
    weight from ``disc_start``, no perceptual loss until ``tokenizer_loss.perceptual_weights``
    names LPIPS weights; AdamW 1e-4 for both networks."""
    c = ml_collections.ConfigDict()
    c.task = "tokenizer"
    c.seed = 0
    c.distributed = distributed_section()
    c.tokenizer = ml_collections.ConfigDict({**TokenizerConfig().to_hf_dict(), **dict(tokenizer)})
    del c.tokenizer.model_type  # every TokenizerConfig field, so each can be overridden
    for k in ("ch_mult", "v_patch_nums"):
        c.tokenizer[k] = tuple(c.tokenizer[k])
    c.init_from = ""  # converted tokenizer directory (fine-tuning); its discriminator too, if kept
    c.compute_dtype = "float32"  # autoencoder + discriminator convs; params stay fp32

    c.discriminator = ml_collections.ConfigDict()
    c.discriminator.ndf = 64
    c.discriminator.n_layers = 3
    c.discriminator.norm = "batch"  # "batch" (the release) | "group" | "none"

    c.tokenizer_loss = ml_collections.ConfigDict()
    c.tokenizer_loss.rec_loss = "l2"  # "l2" (the release's MSE) | "l1"
    c.tokenizer_loss.recon_weight = 1.0
    c.tokenizer_loss.vq_weight = 1.0
    c.tokenizer_loss.skip_continuous_prob = 0.5  # discrete-only decoding probability (paper: 50/50)
    c.tokenizer_loss.perceptual_weight = 1.0
    c.tokenizer_loss.perceptual_weights = ""  # LPIPS weights file; empty: no perceptual loss
    c.tokenizer_loss.disc_weight = 0.8
    c.tokenizer_loss.disc_start = 10_000  # steps before the adversarial loss and D updates start
    c.tokenizer_loss.disc_loss = "hinge"  # "hinge" | "vanilla"
    c.tokenizer_loss.adaptive_weight = True  # VQGAN's lambda from the last decoder layer

    c.tokenizer_train = ml_collections.ConfigDict()
    c.tokenizer_train.trainable = "all"  # "all" | "decoder" (decoder + post_quant_conv, needs init_from)
    c.tokenizer_train.patch_nums = ()  # empty: tokenizer.v_patch_nums; images are patch_nums[-1] * 2**(len(ch_mult)-1)
    c.tokenizer_train.init_discriminator = True  # start D from init_from's discriminator when it has one
    c.tokenizer_train.codebook_init = "uniform"  # fresh codebook: "uniform" U(-1/V, 1/V) (VAR) | "normal" N(0, 1/C)

    c.data = _data_section("image")
    c.optim = _optim_section(1e-4)
    c.optim.ema_decay = 0.999
    c.disc_optim = _optim_section(1e-4)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.grad_accum = 1  # must be 1 (BatchNorm + adaptive weight are per batch)
    c.train.num_steps = 100_000
    c.train.sigkill_at_step = -1  # testing (see _base)
    c.train.sigterm_at_step = -1  # testing (see _base)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = tuple(TOKENIZER_RULES)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50
    c.log.tensorboard = True
    c.log.progress = True
    c.log.example_ids = False
    for key, value in (overrides or {}).items():
        *sections, field = key.split(".")
        node = c
        for sec in sections:
            node = node[sec]
        if field not in node:
            raise ValueError(f"unknown tokenizer config field {key!r}")
        node[field] = value
    return c


PRESETS = (
    "hart_0p7b_1024", "hart_c2i_d20", "hart_c2i_d24", "hart_c2i_d30", "tiny_t2i", "tiny_c2i",
    "tokenizer_hart_1024", "tokenizer_tiny",
)


def get_config(preset: str = "tiny_t2i") -> ml_collections.ConfigDict:
    """The named preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset == "tokenizer_hart_1024":
        return get_tokenizer_config(tok_presets.PRESETS["hart_0p7b_1024"], {
            "compute_dtype": "bfloat16",
            "tokenizer_train.trainable": "decoder",
            "tokenizer_loss.disc_start": 5_000,  # 0 when init_from holds the release's discriminator
            "optim.lr": 5e-5,
            "disc_optim.lr": 5e-5,
            "optim.warmup_steps": 500,
            "train.batch_size": 32,
            "train.num_steps": 50_000,
        })
    if preset == "tokenizer_tiny":
        return get_tokenizer_config(tok_presets.PRESETS["tiny"], {
            "discriminator.ndf": 8,
            "tokenizer_loss.disc_start": 2,
            "optim.lr": 1e-3,
            "disc_optim.lr": 1e-3,
            "optim.ema_decay": 0.9,
            "train.batch_size": 8,
            "train.num_steps": 20,
            "checkpoint.every_steps": 10,
            "checkpoint.keep": 2,
            "log.every_steps": 1,
            "log.progress": False,
        })
    if preset == "hart_0p7b_1024":
        c = _base(tr_presets.PRESETS["hart_0p7b_1024"], "hart_0p7b_1024", "t2i")
        c.train.remat = "full"  # docs/training.md: memory per remat policy
        c.mesh.fsdp = -1
        c.mesh.data = 1
    elif preset in ("hart_c2i_d20", "hart_c2i_d24", "hart_c2i_d30"):
        c = _base(tr_presets.PRESETS[preset], "hart_0p7b_1024", "c2i")
        c.tokenizer.v_patch_nums = tr_presets.VAR_256
        c.data.name = "imagenet2012"
        c.objective.keep_quantum = 32
        c.train.remat = "full"
        c.mesh.fsdp = -1
        c.mesh.data = 1
    else:
        model = tr_presets.PRESETS["tiny"] if preset == "tiny_t2i" else TINY_C2I_MODEL
        c = _base(model, "tiny", "t2i" if preset == "tiny_t2i" else "c2i")
        c.compute_dtype = "float32"
        c.objective.keep_quantum = 1
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 2
        c.optim.ema_decay = 0.99
        c.train.batch_size = 8
        c.train.num_steps = 20
        c.checkpoint.every_steps = 10
        c.checkpoint.keep = 2
        c.log.every_steps = 1
        c.log.progress = False
    return c
