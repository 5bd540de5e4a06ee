"""Converter for a Qwen2 / Qwen2-VL checkpoint directory (HART's text encoder).

Reads ``config.json`` and the weights: one ``model.safetensors`` /
``pytorch_model.bin``, or shards listed by ``model.safetensors.index.json`` /
``pytorch_model.bin.index.json``. Language-model keys may carry a prefix
(``model.`` as saved by ``Qwen2ForCausalLM`` and Qwen2-VL checkpoints,
``model.language_model.`` or ``language_model.model.`` as other transformers
versions hold them, or none as ``Qwen2Model`` saves them). Vision-tower keys
(``visual.*``), ``lm_head.*`` and rotary buffers are skipped.

``convert_and_save`` writes a self-contained converted directory through
``hart_jax.loading.save_text_encoder`` (which ``load_text_encoder`` beside it reads):
the Flax params and config, HART's prompt prefix (read here from the original
package's ``constants.py`` or a text file and checked against the release's
SHA-256), ``prompt.json`` and the tokenizer files of the source.

Command line::

    python -m hart_jax.convert qwen2 SRC_DIR OUT_DIR --prefix-from hart/utils/constants.py
    python -m hart_jax.convert.qwen2 SRC_DIR OUT_DIR ...   (the same)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from hart_jax.checkpoint import check_output, read_json
from hart_jax.convert.table import Rule, apply_table, dense_rules, norm_rules
from hart_jax.convert.torch_io import _to_numpy, find_weight_file, load_state_dict, read_config
from hart_jax.errors import CheckpointError, OneLineArgumentParser, run_command
from hart_jax.loading import (
    DEFAULT_MAX_LENGTH,
    RELEASE_PREFIX_SHA256,
    save_text_encoder,
    sha256_text,
    tokenizer_files,
)
from hart_jax.models.text_encoder import Qwen2Config, abstract_variables

PREFIX_VARIABLE = "llm_system_prompt"

# Where the language model sits in the state dicts we know, most specific first.
LM_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.", "")
IGNORE = (
    r"(model\.)?visual\.",
    r"(language_model\.)?lm_head\.",
    r"(.*\.)?rotary_emb\.inv_freq\Z",
)
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------- table
def qwen2_rules() -> list[Rule]:
    """The full PyTorch -> Flax table of ``Qwen2Model`` (keys without a prefix)."""
    layer_t, layer_f = "layers.{i}", "layers_{i}"
    return (
        [Rule("embed_tokens.weight", "embed_tokens/embedding")]
        + dense_rules(f"{layer_t}.self_attn.q_proj", f"{layer_f}/self_attn/q_proj")
        + dense_rules(f"{layer_t}.self_attn.k_proj", f"{layer_f}/self_attn/k_proj")
        + dense_rules(f"{layer_t}.self_attn.v_proj", f"{layer_f}/self_attn/v_proj")
        + dense_rules(f"{layer_t}.self_attn.o_proj", f"{layer_f}/self_attn/o_proj", bias=False)
        + dense_rules(f"{layer_t}.mlp.gate_proj", f"{layer_f}/mlp/gate_proj", bias=False)
        + dense_rules(f"{layer_t}.mlp.up_proj", f"{layer_f}/mlp/up_proj", bias=False)
        + dense_rules(f"{layer_t}.mlp.down_proj", f"{layer_f}/mlp/down_proj", bias=False)
        + norm_rules(f"{layer_t}.input_layernorm", f"{layer_f}/input_layernorm", bias=False)
        + norm_rules(f"{layer_t}.post_attention_layernorm", f"{layer_f}/post_attention_layernorm", bias=False)
        + norm_rules("norm", "norm", bias=False)
    )


def lm_prefix(keys: Sequence[str]) -> str:
    """The language-model prefix of a state dict: the first of ``LM_PREFIXES``
    under which ``embed_tokens.weight`` exists ("" if none does)."""
    keyset = set(keys)
    for p in LM_PREFIXES:
        if f"{p}embed_tokens.weight" in keyset:
            return p
    return ""


def strip_lm_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the language-model prefix from the keys that carry it (others kept)."""
    p = lm_prefix(list(state))
    if not p:
        return dict(state)
    return {(k[len(p):] if k.startswith(p) else k): v for k, v in state.items()}


def _skipped(key: str) -> bool:
    return any(re.match(p, key) for p in IGNORE)


def expected_qwen2_params(cfg: Qwen2Config) -> dict[str, Any]:
    """Shapes of the model's params for ``cfg`` via ``jax.eval_shape`` (nothing allocated)."""
    return dict(abstract_variables(cfg)["params"])


