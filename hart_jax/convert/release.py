"""One-command conversion of a full release into the directory the pipeline loads.

    python -m hart_jax.convert release RELEASE_DIR QWEN_DIR OUT_DIR --prefix-from FILE [--force]

``RELEASE_DIR`` holds ``llm/`` and ``tokenizer/`` (``hart-0.7b-1024px``); ``QWEN_DIR`` the
Qwen2(-VL) text encoder with its tokenizer files; ``--prefix-from`` the original
``hart/utils/constants.py`` (or a text file) holding the instruction prefix, whose
SHA-256 is checked. All three parts are written into one temporary directory that
replaces ``OUT_DIR`` only when everything succeeded.
"""

from __future__ import annotations

import os
from pathlib import Path

from hart_jax.checkpoint import atomic_directory
from hart_jax.convert.llm import save_llm
from hart_jax.convert.torch_io import read_json
from hart_jax.convert.qwen2 import convert_and_save
from hart_jax.convert.tokenizer import save_tokenizer
from hart_jax.errors import CheckpointError
from hart_jax.pipeline import write_pipeline_marker


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
    """Convert tokenizer, transformer and text encoder into ``out_dir`` atomically."""
    rel = Path(release_dir)
    for part in ("llm", "tokenizer"):
        if not (rel / part).is_dir():
            raise CheckpointError(f"{rel}: missing {part}/ (expected the release layout llm/ + tokenizer/)")
    if not Path(qwen_dir).is_dir():
        raise CheckpointError(f"{qwen_dir}: text encoder directory not found")
    context_token = int(read_json(rel / "llm" / "config.json").get("context_token", 300))
    with atomic_directory(out_dir, force) as tmp:
        save_tokenizer(rel / "tokenizer", tmp / "tokenizer")
        save_llm(rel / "llm", tmp / "transformer", use_ema=use_ema)
        convert_and_save(
            qwen_dir, tmp / "text_encoder", prefix_source=prefix_source,
            allow_prefix_mismatch=allow_prefix_mismatch, max_length=context_token,
        )
        write_pipeline_marker(
            tmp, {"release": str(rel.absolute()), "text_encoder": str(Path(qwen_dir).absolute())}
        )
    return Path(out_dir).absolute()
