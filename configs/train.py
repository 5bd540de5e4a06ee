"""Training presets (ml_collections): ``python train.py --config configs/train.py:PRESET``.

Presets:
  ``hart_0p7b_1024``: the release's 0.7B text-to-image model at 1024 px (cached text
      embeddings, bf16 compute, token dropping bucketed to multiples of 256);
  ``hart_c2i_d20`` / ``d24`` / ``d30``: class-conditional ImageNet 256 px sizes;
  ``tiny_t2i`` / ``tiny_c2i``: the fixture-sized models on 24 px images (tests, CPU).

Sections: ``model`` (``T2IConfig`` fields), ``tokenizer`` (``TokenizerConfig`` fields +
``checkpoint``: a converted tokenizer directory; empty = random init, only for tests),
``text_encoder`` (converted Qwen2 directory for ``data.context="prompt"``), ``data``,
``objective``, ``optim``, ``train``, ``mesh`` (+ ``rules``), ``checkpoint``, ``log``.
"""

import ml_collections

from configs import tokenizer as tok_presets
from configs import transformer as tr_presets
from hart_jax.train.sharding import DEFAULT_RULES

TINY_C2I_MODEL = dict(
    tr_presets.PRESETS["tiny"], context_token=0, num_classes=10, disable_aln=False, use_timestep_embed=False,
    use_context_norm=False,
)


def _base(model: dict, tokenizer: str, kind: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.distributed = "auto"  # jax.distributed.initialize(): "auto" (launcher env), "on", "off"
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
    c.train.sigkill_at_step = -1  # testing: SIGKILL this process after this step (pending saves finished)

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


PRESETS = ("hart_0p7b_1024", "hart_c2i_d20", "hart_c2i_d24", "hart_c2i_d30", "tiny_t2i", "tiny_c2i")


def get_config(preset: str = "tiny_t2i") -> ml_collections.ConfigDict:
    """The named preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset == "hart_0p7b_1024":
        c = _base(tr_presets.PRESETS["hart_0p7b_1024"], "hart_0p7b_1024", "t2i")
        c.mesh.fsdp = -1
        c.mesh.data = 1
    elif preset in ("hart_c2i_d20", "hart_c2i_d24", "hart_c2i_d30"):
        c = _base(tr_presets.PRESETS[preset], "hart_0p7b_1024", "c2i")
        c.tokenizer.v_patch_nums = tr_presets.VAR_256
        c.data.name = "imagenet2012"
        c.objective.keep_quantum = 32
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
