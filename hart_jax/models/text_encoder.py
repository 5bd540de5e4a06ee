"""Qwen2 language model (HART's text encoder) in Flax Linen.

Dimensions (docs/design.md):
  B batch; L tokens (prompt prefix + prompt tokens); Q query tokens; K key tokens
  (both L, named apart in attention); E text width (``hidden_size``, 1536); A heads
  (query heads, 12); G key/value heads (2); g group size (A / G); D head dim (128);
  f frequencies (D/2); I MLP width (8960); V vocabulary (151936); X depth (layers, 28).

The model is ``transformers``' ``Qwen2Model`` (no LM head): token embedding, L
pre-norm decoder layers (grouped-query attention with q/k/v biases and no output
bias, rotate-half RoPE, RMSNorm, SwiGLU MLP) and a final RMSNorm. ``__call__``
returns the last hidden state **after** the final norm, which is what HART reads.

Attention mask: causal AND key padding (a query attends to keys ``<=`` its index
whose ``attention_mask`` bit is 1), as ``Qwen2Model`` builds it from a 2-D mask.
A query row with no visible key at all (only possible with left padding and no
prompt prefix) gets a zero attention output, as transformers 5.x's default SDPA
path does on CPU.

Numerics follow transformers: RMSNorm takes its statistic in fp32 and rounds the
normalised value to the compute dtype before the scale; RoPE's inverse
frequencies and angles are fp32, cos/sin are cast to the compute dtype; the
softmax runs in fp32. ``dtype`` is the compute dtype (float32 or bfloat16).

The module carries no sharding scheme of its own: its parameters get logical axis
names from their paths in ``hart_jax.train.sharding.PARAM_LOGICAL_AXES`` (``vocab``,
``embed``, ``heads``, ``kv_heads``, ``mlp``, ``norm``), as the transformer's do, and
its activations carry the training's logical constraints (``batch``, ``length``,
``act_embed``), no-ops outside ``nn.logical_axis_rules``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
PrecisionLike = Any

# --------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Qwen2 language-model hyper-parameters; field names follow ``Qwen2Config`` of
    transformers, defaults are Qwen2-1.5B (the size HART conditions on)."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    source_model_type: str = "qwen2"

    MODEL_TYPES = ("qwen2", "qwen2_vl", "qwen2_vl_text")
    # RoPE variants that equal plain 1-D RoPE for text-only input (M-RoPE gives a
    # text token the same temporal/height/width position, so its sections collapse).
    ROPE_TYPES = (None, "default", "mrope")
    # transformers' defaults when a config names no theta.
    DEFAULT_THETA = {"qwen2": 10000.0, "qwen2_vl": 1_000_000.0, "qwen2_vl_text": 1_000_000.0}
    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    def __post_init__(self) -> None:
        sizes = (*self.REQUIRED, "num_key_value_heads")
        bad = [f"{k}={getattr(self, k)}" for k in sizes if getattr(self, k) <= 0]
        if bad:
            raise ValueError(f"sizes must be positive: {', '.join(bad)}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (Qwen2 uses 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads} and no head_dim is given"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim={self.resolved_head_dim} must be even for rotate-half RoPE")

    @property
    def resolved_head_dim(self) -> int:
        """``head_dim`` if the config names one, else ``hidden_size // num_attention_heads``."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "Qwen2Config":
        """Build from a transformers ``config.json`` dict of a Qwen2 or Qwen2-VL model.

        Qwen2-VL text fields are read from ``text_config`` (transformers 5 layout)
        with the top level as fallback (older flat layout). ``rope_theta`` is read
        from ``rope_parameters`` / ``rope_scaling`` or the top level.
        """
        mt = d.get("model_type")
        if mt not in cls.MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={mt!r} is not a Qwen2 language model (expected one of {cls.MODEL_TYPES})"
            )
        t = dict(d)
        if isinstance(d.get("text_config"), Mapping):
            t.update(d["text_config"])
        missing = [k for k in cls.REQUIRED if t.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"{source}: rope_parameters must be an object, got {type(rope).__name__}")
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in cls.ROPE_TYPES:
            raise ValueError(
                f"{source}: rope_type={rope_type!r} is not supported (expected one of {cls.ROPE_TYPES[1:]})"
            )
        theta = rope.get("rope_theta", t.get("rope_theta"))
        if theta is None:
            theta = cls.DEFAULT_THETA[mt]
        if t.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (full attention only)")
        layer_types = t.get("layer_types") or []
        if any(lt != "full_attention" for lt in layer_types):
            raise ValueError(f"{source}: layer_types {sorted(set(layer_types))} not supported (full attention only)")
        heads = int(t["num_attention_heads"])
        kv = t.get("num_key_value_heads")
        kw: dict[str, Any] = dict(
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]),
            num_hidden_layers=int(t["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv is None else int(kv),
            head_dim=None if t.get("head_dim") is None else int(t["head_dim"]),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
            hidden_act=str(t.get("hidden_act", "silu")),
            source_model_type=str(t.get("source_model_type", mt)),
        )
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-style ``qwen2`` config dict (round-trips through ``from_hf_dict``)."""
        d = {
            "model_type": "qwen2",
            "architectures": ["Qwen2Model"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "use_sliding_window": False,
            "source_model_type": self.source_model_type,
        }
        if self.head_dim is not None:
            d["head_dim"] = self.head_dim
        return d


# ----------------------------------------------------------------- functions
def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``1 / theta ** (2i / D)`` for ``i < D/2``, float32 as transformers computes it."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    denom = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / denom).astype(np.float32)


def rope_cos_sin(
    position_ids_BL: jax.Array, head_dim: int, theta: float, dtype: Dtype = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[B, L, D]`` of the angles ``pos * inv_freq`` (fp32), repeated twice."""
    inv = jnp.asarray(rope_inv_freq(head_dim, theta))
    freqs_BLf = position_ids_BL.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs_BLf, freqs_BLf], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_BLAD: jax.Array, cos_BLD: jax.Array, sin_BLD: jax.Array) -> jax.Array:
    """Rotate-half RoPE: dim ``k`` pairs with ``k + D/2``."""
    half = x_BLAD.shape[-1] // 2
    rot = jnp.concatenate([-x_BLAD[..., half:], x_BLAD[..., :half]], axis=-1)
    return x_BLAD * cos_BLD[:, :, None, :] + rot * sin_BLD[:, :, None, :]


