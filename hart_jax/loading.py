"""The parts of converted directories beyond params + config: their loaders and writers.

``hart_jax.checkpoint`` writes and reads the common layout (Orbax params, ``config.json``,
marker). This module holds what each part adds to it, so that runtime code (prompts,
pipeline, training) loads converted directories without importing the converters, and
the converters (``hart_jax.convert``) write through the same functions:

- text encoder (kind ``text_encoder``): ``prompt_prefix.txt`` (exact UTF-8 bytes),
  ``prompt.json`` (prefix hash, whether it is the release's, ``max_length``) and the
  tokenizer files; ``save_text_encoder`` / ``load_text_encoder``.
- discriminator of a tokenizer directory (``--keep-discriminator``): ``discriminator/``
  (Orbax ``{"params", "batch_stats"}``) and ``discriminator.json``;
  ``discriminator_extras`` / ``load_discriminator``.
- pipeline directory (kind ``pipeline``): the parts ``tokenizer/``, ``transformer/``,
  ``text_encoder/`` and its own marker; ``write_pipeline_marker``.
- transformer (kind ``transformer``): ``load_transformer`` stacks a directory written in the
  per-block layout (``blocks_0 .. blocks_{X-1}``, before the blocks were one stack) on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from hart_jax.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MARKER,
    load_converted,
    read_json,
    save_converted,
)
from hart_jax.errors import CheckpointError
from hart_jax.models.discriminator import DiscriminatorConfig
from hart_jax.models.text_encoder import Qwen2Config

# ------------------------------------------------------------------- transformer
TRANSFORMER_KIND = "transformer"


def load_transformer(ckpt_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config dict, {"params": ...})`` of a converted transformer directory, the blocks in
    the stacked layout ``blocks/... [X, ...]`` whichever layout the directory holds."""
    from hart_jax.models.transformer import stack_blocks

    d = Path(ckpt_dir)
    config, variables = load_converted(d, kind=TRANSFORMER_KIND)
    params = variables["params"] if "params" in variables else variables
    try:
        params = stack_blocks(params, config.get("depth"))
    except ValueError as e:
        raise CheckpointError(f"{d}: {e}") from None
    return config, {**variables, "params": params}


