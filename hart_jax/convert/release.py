"""One-command conversion of a full release into the directory the pipeline loads.

    python -m hart_jax.convert release RELEASE_DIR QWEN_DIR OUT_DIR --prefix-from FILE [--force]

``RELEASE_DIR`` holds ``llm/`` and ``tokenizer/`` (``hart-0.7b-1024px``); ``QWEN_DIR`` the
Qwen2(-VL) text encoder with its tokenizer files; ``--prefix-from`` the original
``hart/utils/constants.py`` (or a text file) holding the instruction prefix, whose
SHA-256 is checked. Every input (directories, configs, weight files, tokenizer files,
prefix, text encoder width against the transformer's ``context_dim``) and the output
policy are checked before anything is converted. All three parts are written into one
temporary directory that replaces ``OUT_DIR`` only when everything succeeded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple

from hart_jax.checkpoint import atomic_directory, check_output
from hart_jax.convert import qwen2
from hart_jax.convert.llm import pick_llm_weights, save_llm
from hart_jax.convert.tokenizer import load_tokenizer_config, save_tokenizer
from hart_jax.convert.torch_io import find_weight_file, read_config
from hart_jax.errors import CheckpointError
from hart_jax.loading import write_pipeline_marker
from hart_jax.models.transformer import T2IConfig


class ReleaseInputs(NamedTuple):
    """The checked inputs of a release conversion."""

    tokenizer_weights: Path
    llm_weights: Path
    transformer: T2IConfig
    text_encoder: qwen2.TextEncoderInputs


def _release_parts(rel: Path) -> None:
    """``rel`` must hold the release layout ``llm/`` + ``tokenizer/``."""
    for part in ("llm", "tokenizer"):
        if not (rel / part).is_dir():
            raise CheckpointError(f"{rel}: missing {part}/ (expected the release layout llm/ + tokenizer/)")


def _transformer_config(llm_dir: Path, tokenizer_dir: Path) -> T2IConfig:
    """The transformer's config with the tokenizer's vocabulary (the weights are
    cross-checked when converted)."""
    tok = load_tokenizer_config(tokenizer_dir)
    from_dict = functools.partial(T2IConfig.from_hf_dict, vocab_size=tok.vocab_size, z_channels=tok.z_channels)
    return read_config(llm_dir / "config.json", from_dict)


def check_release_inputs(
    release_dir: str | os.PathLike,
    qwen_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prefix_source: str | os.PathLike | None = None,
    allow_prefix_mismatch: bool = False,
    use_ema: bool = True,
    force: bool = False,
) -> ReleaseInputs:
    """Check every input and the output policy of ``convert_release``; nothing is converted."""
    rel = Path(release_dir)
    _release_parts(rel)
    t2i = _transformer_config(rel / "llm", rel / "tokenizer")
    tok_weights = find_weight_file(rel / "tokenizer")
    text = qwen2.check_inputs(qwen_dir, prefix_source=prefix_source, allow_prefix_mismatch=allow_prefix_mismatch)
    if text.config.hidden_size != t2i.context_dim:
        raise CheckpointError(
            f"{qwen_dir}: text encoder width hidden_size={text.config.hidden_size} != the transformer's "
            f"context_dim={t2i.context_dim} ({rel / 'llm' / 'config.json'})"
        )
    check_output(out_dir, force)
    llm_weights = pick_llm_weights(rel / "llm", use_ema)  # last: it may warn that EMA weights are absent
    return ReleaseInputs(tok_weights, llm_weights, t2i, text)


def convert_release(
    release_dir: str | os.PathLike,
    qwen_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prefix_source: str | os.PathLike | None = None,
    allow_prefix_mismatch: bool = False,
    use_ema: bool = True,
    force: bool = False,
) -> Path:
    """Check every input, then convert tokenizer, transformer and text encoder into ``out_dir`` atomically."""
    rel = Path(release_dir)
    inputs = check_release_inputs(
        rel, qwen_dir, out_dir, prefix_source=prefix_source, allow_prefix_mismatch=allow_prefix_mismatch,
        use_ema=use_ema, force=force,
    )
    with atomic_directory(out_dir, force) as tmp:
        save_tokenizer(rel / "tokenizer", tmp / "tokenizer", weights=inputs.tokenizer_weights)
        save_llm(rel / "llm", tmp / "transformer", weights=inputs.llm_weights)
        qwen2.save_checked(
            qwen_dir, tmp / "text_encoder", inputs.text_encoder, max_length=inputs.transformer.context_token
        )
        write_pipeline_marker(
            tmp, {"release": str(rel.absolute()), "text_encoder": str(Path(qwen_dir).absolute())}
        )
    return Path(out_dir).absolute()
