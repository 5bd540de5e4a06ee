"""llm/ converter: CLI round trip, EMA preference, and every bad input named."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hart_jax.checkpoint import load_converted
from hart_jax.convert.__main__ import main as convert_main
from hart_jax.convert.llm import convert_llm, load_llm_config
from hart_jax.convert.table import flatten_params
from hart_jax.errors import CheckpointError, ConversionError


@pytest.fixture()
def release(golden_dir, tmp_path):
    """A writable copy of the release layout: llm/ and tokenizer/ side by side."""
    shutil.copytree(golden_dir / "llm", tmp_path / "llm")
    shutil.copytree(golden_dir / "tokenizer", tmp_path / "tokenizer")
    return tmp_path


def _state(release: Path) -> dict[str, np.ndarray]:
    """The llm/ weights of the release copy."""
    return load_file(release / "llm" / "model.safetensors")


def _tokenizer_config(release: Path) -> dict:
    """The release's tokenizer/config.json (vocabulary and latent width the transformer uses)."""
    return json.loads((release / "tokenizer" / "config.json").read_text())


def test_cli_round_trip(release, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_main(["llm", str(release / "llm"), str(out)]) == 0
    cfg_dict, params = load_converted(out, kind="transformer")
    tok = _tokenizer_config(release)
    assert cfg_dict["vocab_size"] == tok["vocab_size"] and cfg_dict["z_channels"] == tok["z_channels"]
    _, ref = convert_llm(release / "llm")
    a, b = flatten_params(params), flatten_params(ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert convert_main(["llm", str(release / "llm"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_ema_weights_are_the_default(release):
    state = _state(release)
    ema = {k: torch.from_numpy(v * 2 if v.dtype == np.float32 else v) for k, v in state.items()}
    torch.save(ema, release / "llm" / "ema_model.bin")
    _, p_ema = convert_llm(release / "llm")
    _, p_raw = convert_llm(release / "llm", use_ema=False)
    k = np.asarray(p_raw["params"]["head"]["kernel"])
    np.testing.assert_array_equal(np.asarray(p_ema["params"]["head"]["kernel"]), 2 * k)


def test_buffers_are_dropped_and_bad_keys_reported(release):
    state = _state(release)
    last = int(json.loads((release / "llm" / "config.json").read_text())["depth"]) - 1
    assert "attn_bias_for_masking" in state and "blocks.0.attn.zero_k_bias" in state  # present, ignored
    del state[f"blocks.{last}.ffn.up_proj.weight"]
    state["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    state["head.bias"] = np.zeros(5, np.float32)
    save_file(state, release / "llm" / "model.safetensors")
    with pytest.raises(ConversionError) as e:
        convert_llm(release / "llm")
    msg = str(e.value)
    assert f"blocks_{last}/ffn/up_proj/kernel" in msg and "blocks.0.attn.extra" in msg
    assert "head.bias: [5]" in msg


def test_config_flags_disagreeing_with_the_weights_are_named(release):
    cfg = json.loads((release / "llm" / "config.json").read_text())
    aln, depth = bool(cfg["disable_aln"]), int(cfg["depth"])
    cfg["disable_aln"] = not aln
    cfg["depth"] = depth + 1
    (release / "llm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError) as e:
        convert_llm(release / "llm")
    assert f"disable_aln={not aln} but the weights say {aln}" in str(e.value)
    assert f"depth={depth + 1} but the weights have {depth} blocks" in str(e.value)


def test_tokenizer_config_disagreeing_with_the_weights(release):
    cfg = _tokenizer_config(release)
    vocab = int(cfg["vocab_size"])
    cfg["vocab_size"] = 2 * vocab
    (release / "tokenizer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"vocab_size={2 * vocab}.*head \[{vocab}"):
        convert_llm(release / "llm")


def test_wrong_model_type_truncated_and_foreign_files(release):
    p = release / "llm" / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        convert_llm(release / "llm", use_ema=False)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    (release / "llm" / "ema_model.bin").write_text("garbage")
    with pytest.raises(CheckpointError, match="ema_model.bin: not a readable PyTorch checkpoint"):
        convert_llm(release / "llm")
    cfg = json.loads((release / "llm" / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (release / "llm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type='qwen2' is not a HART transformer"):
        load_llm_config(release / "llm")
