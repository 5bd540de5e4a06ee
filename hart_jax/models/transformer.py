"""HART's autoregressive transformer over scales (``HARTForT2I``; class-conditional variant).

Dimensions (docs/design.md):
  B batch (2B rows when classifier-free guidance doubles it); T context tokens (300);
  E text width (the context, Qwen2 hidden, 1536); C channels (model width ``embed_dim``);
  A heads; D head dim (= C / A); L tokens of the sequence; l scale tokens;
  k kept tokens of the last scale; K key tokens (a KV cache's entries); X depth;
  V vocabulary (codebook size); Z latent channels; S scales; I MLP width (SwiGLU hidden).

Sequence layout (text-to-image): ``[T text tokens (level 0) | scale 1 | ... | scale N-1]``;
the output at the last text position predicts scale 0 (1x1). Class-conditional
(``context_token == 0``): ``[pn0^2 class tokens (level 0) | scale 1 | ...]``.
Masks: key k is visible to query q iff level(k) <= level(q); the text block sees itself
fully, padding included. Text gets 1-D RoPE with the given position ids; image tokens
HART's 2-D RoPE at ``(r/pn*pn_max, c/pn*pn_max) + last text position id``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.attention import attention, cache_attention
from hart_jax.layers.embeddings import TimestepEmbedder
from hart_jax.layers.norms import RMSNorm
from hart_jax.layers.rope import ROPE_2D_LAYOUTS, apply_rope, grid_positions, rope_1d, rope_2d
from hart_jax.models.autoencoder import PATCH_NUMS_1024
from hart_jax.models.diffusion_head import DiffLoss

Dtype = Any
PrecisionLike = Any


# ------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class T2IConfig:
    """Transformer hyper-parameters; names follow the release's ``HARTForT2IConfig``.

    Defaults are the 0.7B 1024 px model. ``vocab_size`` / ``z_channels`` come from
    the tokenizer. ``context_token == 0`` selects the class-conditional variant
    (``num_classes`` classes plus one null class for guidance).
    """

    context_token: int = 300
    context_dim: int = 1536
    depth: int = 24
    embed_dim: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = False
    patch_nums: tuple[int, ...] = PATCH_NUMS_1024
    mlp_type: str = "llama"
    attn_type: str = "llama"
    disable_aln: bool = True
    use_timestep_embed: bool = True
    sep_aln_pooling_mode: str = "max"
    use_cross_attn: bool = False
    use_context_norm: bool = True
    cond_drop_rate: float = 0.1
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: str = "8"
    diffusion_batch_mul: int = 4
    sampler: str = "iddpm"
    vocab_size: int = 4096
    z_channels: int = 32
    num_classes: int = 0
    attention_impl: str = "auto"
    # 2-D RoPE layout of image tokens (``hart_jax.layers.rope``): "rotation" (a true rotation,
    # the default for models trained here) or "hart" (the release's non-rotation, kept for its
    # weights; ``from_hf_dict`` picks it for dicts that do not name a layout). ``rope_theta``:
    # the RoPE base of text and image tokens (the release: 10000).
    rope_2d: str = "rotation"
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        problems = []
        if self.attn_type != "llama" or self.mlp_type != "llama":
            problems.append(f"attn_type/mlp_type must be 'llama' (got {self.attn_type!r}/{self.mlp_type!r})")
        if self.use_cross_attn:
            problems.append("use_cross_attn=True is not supported")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            problems.append(f"embed_dim={self.embed_dim} must split into {self.num_heads} heads of a multiple of 4")
        if self.sep_aln_pooling_mode not in ("max", "avg"):
            problems.append(f"sep_aln_pooling_mode must be 'max' or 'avg', got {self.sep_aln_pooling_mode!r}")
        if self.context_token == 0 and (self.num_classes <= 0 or self.disable_aln):
            problems.append("the class-conditional variant needs num_classes > 0 and disable_aln=False")
        if self.sampler != "iddpm":
            problems.append(f"sampler={self.sampler!r} is not supported (only 'iddpm')")
        if self.rope_2d not in ROPE_2D_LAYOUTS:
            problems.append(f"rope_2d must be one of {ROPE_2D_LAYOUTS}, got {self.rope_2d!r}")
        if not self.rope_theta > 1.0:
            problems.append(f"rope_theta must be > 1, got {self.rope_theta!r}")
        if problems:
            raise ValueError("; ".join(problems))

    # -------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        """Per-head width ``C / H``."""
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU width ``int(C * ratio * 2 / 3 + 255) // 256 * 256`` (4096 for C=1536)."""
        return int((self.embed_dim * self.mlp_ratio * 2) / 3 + 255) // 256 * 256

    @property
    def attn_scale(self) -> float:
        """Softmax scale: ``0.25 / sqrt(D)`` (VAR heritage), 1 with ``attn_l2_norm``."""
        return 1.0 if self.attn_l2_norm else 0.25 / math.sqrt(self.head_dim)

    @property
    def is_c2i(self) -> bool:
        """Class-conditional variant (no text context)."""
        return self.context_token == 0

    @property
    def first_l(self) -> int:
        """Length of the level-0 block: T text tokens, or pn0^2 class tokens."""
        return self.patch_nums[0] ** 2 if self.is_c2i else self.context_token

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def stage_slices(self) -> list[tuple[int, int]]:
        """``(begin, end)`` of each scale's input tokens in the full sequence."""
        out = [(0, self.first_l)]
        cur = self.first_l
        for pn in self.patch_nums[1:]:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out

    @property
    def seq_len(self) -> int:
        """Full training sequence length (9750 at 1024 px)."""
        return self.stage_slices()[-1][1]

    def level_ids(self, n_last: int | None = None) -> np.ndarray:
        """Level id per position ``[L]``; the last scale has ``n_last`` (kept) tokens."""
        n_last = self.patch_nums[-1] ** 2 if n_last is None else n_last
        ids = [np.zeros(self.first_l, np.int32)]
        for s, pn in enumerate(self.patch_nums[1:-1], start=1):
            ids.append(np.full(pn * pn, s, np.int32))
        ids.append(np.full(n_last, self.num_scales - 1, np.int32))
        return np.concatenate(ids)

    # ------------------------------------------------------------- hf dicts
    MODEL_TYPES = ("hart_transformer_t2i", "hart_transformer_c2i")

    @classmethod
    def from_hf_dict(
        cls, d: Mapping[str, Any], *, vocab_size: int, z_channels: int, source: str = "config.json", **overrides: Any
    ) -> "T2IConfig":
        """Build from a release ``llm/config.json`` dict; unknown fields are ignored. A dict
        without ``rope_2d`` (the release's, or one written before the field existed) gets the
        release's layout ``"hart"``."""
        mt = d.get("model_type")
        if mt not in cls.MODEL_TYPES:
            raise ValueError(f"{source}: model_type={mt!r} is not a HART transformer (expected one of {cls.MODEL_TYPES})")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "patch_nums" in kw:
            kw["patch_nums"] = tuple(int(p) for p in kw["patch_nums"])
        if mt == "hart_transformer_c2i":
            kw["context_token"] = 0
        kw["num_sampling_steps"] = str(kw.get("num_sampling_steps", "8"))
        kw.setdefault("rope_2d", "hart")
        kw.update(vocab_size=vocab_size, z_channels=z_channels, **overrides)
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """Release-style dict (plus ``vocab_size`` / ``z_channels``)."""
        d = dataclasses.asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        d["model_type"] = "hart_transformer_c2i" if self.is_c2i else "hart_transformer_t2i"
        return d


