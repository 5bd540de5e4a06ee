"""Pipelines with random weights at any size, set up in seconds (benchmarks, compile checks).

Speed does not depend on the weights' values, so benchmarks run on random ones:
``random_like`` values (normal(0, 0.02) matrices, unit norm scales, zero biases) drawn
from each model's shapes (``jax.eval_shape``, nothing compiled but one small program).
The transformer's real initialisation is ``models.transformer.init_variables`` (what
training uses); its many per-parameter random draws take far longer to compile. ``abstract=True`` gives shapes only
(``jax.ShapeDtypeStruct`` leaves): enough to lower and compile a program without
allocating a weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
from hart_jax.models.text_encoder import Qwen2Config, Qwen2Model
from hart_jax.models.transformer import T2IConfig, init_variables
from hart_jax.pipeline import HARTPipeline, seed_keys

# Scale lists by resolution: 256 -> VAR's (1..16), 512 -> VAR's 512 list (1..32), 1024 -> HART's 14 scales.
PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
# The text encoder of the tiny preset (the golden fixture's sizes)
TINY_QWEN2 = dict(vocab_size=400, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
ONES = ("scale", "weight")  # norm gains
ZEROS = ("bias", "q_bias", "v_bias")


@dataclasses.dataclass
class TextParts:
    """What the pipeline needs of a text encoder when inputs are token ids (no tokenizer)."""

    model: Qwen2Model
    params: Any
    config: Qwen2Config
    max_length: int


def preset_configs(
    preset: str, resolution: int = 1024, attention_impl: str = "auto"
) -> tuple[TokenizerConfig, T2IConfig, Qwen2Config]:
    """``(tokenizer, transformer, text encoder)`` configs: ``"tiny"`` (the golden fixture's
    shapes; ``resolution`` ignored) or ``"full"`` (HART 0.7B + Qwen2-1.5B with the scale list
    of ``resolution``: 256, 512 or 1024)."""
    from configs.tokenizer import get_config as tok_preset
    from configs.transformer import get_config as t2i_preset

    if preset == "tiny":
        return (TokenizerConfig(**tok_preset("tiny")), T2IConfig(**t2i_preset("tiny"), attention_impl=attention_impl),
                Qwen2Config(**TINY_QWEN2))
    if preset != "full":
        raise ValueError(f"preset must be 'tiny' or 'full', got {preset!r}")
    if resolution not in PATCH_NUMS:
        raise ValueError(f"resolution must be one of {sorted(PATCH_NUMS)}, got {resolution}")
    pn = PATCH_NUMS[resolution]
    tok = TokenizerConfig(**{**tok_preset("hart_0p7b_1024"), "v_patch_nums": pn})
    t2i = T2IConfig(**{**t2i_preset("hart_0p7b_1024"), "patch_nums": pn}, attention_impl=attention_impl)
    return tok, t2i, Qwen2Config()


def _leaf_name(path: tuple) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def random_like(shapes: Any, key: jax.Array, std: float = 0.02) -> Any:
    """Random values shaped like ``shapes`` (a pytree of ``ShapeDtypeStruct``/arrays):
    1-D ``scale``/``weight`` leaves 1, biases 0, everything else normal(0, ``std``), in
    each leaf's dtype. One jitted program with ONE normal draw sliced into the leaves
    (a draw per leaf would make a program whose compilation takes minutes)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    kinds = []
    for path, leaf in flat:
        name = _leaf_name(path)
        kinds.append("ones" if len(leaf.shape) == 1 and name in ONES else "zeros" if name in ZEROS else "normal")
    sizes = [int(np.prod(leaf.shape)) for _, leaf in flat]
    total = sum(n for n, kind in zip(sizes, kinds) if kind == "normal")

    def draw(key: jax.Array) -> list[jax.Array]:
        noise = std * jax.random.normal(key, (max(total, 1),), jnp.float32)
        out, at = [], 0
        for (_, leaf), kind, n in zip(flat, kinds, sizes):
            shape, dtype = tuple(leaf.shape), leaf.dtype
            if kind == "normal":
                out.append(jax.lax.dynamic_slice_in_dim(noise, at, n).reshape(shape).astype(dtype))
                at += n
            else:
                out.append((jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype))
        return out

    return jax.tree_util.tree_unflatten(treedef, jax.jit(draw)(key))