def convert_qwen2_state(
    state: Mapping[str, Any], cfg: Qwen2Config, *, source: str = "text encoder", shapes_only: bool = False
) -> dict[str, Any]:
    """Map a (prefixed or bare) Qwen2 / Qwen2-VL state dict onto the Flax params of ``cfg``."""
    stripped = strip_lm_prefix(state)
    # Vision/lm_head keys may keep an outer prefix the language model does not share.
    kept = {k: v for k, v in stripped.items() if not _skipped(k)}
    return apply_table(
        kept, qwen2_rules(), expected_qwen2_params(cfg), source=source, shapes_only=shapes_only
    )


# ------------------------------------------------------------------- loading
def load_qwen2_config(src_dir: str | os.PathLike) -> Qwen2Config:
    """``Qwen2Config`` from ``<src_dir>/config.json``; errors name the file."""
    return read_config(Path(src_dir) / "config.json", Qwen2Config.from_hf_dict)


def _load_safetensors_filtered(path: Path, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """Tensors of one ``.safetensors`` file whose key passes ``keep`` (others never read)."""
    try:
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if keep(k):
                    out[k] = _to_numpy(f.get_tensor(k))
        return out
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or foreign?): {e}") from None


def _load_file(path: Path, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return _load_safetensors_filtered(path, keep)
    return {k: v for k, v in load_state_dict(path).items() if keep(k)}


def _keep_key(key: str) -> bool:
    """False for keys we skip anyway (vision tower, LM head): they are never loaded."""
    for p in LM_PREFIXES:
        if p and key.startswith(p) and _skipped(key[len(p):]):
            return False
    return not _skipped(key)


def weight_files(src_dir: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of ``src_dir`` and, when sharded, the index's key -> file map.

    Every shard named by an index must exist; a missing one is a ``CheckpointError``
    naming it (and the index).
    """
    d = Path(src_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    for name in INDEX_FILES:
        idx = d / name
        if idx.is_file():
            wm = read_json(idx).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{idx}: no 'weight_map' object")
            files = sorted(set(wm.values()))
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{d}: missing shard(s) {', '.join(missing)} listed in {name} "
                    f"({len(files) - len(missing)} of {len(files)} present)"
                )
            return [d / f for f in files], dict(wm)
    shards = sorted(p.name for p in d.glob("*-of-*.safetensors"))
    if shards and not (d / "model.safetensors").is_file():
        raise CheckpointError(
            f"{d}: sharded weights ({', '.join(shards)}) but no {INDEX_FILES[0]}; the index is needed"
        )
    return [find_weight_file(d)], None


def load_qwen2_state(src_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All language-model tensors of ``src_dir`` (one file or every indexed shard) as numpy."""
    files, weight_map = weight_files(src_dir)
    state: dict[str, np.ndarray] = {}
    for f in files:
        part = _load_file(f, _keep_key)
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == f.name and _keep_key(k)}
            absent = sorted(listed - set(part))
            if absent:
                raise CheckpointError(
                    f"{f}: lacks {len(absent)} key(s) the index lists for it, e.g. {', '.join(absent[:5])}"
                )
        state.update(part)
    return state


def convert_qwen2(src_dir: str | os.PathLike) -> tuple[Qwen2Config, dict[str, Any]]:
    """Read a Qwen2 / Qwen2-VL checkpoint directory; return ``(config, {"params": ...})``."""
    cfg = load_qwen2_config(src_dir)
    state = load_qwen2_state(src_dir)
    params = convert_qwen2_state(state, cfg, source=str(Path(src_dir)))
    return cfg, {"params": params}


# ------------------------------------------------------------- prompt prefix
def _prefix_from_python(path: Path, variable: str = PREFIX_VARIABLE) -> str:
    """The string literal assigned to ``variable`` at module level (parsed, never executed)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse as Python ({e})") from None
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == variable for t in targets):
            found.append(value)
    if not found:
        raise CheckpointError(f"{path}: no module-level assignment to {variable!r}")
    value = found[-1]
    if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
        raise CheckpointError(f"{path}: {variable!r} is not assigned a plain string literal")
    return value.value


def _locate_original_constants() -> Path:
    """``hart/utils/constants.py`` of an installed original package (found, not imported)."""
    spec = importlib.util.find_spec("hart")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / "utils" / "constants.py"
        if p.is_file():
            return p
    raise CheckpointError(
        "no prompt prefix source given and no original 'hart' package with hart/utils/constants.py "
        "is installed; pass the original constants.py or a text file holding the prefix"
    )


def read_prompt_prefix(
    source: str | os.PathLike | None = None,
    *,
    expected_sha256: str = RELEASE_PREFIX_SHA256,
    allow_mismatch: bool = False,
) -> str:
    """HART's instruction prefix from the original source or a text file, hash-checked.

    ``source`` is the original ``constants.py`` (the ``llm_system_prompt``
    assignment is parsed with ``ast``), a directory holding the original package
    (``hart/utils/constants.py`` or ``utils/constants.py`` under it), or a UTF-8
    text file whose exact content is the prefix. ``None`` looks for an installed
    original ``hart`` package. A SHA-256 other than ``expected_sha256`` is a
    ``CheckpointError`` unless ``allow_mismatch``.
    """
    if source is None:
        path = _locate_original_constants()
    else:
        path = Path(source)
        if path.is_dir():
            for rel in ("hart/utils/constants.py", "utils/constants.py", "constants.py"):
                if (path / rel).is_file():
                    path = path / rel
                    break
            else:
                raise CheckpointError(f"{path}: directory holds no hart/utils/constants.py")
    if not path.is_file():
        raise CheckpointError(f"{path}: prompt prefix source not found")
    if path.suffix == ".py":
        text = _prefix_from_python(path)
    else:
        try:
            # newline="" keeps the file's line endings exactly.
            with open(path, encoding="utf-8", newline="") as fh:
                text = fh.read()
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: not UTF-8 text ({e})") from None
    digest = sha256_text(text)
    if digest != expected_sha256 and not allow_mismatch:
        raise CheckpointError(
            f"{path}: prompt prefix SHA-256 {digest} does not match the release's {expected_sha256} "
            f"({len(text)} characters read); pass allow_prefix_mismatch=True "
            "(--allow-prefix-mismatch) to use a different prefix on purpose"
        )
    return text


# ------------------------------------------------------------- convert + save
class TextEncoderInputs(NamedTuple):
    """The checked inputs of a text encoder conversion."""

    config: Qwen2Config
    prefix: str
    tokenizer_dir: Path


def check_inputs(
    src_dir: str | os.PathLike,
    *,
    prefix_source: str | os.PathLike | None = None,
    allow_prefix_mismatch: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
) -> TextEncoderInputs:
    """Check source directory, config, weight files, tokenizer files and prefix (hash)
    before the long conversion; every failure is a one-line ``CheckpointError``."""
    src = Path(src_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    cfg = load_qwen2_config(src)
    weight_files(src)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else src
    tokenizer_files(tok_dir)
    prefix = read_prompt_prefix(prefix_source, allow_mismatch=allow_prefix_mismatch)
    return TextEncoderInputs(cfg, prefix, tok_dir)


def save_checked(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    inputs: TextEncoderInputs,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    force: bool = False,
) -> Path:
    """Convert ``src_dir`` (inputs already checked by ``check_inputs``) and save it to ``out_dir``."""
    _, variables = convert_qwen2(src_dir)
    return save_text_encoder(
        out_dir,
        inputs.config,
        variables["params"],
        prefix=inputs.prefix,
        tokenizer_dir=inputs.tokenizer_dir,
        max_length=max_length,
        source=str(Path(src_dir).absolute()),
        force=force,
    )


def convert_and_save(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prefix_source: str | os.PathLike | None = None,
    allow_prefix_mismatch: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    force: bool = False,
) -> Path:
    """Check every input and the output, then convert ``src_dir`` and save to ``out_dir``."""
    inputs = check_inputs(
        src_dir, prefix_source=prefix_source, allow_prefix_mismatch=allow_prefix_mismatch, tokenizer_dir=tokenizer_dir
    )
    check_output(out_dir, force)
    return save_checked(src_dir, out_dir, inputs, max_length=max_length, force=force)


# ----------------------------------------------------------------------- CLI
def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The converter's arguments (``python -m hart_jax.convert qwen2`` and this module's CLI)."""
    ap.add_argument("src", help="Qwen2 / Qwen2-VL checkpoint directory (config.json, weights, tokenizer)")
    ap.add_argument("out", help="converted directory to write")
    ap.add_argument(
        "--prefix-from",
        default=None,
        help="original hart/utils/constants.py (or the package dir) or a text file with the prefix; "
        "default: an installed original 'hart' package",
    )
    ap.add_argument(
        "--allow-prefix-mismatch",
        action="store_true",
        help="accept a prefix whose SHA-256 differs from the release's",
    )
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer files (default: SRC)")
    ap.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="prompt tokens (HART: 300)")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")


def run(args: argparse.Namespace) -> Path:
    """Convert as the parsed ``add_arguments`` ask; return the output directory."""
    return convert_and_save(
        args.src,
        args.out,
        prefix_source=args.prefix_from,
        allow_prefix_mismatch=args.allow_prefix_mismatch,
        tokenizer_dir=args.tokenizer_dir,
        max_length=args.max_length,
        force=args.force,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Convert a Qwen2 / Qwen2-VL directory into a hart-jax text encoder directory
    (the same as ``python -m hart_jax.convert qwen2``); returns the exit status."""
    ap = OneLineArgumentParser(prog="python -m hart_jax.convert.qwen2", description=main.__doc__)
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run_command(lambda: f"wrote {run(args)}")


if __name__ == "__main__":
    sys.exit(main())