# ---------------------------------------------------------------- attention
class Attention(nn.Module):
    """HART's Llama attention: fused qkv without bias + (q_bias, 0, v_bias), RoPE, proj."""

    cfg: T2IConfig
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        c = self.cfg.embed_dim
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.qkv_proj = nn.Dense(3 * c, use_bias=False, **kw)
        self.q_bias = self.param("q_bias", nn.initializers.zeros, (c,))
        self.v_bias = self.param("v_bias", nn.initializers.zeros, (c,))
        if self.cfg.attn_l2_norm:
            init = lambda key, shape: jnp.full(shape, math.log(4.0), jnp.float32)
            self.scale_mul_1H11 = self.param("scale_mul_1H11", init, (1, self.cfg.num_heads, 1, 1))
        self.proj = nn.Dense(c, **kw)

    def qkv(self, x_BLC: jax.Array, cos_BLD: jax.Array, sin_BLD: jax.Array) -> tuple[jax.Array, ...]:
        """Projected q, k (RoPE applied) and v, ``[B, L, A, D]`` each."""
        b, l, c = x_BLC.shape
        h, hd = self.cfg.num_heads, self.cfg.head_dim
        bias = jnp.concatenate([self.q_bias, jnp.zeros_like(self.q_bias), self.v_bias]).astype(self.dtype)
        qkv = (self.qkv_proj(x_BLC) + bias).reshape(b, l, 3, h, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.cfg.attn_l2_norm:
            mul = jnp.exp(jnp.minimum(self.scale_mul_1H11, math.log(100.0))).reshape(1, 1, h, 1)
            q = _l2_normalize(q) * mul.astype(q.dtype)
            k = _l2_normalize(k)
        return apply_rope(q, cos_BLD, sin_BLD), apply_rope(k, cos_BLD, sin_BLD), v

    def __call__(
        self, x_BLC: jax.Array, cos_BLD: jax.Array, sin_BLD: jax.Array, levels_BL: jax.Array
    ) -> jax.Array:
        """Full-sequence attention with the level mask (training / teacher forcing)."""
        b, l, c = x_BLC.shape
        q, k, v = self.qkv(x_BLC, cos_BLD, sin_BLD)
        out = attention(
            q, k, v, q_levels=levels_BL, k_levels=levels_BL, scale=self.cfg.attn_scale,
            impl=self.cfg.attention_impl, precision=self.precision,
        )
        return self.proj(out.reshape(b, l, c))

    def cached(
        self,
        x_BlC: jax.Array,
        cos_BlD: jax.Array,
        sin_BlD: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        offset: int,
        layer: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One scale's queries against the KV cache, after writing its k/v at ``offset``.

        ``cache``: this block's ``(k, v)`` ``[B, K, A, D]``, or with ``layer`` (a
        traced block index) the stacked caches ``[X, B, K, A, D]``, updated in
        place at ``[layer, :, offset:offset+l]`` (only the new tokens are written).
        """
        b, l, c = x_BlC.shape
        q, k, v = self.qkv(x_BlC, cos_BlD, sin_BlD)
        end = offset + l
        if layer is None:
            ck = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), offset, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), offset, axis=1)
        else:
            start = (layer, 0, offset, 0, 0)
            ck = jax.lax.dynamic_update_slice(cache[0], k[None].astype(cache[0].dtype), start)
            cv = jax.lax.dynamic_update_slice(cache[1], v[None].astype(cache[1].dtype), start)
        # xla reads the static prefix [0, end) only; pallas reads block `layer` of the stack in place
        out = cache_attention(
            q, ck, cv, valid_len=end, scale=self.cfg.attn_scale, layer=layer,
            impl=self.cfg.attention_impl, precision=self.precision,
        )
        return self.proj(out.reshape(b, l, c)), (ck, cv)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    n = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(n, eps).astype(x.dtype)).astype(x.dtype)


class LlamaMLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` without biases."""

    hidden: int
    out: int
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        kw = dict(use_bias=False, dtype=self.dtype, precision=self.precision)
        self.gate_proj = nn.Dense(self.hidden, **kw)
        self.up_proj = nn.Dense(self.hidden, **kw)
        self.down_proj = nn.Dense(self.out, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def pool_condition(cond: jax.Array, mask_BT: jax.Array | None, mode: str) -> jax.Array:
    """Pool the conditioning ``[B, T, C]`` to ``[B, C]``: ``max`` over all tokens (padding
    included) or the masked ``avg`` (denominator clamped to >= 1). ``[B, C]`` passes through."""
    if cond.ndim == 2:
        return cond
    if mode == "max":
        return jnp.max(cond, axis=1)
    m = mask_BT.astype(cond.dtype)[..., None]
    return jnp.sum(cond * m / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0), axis=1)


class Block(nn.Module):
    """``AdaLNSelfAttn`` (llama): one shared RMSNorm, attention and SwiGLU sub-layers,
    with per-block AdaLN, shared AdaLN table, or none (``disable_aln``)."""

    cfg: T2IConfig
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        cfg = self.cfg
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.ln_wo_grad = RMSNorm(cfg.norm_eps)
        self.attn = Attention(cfg, **kw)
        self.ffn = LlamaMLP(cfg.mlp_hidden, cfg.embed_dim, **kw)
        if not cfg.disable_aln:
            self.ada_lin = nn.Dense(6 * cfg.embed_dim, **kw)
        elif cfg.shared_aln:
            init = lambda key, shape: jax.random.normal(key, shape) / cfg.embed_dim**0.5
            self.scale_shift_table = self.param("scale_shift_table", init, (6, cfg.embed_dim))

    def modulation(self, cond: jax.Array, mask_BT: jax.Array | None) -> tuple[jax.Array, ...] | None:
        """``(gamma1, gamma2, scale1, scale2, shift1, shift2)``, each ``[B, 1, C]``, or None."""
        cfg = self.cfg
        c = cfg.embed_dim
        if not cfg.disable_aln:
            pooled = pool_condition(cond, mask_BT, cfg.sep_aln_pooling_mode)
            mods = self.ada_lin(nn.silu(pooled)).reshape(-1, 1, 6, c)
        elif cfg.shared_aln:
            pooled = pool_condition(cond, mask_BT, "avg")
            mods = (self.scale_shift_table[None] + pooled[:, None, :])[:, None]
        else:
            return None
        return tuple(mods[:, :, i] for i in range(6))

    def _mix(self, x, attn_fn, mods):
        n = self.ln_wo_grad
        if mods is None:
            x = x + attn_fn(n(x))
            return x + self.ffn(n(x))
        g1, g2, s1, s2, b1, b2 = mods
        x = x + attn_fn(n(x) * (s1 + 1) + b1) * g1
        return x + self.ffn(n(x) * (s2 + 1) + b2) * g2

    def __call__(self, x_BLC, cos, sin, levels_BL, cond, mask_BT):
        """Full sequence with the level mask; returns ``(x, None)`` (the ``nn.scan`` body form:
        carry out, nothing stacked)."""
        return self._mix(x_BLC, lambda h: self.attn(h, cos, sin, levels_BL), self.modulation(cond, mask_BT)), None

    def cached(self, x_BlC, cos, sin, cache, offset, cond, mask_BT, layer=None):
        """One scale against the KV cache; returns ``(x, new_cache)`` (see ``Attention.cached``)."""
        box = {}

        def attn_fn(h):
            out, box["cache"] = self.attn.cached(h, cos, sin, cache, offset, layer)
            return out

        x = self._mix(x_BlC, attn_fn, self.modulation(cond, mask_BT))
        return x, box["cache"]


REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(name: str) -> Any:
    """``jax.checkpoint`` policy of a ``train.remat`` value: ``dots`` saves the matmul outputs
    without batch dimensions (recomputes the rest), ``full`` saves nothing (recomputes the block)."""
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {name!r}")


def block_stack(cfg: T2IConfig, dtype: Dtype, precision: PrecisionLike, remat: str) -> nn.Module:
    """The ``X`` blocks as one ``nn.scan`` over ``Block``: every parameter gets a leading depth
    axis ``[X, ...]``; ``remat`` ("none" | "dots" | "full") rematerialises each block."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    body = Block if remat == "none" else nn.remat(Block, policy=remat_policy(remat), prevent_cse=False)
    scanned = nn.scan(
        body,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 5,
        length=cfg.depth,
    )
    return scanned(cfg, dtype, precision)


def block_params(stacked: Any, i: Any) -> Any:
    """Block ``i``'s parameters (static or traced index) from the stacked ``[X, ...]`` tree."""
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)