def _cast(tree: Any, dtype: Any) -> Any:
    """fp32 leaves -> ``dtype`` (the big weights stored in the compute dtype, as inference does)."""

    def one(x: Any) -> Any:
        if x.dtype != jnp.float32:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return x.astype(dtype)

    return jax.tree_util.tree_map(one, tree)


def random_pipeline(
    tok_cfg: TokenizerConfig,
    t2i_cfg: T2IConfig,
    q_cfg: Qwen2Config,
    dtype: Any,
    *,
    abstract: bool = False,
    seed: int = 0,
    compile_cache: Any = False,
) -> HARTPipeline:
    """A :class:`HARTPipeline` with random weights (shapes only if ``abstract``); the
    transformer and text encoder weights are stored in ``dtype``, the tokenizer in fp32.
    ``compile_cache`` as in :class:`HARTPipeline`; off by default, so that a benchmark's
    compile time is XLA compiling, not a read from the persistent cache."""
    k_tok, k_t2i, k_txt = jax.random.split(jax.random.PRNGKey(seed), 3)
    side = tok_cfg.v_patch_nums[-1] * tok_cfg.downsample
    tok_shapes = jax.eval_shape(HARTAutoEncoder(tok_cfg).init, k_tok, jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
    qm = Qwen2Model(q_cfg, dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    q_shapes = jax.eval_shape(qm.init, k_txt, ids, jax.ShapeDtypeStruct((1, 1), bool))["params"]
    t2i_shapes = jax.eval_shape(lambda k: init_variables(t2i_cfg, k), k_t2i)
    if abstract:
        tok_vars, q_params, t2i_vars = tok_shapes, q_shapes, t2i_shapes
    else:
        tok_vars, q_params, t2i_vars = (random_like(x, k) for x, k in
                                        ((tok_shapes, k_tok), (q_shapes, k_txt), (t2i_shapes, k_t2i)))
    if dtype != jnp.float32:
        t2i_vars, q_params = _cast(t2i_vars, dtype), _cast(q_params, dtype)
    text = TextParts(qm, q_params, q_cfg, t2i_cfg.context_token)
    return HARTPipeline(tok_cfg, tok_vars, t2i_cfg, t2i_vars, text, dtype=dtype, compile_cache=compile_cache)


def prompt_draws(
    batch: int, context_tokens: int, vocab: int, prefix_len: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random prompt encodings shaped like HART's, numpy only (``bench/original_hart.py``
    draws the same): ``prefix_len`` prefix tokens + ``context_tokens`` tokens of which a
    random number (4 or more) are valid; returns ``(ids, attention mask, context mask,
    context position ids)``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, prefix_len + context_tokens)).astype(np.int32)
    n_valid = rng.integers(min(4, context_tokens), context_tokens + 1, batch)
    mask = np.arange(context_tokens)[None] < n_valid[:, None]
    attn = np.concatenate([np.ones((batch, prefix_len), bool), mask], 1)
    pos = (np.cumsum(mask, 1) - 1).astype(np.int32)
    return ids, attn, mask, pos


def token_inputs(pipe: HARTPipeline, batch: int, prefix_len: int = 64, seed: int = 0) -> tuple[np.ndarray, ...]:
    """:func:`prompt_draws` for ``pipe`` plus one key per image (seeds ``0..batch-1``): the
    arguments after the weights of ``pipe.program(batch, ...)``, guidance excluded."""
    draws = prompt_draws(batch, pipe.t2i_cfg.context_token, pipe.text_encoder.config.vocab_size, prefix_len, seed)
    return (*draws, seed_keys(range(batch)))