def causal_padding_mask(attention_mask_BL: jax.Array) -> jax.Array:
    """bool ``[B, Sq, Sk]``: key ``k`` visible to query ``q`` iff ``k <= q`` and ``mask[k]``."""
    s = attention_mask_BL.shape[1]
    causal_QK = jnp.tril(jnp.ones((s, s), dtype=bool))
    return causal_QK[None] & attention_mask_BL.astype(bool)[:, None, :]


def _dense(features: int, *, use_bias: bool, dtype: Dtype, param_dtype: Dtype, precision: PrecisionLike) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=nn.initializers.normal(0.02),
    )


# ------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: fp32 statistic, value rounded to ``dtype``, times ``scale``."""

    dim: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.scale = self.param("scale", nn.initializers.ones_init(), (self.dim,), self.param_dtype)

    def __call__(self, x_BLE: jax.Array) -> jax.Array:
        x = x_BLE.astype(jnp.float32)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = (x * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.scale.astype(self.dtype) * y


class Qwen2Attention(nn.Module):
    """Grouped-query self-attention: q/k/v projections with bias, RoPE, o_proj without bias."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = _dense(q_out, use_bias=True, **kw)
        self.k_proj = _dense(kv_out, use_bias=True, **kw)
        self.v_proj = _dense(kv_out, use_bias=True, **kw)
        self.o_proj = _dense(self.hidden_size, use_bias=False, **kw)

    def __call__(
        self, x_BLE: jax.Array, cos_BLD: jax.Array, sin_BLD: jax.Array, mask_BQK: jax.Array
    ) -> jax.Array:
        b, s, _ = x_BLE.shape
        h, k, hd = self.num_heads, self.num_kv_heads, self.head_dim
        g = h // k
        q_BLAD = apply_rope(self.q_proj(x_BLE).reshape(b, s, h, hd), cos_BLD, sin_BLD)
        k_BLGD = apply_rope(self.k_proj(x_BLE).reshape(b, s, k, hd), cos_BLD, sin_BLD)
        v_BLGD = self.v_proj(x_BLE).reshape(b, s, k, hd)
        # Query head n uses key/value head n // G (transformers' repeat_kv order).
        q_BLGgD = q_BLAD.reshape(b, s, k, g, hd)
        logits_BGgQK = jnp.einsum("bskgh,btkh->bkgst", q_BLGgD, k_BLGD, precision=self.precision)
        logits_BGgQK = logits_BGgQK.astype(jnp.float32) * (hd**-0.5)
        visible_B11QK = mask_BQK[:, None, None]
        logits_BGgQK = jnp.where(visible_B11QK, logits_BGgQK, jnp.finfo(jnp.float32).min)
        probs_BGgQK = jax.nn.softmax(logits_BGgQK, axis=-1)
        # Rows that see no key at all attend to nothing (zero output).
        any_B11Q1 = jnp.any(visible_B11QK, axis=-1, keepdims=True)
        probs_BGgQK = jnp.where(any_B11Q1, probs_BGgQK, 0.0).astype(self.dtype)
        out_BLGgD = jnp.einsum("bkgst,btkh->bskgh", probs_BGgQK, v_BLGD, precision=self.precision)
        return self.o_proj(out_BLGgD.reshape(b, s, h * hd))


class Qwen2MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    hidden_size: int
    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.gate_proj = _dense(self.intermediate_size, **kw)
        self.up_proj = _dense(self.intermediate_size, **kw)
        self.down_proj = _dense(self.hidden_size, **kw)

    def __call__(self, x_BLE: jax.Array) -> jax.Array:
        return self.down_proj(nn.silu(self.gate_proj(x_BLE)) * self.up_proj(x_BLE))


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.self_attn = Qwen2Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.resolved_head_dim,
            precision=self.precision,
            **kw,
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.mlp = Qwen2MLP(c.hidden_size, c.intermediate_size, precision=self.precision, **kw)

    def __call__(
        self, x_BLE: jax.Array, cos_BLD: jax.Array, sin_BLD: jax.Array, mask_BQK: jax.Array
    ) -> jax.Array:
        x_BLE = x_BLE + self.self_attn(self.input_layernorm(x_BLE), cos_BLD, sin_BLD, mask_BQK)
        x_BLE = x_BLE + self.mlp(self.post_attention_layernorm(x_BLE))
        return nn.with_logical_constraint(x_BLE, ("batch", "length", "act_embed"))


class Qwen2Model(nn.Module):
    """``transformers.Qwen2Model``: embeddings, decoder layers, final RMSNorm (no LM head)."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.layers = [Qwen2DecoderLayer(c, precision=self.precision, **kw) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)

    def __call__(
        self,
        input_ids_BL: jax.Array,
        attention_mask_BL: jax.Array | None = None,
        position_ids_BL: jax.Array | None = None,
    ) -> jax.Array:
        """Last hidden state ``[B, S, D]`` (after the final norm, in ``dtype``).

        ``attention_mask_BL`` (1 = real token, default all ones) masks keys;
        ``position_ids_BL`` defaults to ``0..L-1`` for every row, as transformers
        uses when it is given none.
        """
        b, s = input_ids_BL.shape
        if attention_mask_BL is None:
            attention_mask_BL = jnp.ones((b, s), dtype=bool)
        if position_ids_BL is None:
            position_ids_BL = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        c = self.config
        mask_BQK = causal_padding_mask(attention_mask_BL)
        cos_BLD, sin_BLD = rope_cos_sin(position_ids_BL, c.resolved_head_dim, c.rope_theta, self.dtype)
        x_BLE = self.embed_tokens(input_ids_BL).astype(self.dtype)
        x_BLE = nn.with_logical_constraint(x_BLE, ("batch", "length", "act_embed"))
        for layer in self.layers:
            x_BLE = layer(x_BLE, cos_BLD, sin_BLD, mask_BQK)
        return self.norm(x_BLE)


# ------------------------------------------------------------------ shapes
def abstract_variables(
    cfg: Qwen2Config, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> Any:
    """``jax.eval_shape`` of the model's ``init`` (``ShapeDtypeStruct`` leaves)."""
    model = Qwen2Model(cfg, dtype=dtype, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
