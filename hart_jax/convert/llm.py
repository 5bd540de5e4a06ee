"""Converter for a release's ``llm/`` directory (``HARTForT2I``).

Weights: ``ema_model.bin`` by default (the original scripts load it over the model
weights), else ``model.safetensors`` / ``pytorch_model.bin`` (with a warning). Buffers
(``lvl_1L``, ``attn_bias_for_masking``, ``*.zero_k_bias``, RoPE ``inv_freq``) are
dropped: they are recomputed. ``vocab_size`` and ``z_channels`` come from the sibling
tokenizer's ``config.json`` when present, else from the weight shapes.

The release's per-block keys ``blocks.{i}.*`` map onto row ``i`` of the stacked block
parameters ``blocks/...`` ``[X, ...]``: the table is applied against the per-block view
(``blocks_{i}/...``, the names its reports use) and the result is stacked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import jax

from hart_jax.convert.diffusion_head import diffusion_head_rules, timestep_embedder_rules
from hart_jax.convert.table import Rule, apply_table, dense_rules, norm_rules
from hart_jax.convert.torch_io import find_weight_file, load_state_dict, read_json
from hart_jax.errors import CheckpointError, ConversionError
from hart_jax.models.transformer import (
    HARTTransformer,
    T2IConfig,
    abstract_params,
    init_inputs,
    stack_blocks,
    unstack_blocks,
)

log = logging.getLogger(__name__)

KIND = "transformer"
IGNORE = (r"lvl_1L\Z", r"attn_bias_for_masking\Z", r".*\.zero_k_bias\Z", r".*inv_freq\Z")
EMA_FILE = "ema_model.bin"


def llm_rules() -> list[Rule]:
    """The full PyTorch -> Flax table of the transformer (all variants), block ``i`` onto the
    per-block view ``blocks_{i}`` (row ``i`` of the stacked ``blocks``)."""
    b = "blocks.{i}"
    f = "blocks_{i}"
    return (
        dense_rules("context_embed", "context_embed")
        + norm_rules("context_norm", "context_norm", bias=False)
        + dense_rules("word_embed", "word_embed")
        + timestep_embedder_rules("lvl_embed", "lvl_embed")
        + [
            Rule("lvl_embed.weight", "lvl_embed/embedding"),
            Rule("class_emb.weight", "class_emb/embedding"),
            Rule("pos_start", "pos_start"),
        ]
        + norm_rules(f"{b}.ln_wo_grad", f"{f}/ln_wo_grad", bias=False)
        + dense_rules(f"{b}.attn.qkv_proj", f"{f}/attn/qkv_proj", bias=False)
        + [
            Rule(f"{b}.attn.q_bias", f"{f}/attn/q_bias"),
            Rule(f"{b}.attn.v_bias", f"{f}/attn/v_bias"),
            Rule(f"{b}.attn.scale_mul_1H11", f"{f}/attn/scale_mul_1H11"),
            Rule(f"{b}.scale_shift_table", f"{f}/scale_shift_table"),
        ]
        + dense_rules(f"{b}.attn.proj", f"{f}/attn/proj")
        + dense_rules(f"{b}.ffn.gate_proj", f"{f}/ffn/gate_proj", bias=False)
        + dense_rules(f"{b}.ffn.up_proj", f"{f}/ffn/up_proj", bias=False)
        + dense_rules(f"{b}.ffn.down_proj", f"{f}/ffn/down_proj", bias=False)
        + dense_rules(f"{b}.ada_lin.1", f"{f}/ada_lin")
        + norm_rules("head_nm.ln_wo_grad", "head_nm/ln_wo_grad", bias=False)
        + dense_rules("head_nm.ada_lin.1", "head_nm/ada_lin")
        + dense_rules("head", "head")
        + norm_rules("decoder_norm", "decoder_norm", bias=False)
        + diffusion_head_rules("diffloss.net", "diffloss/net")
    )


def check_variant_flags(state: Mapping[str, Any], cfg: T2IConfig, source: str) -> None:
    """Cross-check config flags against the keys present; name every disagreement."""
    keys = set(state)
    has = lambda k: k in keys
    found = {
        "use_timestep_embed": has("lvl_embed.mlp.0.weight"),
        "use_context_norm": has("context_norm.weight"),
        "disable_aln": not has("blocks.0.ada_lin.1.weight"),
        "attn_l2_norm": has("blocks.0.attn.scale_mul_1H11"),
        "shared_aln": has("blocks.0.scale_shift_table"),
    }
    if cfg.is_c2i:
        found.pop("use_context_norm")
    bad = [
        f"config says {k}={getattr(cfg, k)} but the weights say {v}"
        for k, v in found.items()
        if getattr(cfg, k) != v and not (k == "shared_aln" and not cfg.disable_aln)
    ]
    depth = 1 + max((int(k.split(".")[1]) for k in keys if k.startswith("blocks.")), default=-1)
    if depth != cfg.depth:
        bad.append(f"config says depth={cfg.depth} but the weights have {depth} blocks")
    if bad:
        raise ConversionError.from_report(source, [("config/weights disagreement", bad)])


def load_llm_config(
    src_dir: str | os.PathLike, state: Mapping[str, Any] | None = None, **overrides: Any
) -> T2IConfig:
    """``T2IConfig`` from ``<src_dir>/config.json`` plus V / Cv from the tokenizer config
    (``vae_path`` or ``../tokenizer``) or, failing that, from the weights."""
    src = Path(src_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    cfg_path = src / "config.json"
    d = read_json(cfg_path)
    vocab = z = None
    tok_dir = Path(d["vae_path"]) if d.get("vae_path") else src.absolute().parent / "tokenizer"
    if (tok_dir / "config.json").is_file():
        tok = read_json(tok_dir / "config.json")
        vocab, z = tok.get("vocab_size"), tok.get("z_channels")
    if state is not None and "head.weight" in state and "word_embed.weight" in state:
        wv, wz = state["head.weight"].shape[0], state["word_embed.weight"].shape[1]
        if vocab is not None and (vocab, z) != (wv, wz):
            raise CheckpointError(
                f"{tok_dir / 'config.json'}: vocab_size={vocab}, z_channels={z} but the transformer "
                f"weights have head [{wv}, ...] and word_embed [..., {wz}]"
            )
        vocab, z = wv, wz
    if vocab is None:
        raise CheckpointError(f"{src}: cannot tell vocab_size/z_channels (no {tok_dir}/config.json and no weights)")
    try:
        return T2IConfig.from_hf_dict(d, vocab_size=int(vocab), z_channels=int(z), source=str(cfg_path), **overrides)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def pick_llm_weights(src_dir: str | os.PathLike, use_ema: bool = True) -> Path:
    """``ema_model.bin`` (default) or the model weights; warns when EMA is absent."""
    src = Path(src_dir)
    if use_ema:
        if (src / EMA_FILE).is_file():
            return src / EMA_FILE
        log.warning("%s: no %s; converting the non-EMA weights", src, EMA_FILE)
    return find_weight_file(src, ("model.safetensors", "pytorch_model.bin"))


def convert_llm_state(
    state: Mapping[str, Any], cfg: T2IConfig, *, source: str = "llm", shapes_only: bool = False
) -> dict[str, Any]:
    """Map a ``HARTForT2I`` state dict onto the Flax params of ``cfg`` (blocks stacked)."""
    check_variant_flags(state, cfg, source)
    per_block = apply_table(
        state, llm_rules(), unstack_blocks(abstract_params(cfg)), ignore=IGNORE, source=source,
        shapes_only=shapes_only,
    )
    return stack_blocks(per_block, cfg.depth)


def convert_llm(
    src_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    use_ema: bool = True,
    **overrides: Any,
) -> tuple[T2IConfig, dict[str, Any]]:
    """Read a release ``llm/`` directory; return ``(config, {"params": ...})``."""
    if not Path(src_dir).is_dir():
        raise CheckpointError(f"{src_dir}: not a directory")
    wfile = Path(weights) if weights else pick_llm_weights(src_dir, use_ema)
    state = load_state_dict(wfile)
    cfg = load_llm_config(src_dir, state, **overrides)
    return cfg, {"params": convert_llm_state(state, cfg, source=str(wfile))}


def save_llm(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    use_ema: bool = True,
    force: bool = False,
) -> Path:
    """Convert ``src_dir``, check the result runs, write it atomically to ``out_dir``."""
    import numpy as np

    from hart_jax.checkpoint import check_output, load_converted, save_converted

    check_output(out_dir, force)
    cfg, variables = convert_llm(src_dir, weights, use_ema=use_ema)
    model = HARTTransformer(cfg)
    logits, _ = jax.jit(model.apply)(variables, *init_inputs(cfg))
    if not np.isfinite(np.asarray(logits)).all():
        raise CheckpointError(f"{src_dir}: converted transformer produced non-finite logits")
    out = save_converted(
        out_dir, variables, cfg.to_hf_dict(), kind=KIND, source=str(Path(src_dir).absolute()), force=force
    )
    load_converted(out, kind=KIND)
    return out