def stack_blocks(params: Mapping[str, Any], depth: int | None = None) -> dict[str, Any]:
    """Params in the per-block layout ``blocks_0 .. blocks_{X-1}`` (checkpoints written before the
    blocks were stacked) -> the stacked layout ``blocks: [X, ...]``; other trees pass through.
    Host (numpy) leaves stay numpy."""
    names = sorted((k for k in params if re.fullmatch(r"blocks_\d+", str(k))), key=lambda k: int(k[7:]))
    if not names:
        return dict(params)
    if "blocks" in params:
        raise ValueError("params hold both the stacked 'blocks' and per-block 'blocks_<i>' entries")
    found = [int(k[7:]) for k in names]
    n = len(names) if depth is None else depth
    if found != list(range(n)):
        raise ValueError(f"per-block params {names} are not blocks_0..blocks_{n - 1}")
    out = {k: v for k, v in params.items() if k not in names}
    out["blocks"] = jax.tree_util.tree_map(_stack_leaves, *[params[k] for k in names])
    return out


def _stack_leaves(*leaves: Any) -> Any:
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
    return np.stack([np.asarray(x) for x in leaves])


def unstack_blocks(params: Mapping[str, Any]) -> dict[str, Any]:
    """The stacked layout -> per-block ``blocks_<i>`` entries (inverse of ``stack_blocks``;
    leaves may be arrays or ``ShapeDtypeStruct``s)."""
    if "blocks" not in params:
        return dict(params)
    out = {k: v for k, v in params.items() if k != "blocks"}
    leaves, tree = jax.tree_util.tree_flatten(params["blocks"])
    depth = leaves[0].shape[0]
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree_util.tree_unflatten(
            tree, [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x[i] for x in leaves]
        )
    return out