# ------------------------------------------------------------------ text encoder
TEXT_ENCODER_KIND = "text_encoder"
PREFIX_FILE = "prompt_prefix.txt"
PROMPT_FILE = "prompt.json"
# SHA-256 of the UTF-8 bytes of ``llm_system_prompt`` in hart/utils/constants.py (release e28a41f).
RELEASE_PREFIX_SHA256 = "424f7aa7b1119f8ed1e329140e5941dfe308183bea0af59041dad5527a9b8f20"
DEFAULT_MAX_LENGTH = 300
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def sha256_text(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 bytes of ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_files(tokenizer_dir: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer files present in ``tokenizer_dir`` (name -> bytes); errors if none."""
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    files = {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= set(files):
        raise CheckpointError(
            f"{d}: no tokenizer files (need tokenizer.json or vocab.json + merges.txt; "
            f"looked for {', '.join(TOKENIZER_FILES)})"
        )
    return files


def save_text_encoder(
    out_dir: str | os.PathLike,
    cfg: Qwen2Config,
    params: Mapping[str, Any],
    *,
    prefix: str,
    tokenizer_dir: str | os.PathLike,
    max_length: int = DEFAULT_MAX_LENGTH,
    source: str | None = None,
    force: bool = False,
) -> Path:
    """Write a self-contained converted text encoder directory; return its path.

    ``params`` is the Flax params tree (the ``"params"`` collection). The
    directory holds the params, ``config.json``, ``prompt_prefix.txt`` (exact
    UTF-8 bytes), ``prompt.json`` (prefix hash, whether it is the release's,
    ``max_length``) and the tokenizer files of ``tokenizer_dir``.
    """
    extra: dict[str, str | bytes] = dict(tokenizer_files(tokenizer_dir))
    digest = sha256_text(prefix)
    extra[PREFIX_FILE] = prefix.encode("utf-8")
    extra[PROMPT_FILE] = (
        json.dumps(
            {
                "prefix_file": PREFIX_FILE,
                "prefix_sha256": digest,
                "prefix_is_release": digest == RELEASE_PREFIX_SHA256,
                "max_length": int(max_length),
            },
            indent=2,
        )
        + "\n"
    )
    host = jax.tree_util.tree_map(np.asarray, dict(params))
    return save_converted(
        out_dir, host, cfg.to_hf_dict(), kind=TEXT_ENCODER_KIND, source=source, extra_files=extra, force=force
    )


def load_text_encoder(ckpt_dir: str | os.PathLike) -> tuple[Qwen2Config, dict[str, Any], str, dict[str, Any]]:
    """``(config, params, prefix, prompt settings)`` of a directory written by ``save_text_encoder``.

    The prefix file is checked against the hash recorded in ``prompt.json``.
    """
    d = Path(ckpt_dir)
    config, params = load_converted(d, kind=TEXT_ENCODER_KIND)
    cfg = Qwen2Config.from_hf_dict(config, source=str(d / "config.json"))
    settings = read_json(d / PROMPT_FILE)
    pfile = d / settings.get("prefix_file", PREFIX_FILE)
    if not pfile.is_file():
        raise CheckpointError(f"{pfile}: prompt prefix file missing")
    prefix = pfile.read_bytes().decode("utf-8")
    if sha256_text(prefix) != settings.get("prefix_sha256"):
        raise CheckpointError(
            f"{pfile}: SHA-256 {sha256_text(prefix)} differs from {settings.get('prefix_sha256')} "
            f"recorded in {d / PROMPT_FILE} (file changed after conversion?)"
        )
    return cfg, dict(params), prefix, settings


# ----------------------------------------------------------------- discriminator
DISCRIMINATOR_ITEM = "discriminator"
DISCRIMINATOR_CONFIG_FILE = "discriminator.json"


def discriminator_extras(cfg: DiscriminatorConfig, variables: Mapping[str, Any]) -> dict[str, Any]:
    """``save_converted`` keyword arguments that store the discriminator beside the params."""
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}
    text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    return {"extra_files": {DISCRIMINATOR_CONFIG_FILE: text}, "extra_trees": {DISCRIMINATOR_ITEM: tree}}


def has_discriminator(ckpt_dir: str | os.PathLike) -> bool:
    """Whether a converted tokenizer directory holds a discriminator."""
    d = Path(ckpt_dir)
    return (d / DISCRIMINATOR_ITEM).is_dir() and (d / DISCRIMINATOR_CONFIG_FILE).is_file()


def load_discriminator(ckpt_dir: str | os.PathLike) -> tuple[DiscriminatorConfig, dict[str, Any]] | None:
    """``(config, {"params", "batch_stats"})`` of a converted tokenizer directory, or ``None``."""
    import orbax.checkpoint as ocp

    d = Path(ckpt_dir)
    if not has_discriminator(d):
        return None
    try:
        cfg = DiscriminatorConfig.from_dict(json.loads((d / DISCRIMINATOR_CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / DISCRIMINATOR_CONFIG_FILE}: not a discriminator config ({e})") from None
    try:
        v = ocp.PyTreeCheckpointer().restore(str(d / DISCRIMINATOR_ITEM))
    except Exception as e:
        raise CheckpointError(f"{d / DISCRIMINATOR_ITEM}: cannot restore Orbax checkpoint: {e}") from None
    return cfg, {"params": v["params"], "batch_stats": v.get("batch_stats") or {}}


# ---------------------------------------------------------------------- pipeline
PIPELINE_KIND = "pipeline"
PIPELINE_PARTS = ("tokenizer", "transformer", "text_encoder")


def write_pipeline_marker(root: Path, sources: dict[str, str]) -> None:
    """The pipeline directory's own marker (written last)."""
    marker = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": PIPELINE_KIND, "parts": list(PIPELINE_PARTS),
        "sources": sources, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (root / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