class AdaLNBeforeHead(nn.Module):
    """``RMSNorm(h) * (1 + scale) + shift`` with ``[scale, shift]`` from the max-pooled condition."""

    cfg: T2IConfig
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        self.ln_wo_grad = RMSNorm(self.cfg.norm_eps)
        self.ada_lin = nn.Dense(2 * self.cfg.embed_dim, dtype=self.dtype, precision=self.precision)

    def __call__(self, h_BLC: jax.Array, cond: jax.Array) -> jax.Array:
        pooled = pool_condition(cond, None, "max")  # always max, whatever the config says
        scale, shift = jnp.split(self.ada_lin(nn.silu(pooled))[:, None, :], 2, axis=-1)
        return self.ln_wo_grad(h_BLC) * (scale + 1) + shift


# -------------------------------------------------------------------- model
class HARTTransformer(nn.Module):
    """The transformer, its head and the diffusion head (``diffloss``).

    Methods (``model.apply(variables, ..., method=...)``):
      ``condition``: context (or class labels) -> conditioning ``cond`` and level-0 tokens;
      ``teacher_forced``: the training forward over the whole sequence;
      ``stage``: one sampling stage against the KV cache;
      ``logits``: head over hidden states; ``diffusion_condition``; ``level_embedding``.
    The tokenizer codebook ``[V, Z]`` is passed in where needed (it is not a parameter
    of this model, as in the release).

    The blocks' parameters are one stack ``params["blocks"]`` with a leading depth axis ``X``
    (``block_stack``). ``remat`` ("none" | "dots" | "full") rematerialises each block of the
    training forward; ``unroll_blocks`` runs that forward as a Python loop over slices of the
    stack instead of the scan (the reference form; same parameters, same values).
    """

    cfg: T2IConfig
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    remat: str = "none"
    unroll_blocks: bool = False

    def setup(self) -> None:
        cfg = self.cfg
        kw = dict(dtype=self.dtype, precision=self.precision)
        c = cfg.embed_dim
        if cfg.is_c2i:
            self.class_emb = nn.Embed(cfg.num_classes + 1, c)
            self.pos_start = self.param(
                "pos_start", nn.initializers.truncated_normal(math.sqrt(1 / c / 3)), (1, cfg.first_l, c)
            )
        else:
            if cfg.use_context_norm:
                self.context_norm = RMSNorm(cfg.norm_eps)
            self.context_embed = nn.Dense(c, precision=self.precision)
        self.word_embed = nn.Dense(c, precision=self.precision)
        if cfg.use_timestep_embed:
            self.lvl_embed = TimestepEmbedder(c, precision=self.precision)
        else:
            self.lvl_embed = nn.Embed(cfg.num_scales, c)
        self.blocks = block_stack(cfg, self.dtype, self.precision, self.remat)
        self.head_nm = AdaLNBeforeHead(cfg, precision=self.precision)
        self.head = nn.Dense(cfg.vocab_size, precision=self.precision)
        self.decoder_norm = RMSNorm(cfg.norm_eps)
        self.diffloss = DiffLoss(
            target_channels=cfg.z_channels,
            z_channels=c,
            width=cfg.diff_width,
            depth=cfg.diff_depth,
            num_sampling_steps=cfg.num_sampling_steps,
            precision=self.precision,
        )

    # ------------------------------------------------------------- pieces
    def level_embedding(self) -> jax.Array:
        """``[N, C]`` embedding of each level id."""
        return self.lvl_embed(jnp.arange(self.cfg.num_scales))  # TimestepEmbedder or nn.Embed

    def condition(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Conditioning and level-0 input tokens (without level embedding).

        Text: ``context [B, T, E]`` -> ``cond = context_embed(context_norm(context))``
        ``[B, T, C]`` (fp32), which is also the level-0 input. Classes: int labels ``[B]``
        (``num_classes`` = null class) -> ``cond [B, C]``, level-0 input
        ``cond + pos_start`` ``[B, pn0^2, C]``.
        """
        cfg = self.cfg
        if cfg.is_c2i:
            cond = self.class_emb(context)
            sos = cond[:, None, :] + self.pos_start
            return cond, sos
        ctx = context.astype(jnp.float32)
        if cfg.use_context_norm:
            ctx = self.context_norm(ctx)
        cond = self.context_embed(ctx)
        return cond, cond

    def logits(self, h_BLC: jax.Array, cond: jax.Array) -> jax.Array:
        """``head(head_nm(h, cond))`` in fp32, ``[B, L, V]``."""
        h = self.head_nm(h_BLC.astype(jnp.float32), cond.astype(jnp.float32))
        return self.head(h).astype(jnp.float32)

    def diffusion_condition(self, h_BkC: jax.Array, code_BkZ: jax.Array) -> jax.Array:
        """``decoder_norm(h + word_embed(E[idx]))``: the diffusion head's conditioning."""
        return self.decoder_norm(h_BkC + self.word_embed(code_BkZ).astype(h_BkC.dtype))

    def _visual_positions(self, patch_nums: Sequence[int], offset_B: jax.Array | None) -> jax.Array:
        pos = jnp.asarray(grid_positions(patch_nums, self.cfg.patch_nums[-1]))[None]
        if offset_B is not None:
            pos = pos + offset_B.astype(jnp.float32)[:, None, None]
        return pos

    # ---------------------------------------------------------- training
    def teacher_forced(
        self,
        context: jax.Array,
        x_BLZ: jax.Array,
        context_position_ids: jax.Array | None,
        context_mask: jax.Array | None,
        last_kept_Bk: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The training forward (teacher forcing).

        ``x_BLZ``: teacher-forcing inputs of scales 1..N-1 ``[B, sum_{s>=1} pn^2, Z]``.
        ``last_kept_Bk``: ascending indices of the last-scale tokens kept (token
        dropping; all when None). Returns ``(logits [B, 1 + mid + K, V] from the last
        level-0 position on, h_last [B, K, C] (final-block output of the kept last-scale
        tokens), cond)``.
        """
        cfg = self.cfg
        b = x_BLZ.shape[0]
        n_last = cfg.patch_nums[-1] ** 2
        mid = x_BLZ.shape[1] - n_last
        if mid != sum(p * p for p in cfg.patch_nums[1:-1]):
            raise ValueError(
                f"x_BLZ has {x_BLZ.shape[1]} tokens; patch_nums {cfg.patch_nums} need "
                f"{sum(p * p for p in cfg.patch_nums[1:])}"
            )
        last_in = x_BLZ[:, mid:]
        vis_pos = self._visual_positions(cfg.patch_nums[1:], None)
        vis_pos = jnp.broadcast_to(vis_pos, (b,) + vis_pos.shape[1:])
        if last_kept_Bk is not None:
            last_in = jnp.take_along_axis(last_in, last_kept_Bk[..., None], axis=1)
            last_pos = jnp.take_along_axis(vis_pos[:, mid:], last_kept_Bk[..., None], axis=1)
            vis_pos = jnp.concatenate([vis_pos[:, :mid], last_pos], axis=1)
        k = last_in.shape[1]
        cond, sos = self.condition(context)
        x = jnp.concatenate([sos, self.word_embed(jnp.concatenate([x_BLZ[:, :mid], last_in], 1).astype(jnp.float32))], 1)
        levels = jnp.asarray(cfg.level_ids(k))
        x = x + self.level_embedding()[levels][None]
        hd = cfg.head_dim
        if cfg.is_c2i:
            pos = jnp.concatenate([jnp.zeros((b, cfg.first_l, 2), jnp.float32), vis_pos], 1)
            cos, sin = rope_2d(pos, hd, cfg.rope_theta, cfg.rope_2d)
        else:
            vis_pos = vis_pos + context_position_ids[:, -1].astype(jnp.float32)[:, None, None]
            c1, s1 = rope_1d(context_position_ids, hd, cfg.rope_theta)
            c2, s2 = rope_2d(vis_pos, hd, cfg.rope_theta, cfg.rope_2d)
            cos, sin = jnp.concatenate([c1, c2], 1), jnp.concatenate([s1, s2], 1)
        levels_BL = jnp.broadcast_to(levels[None], (b, levels.shape[0]))
        x = self._run_blocks(x.astype(self.dtype), cos, sin, levels_BL, cond, context_mask)
        logits = self.logits(x[:, cfg.first_l - 1 :], cond)
        return logits, x[:, x.shape[1] - k :], cond

    def _run_blocks(self, x_BLC, cos, sin, levels_BL, cond, mask_BT) -> jax.Array:
        """All blocks over the full sequence: the scanned stack, or (``unroll_blocks``) a loop
        applying one ``Block`` to each slice of the stack."""
        if self.unroll_blocks and not self.is_initializing():
            blk = Block(self.cfg, self.dtype, self.precision, parent=None)
            stacked = self.variables["params"]["blocks"]
            for i in range(self.cfg.depth):
                x_BLC, _ = blk.apply({"params": block_params(stacked, i)}, x_BLC, cos, sin, levels_BL, cond, mask_BT)
            return x_BLC
        x_BLC, _ = self.blocks(x_BLC, cos, sin, levels_BL, cond, mask_BT)
        return x_BLC

    # ---------------------------------------------------------- sampling
    def stage(
        self,
        x_BlC: jax.Array,
        si: int,
        caches: Any,
        cond: jax.Array,
        context_position_ids: jax.Array | None,
        context_mask: jax.Array | None,
    ) -> tuple[jax.Array, Any]:
        """Run scale ``si``'s input tokens (level embedding included) through every block
        against the KV caches; returns the final hidden states and the new caches.

        ``caches``: a list of per-block ``(k, v)`` ``[B, K, A, D]`` (blocks unrolled, each
        a slice of the stacked block params), or one stacked ``(K, V)`` pair ``[X, B, K, A, D]``
        (blocks run in a ``fori_loop`` indexing the stack: one block body to compile, the
        caches updated in place).
        """
        cfg = self.cfg
        b = x_BlC.shape[0]
        offset = cfg.stage_slices()[si][0]
        hd = cfg.head_dim
        if cfg.is_c2i:
            pos = self._visual_positions(cfg.patch_nums[si : si + 1], None)
            cos, sin = rope_2d(jnp.broadcast_to(pos, (b,) + pos.shape[1:]), hd, cfg.rope_theta, cfg.rope_2d)
        elif si == 0:
            cos, sin = rope_1d(context_position_ids, hd, cfg.rope_theta)
        else:
            pos = self._visual_positions(cfg.patch_nums[si : si + 1], context_position_ids[:, -1])
            cos, sin = rope_2d(pos, hd, cfg.rope_theta, cfg.rope_2d)
        x = x_BlC.astype(self.dtype)
        blk = Block(cfg, self.dtype, self.precision, parent=None)
        stacked = self.variables["params"]["blocks"]
        if isinstance(caches, tuple):

            def body(i, carry):
                x, kc, vc = carry
                x, (kc, vc) = blk.apply(
                    {"params": block_params(stacked, i)}, x, cos, sin, (kc, vc), offset, cond, context_mask, i,
                    method=Block.cached,
                )
                return x, kc, vc

            x, kc, vc = jax.lax.fori_loop(0, cfg.depth, body, (x, caches[0], caches[1]))
            return x, (kc, vc)
        new = []
        for i, cache in enumerate(caches):
            x, c = blk.apply(
                {"params": block_params(stacked, i)}, x, cos, sin, cache, offset, cond, context_mask, method=Block.cached
            )
            new.append(c)
        return x, new

    def init_all(self) -> None:
        """Touch every parameter once on one-token inputs (``init`` with this method
        creates exactly the parameters of a full-sequence ``init``, with the same values:
        Flax derives each parameter's key from its module path, not from the inputs)."""
        cfg = self.cfg
        if cfg.is_c2i:
            cond, _ = self.condition(jnp.zeros((1,), jnp.int32))
            mask_BT = None
        else:
            cond, _ = self.condition(jnp.zeros((1, 1, cfg.context_dim), jnp.float32))
            mask_BT = jnp.ones((1, 1), bool)
        x = self.word_embed(jnp.zeros((1, 1, cfg.z_channels), jnp.float32)) + self.level_embedding()[:1]
        cos, sin = rope_1d(jnp.zeros((1, 1), jnp.int32), cfg.head_dim, cfg.rope_theta)
        levels_BL = jnp.zeros((1, 1), jnp.int32)
        x, _ = self.blocks(x.astype(self.dtype), cos, sin, levels_BL, cond, mask_BT)
        self.logits(x, cond)
        z = self.diffusion_condition(x, jnp.zeros((1, 1, cfg.z_channels), x.dtype))
        self.diffloss.net(jnp.zeros((1, cfg.z_channels), jnp.float32), jnp.zeros((1,), jnp.int32), z.reshape(1, -1))

    def __call__(self, context, x_BLZ, context_position_ids=None, context_mask=None):
        """Full-sequence entry: teacher forcing + the diffusion head on dummy rows."""
        logits, h, cond = self.teacher_forced(context, x_BLZ, context_position_ids, context_mask)
        z = self.diffusion_condition(h, jnp.zeros(h.shape[:2] + (self.cfg.z_channels,), h.dtype))
        rows = z.reshape(-1, z.shape[-1])[:1]
        eps = self.diffloss.net(
            jnp.zeros((1, self.cfg.z_channels), jnp.float32), jnp.zeros((1,), jnp.int32), rows
        )
        return logits, eps


def init_inputs(cfg: T2IConfig, batch: int = 1) -> tuple[jax.Array, ...]:
    """Dummy inputs of the right shapes for ``init`` / ``jax.eval_shape``."""
    n = sum(p * p for p in cfg.patch_nums[1:])
    x = jnp.zeros((batch, n, cfg.z_channels), jnp.float32)
    if cfg.is_c2i:
        return jnp.zeros((batch,), jnp.int32), x, None, None
    ctx = jnp.zeros((batch, cfg.context_token, cfg.context_dim), jnp.float32)
    pos = jnp.zeros((batch, cfg.context_token), jnp.int32)
    mask = jnp.ones((batch, cfg.context_token), bool)
    return ctx, x, pos, mask


def init_variables(cfg: T2IConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh variables of ``HARTTransformer(cfg)``: the values of ``model.init(key,
    *init_inputs(cfg))`` without its full-length forward (``HARTTransformer.init_all``),
    and independent of ``cfg.attention_impl`` (initialisation runs the ``xla`` path in
    fp32, so an inference-only choice such as ``cudnn`` never constrains it). Jit it with
    ``cfg`` static for device-side initialisation."""
    model = HARTTransformer(dataclasses.replace(cfg, attention_impl="xla"))
    return dict(model.init(key, method=HARTTransformer.init_all))


def abstract_params(cfg: T2IConfig) -> dict[str, Any]:
    """Shapes of the ``"params"`` of ``HARTTransformer(cfg)`` via ``jax.eval_shape`` (nothing allocated)."""
    return dict(jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))["params"])
