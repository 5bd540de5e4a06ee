"""Tokenizer converter: round trip, CLI, and every bad input named in the error."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hart_jax import checkpoint
from hart_jax.checkpoint import load_converted
from hart_jax.convert.__main__ import main as convert_main
from hart_jax.convert.table import flatten_params
from hart_jax.convert.tokenizer import convert_tokenizer, save_tokenizer
from hart_jax.errors import CheckpointError, ConversionError
from hart_jax.tokenizer import HybridTokenizer


@pytest.fixture()
def src(golden_dir, tmp_path):
    """A writable copy of the golden tokenizer directory."""
    d = tmp_path / "tokenizer"
    shutil.copytree(golden_dir / "tokenizer", d)
    return d


def _rewrite(src, fn):
    state = load_file(src / "model.safetensors")
    fn(state)
    save_file(state, src / "model.safetensors")


def test_cli_round_trip_loads_back_and_runs(src, tmp_path, capsys):
    out = tmp_path / "converted"
    assert convert_main(["tokenizer", str(src), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg_dict, params = load_converted(out, kind="tokenizer")
    cfg, ref = convert_tokenizer(src)
    a, b = flatten_params(params), flatten_params(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    tok = HybridTokenizer.from_converted(out)
    assert tok.config == cfg
    side = cfg.v_patch_nums[-1] * cfg.downsample  # the image size the fixture's tokenizer works at
    img = np.zeros((1, side, side, 3), np.float32)
    tokens = tok.encode(img)
    assert [t.shape for t in tokens.indices] == [(1, p * p) for p in cfg.v_patch_nums]
    assert tok.decode(tokens.indices, tokens.residual).shape == (1, side, side, 3)


def test_refuses_to_overwrite_without_force(src, tmp_path, capsys):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert convert_main(["tokenizer", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "precious"
    assert convert_main(["tokenizer", str(src), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "hart_jax.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_crash_during_write_leaves_nothing_that_looks_complete(src, tmp_path, monkeypatch):
    out = tmp_path / "converted"

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(checkpoint, "count_params", explode)  # called while writing the marker
    with pytest.raises(Boom):
        save_tokenizer(src, out)
    assert not out.exists()
    assert list(tmp_path.glob(".converted*")) == []


def test_existing_output_survives_a_failed_forced_rewrite(src, tmp_path, monkeypatch):
    out = tmp_path / "converted"
    save_tokenizer(src, out)
    before = (out / "hart_jax.json").read_text()
    monkeypatch.setattr(checkpoint, "count_params", lambda p: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError):
        save_tokenizer(src, out, force=True)
    assert (out / "hart_jax.json").read_text() == before


def test_every_missing_unexpected_and_misshaped_key_is_reported(src):
    def corrupt(state):
        del state["vae.encoder.conv_in.weight"]
        del state["vae.quantize.embedding.weight"]
        state["vae.encoder.extra_layer.weight"] = np.zeros((3,), np.float32)
        state["vae.decoder.conv_out.bias"] = np.zeros((5,), np.float32)

    _rewrite(src, corrupt)
    with pytest.raises(ConversionError) as e:
        convert_tokenizer(src)
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "encoder/conv_in/kernel" in msg and "quantize/embedding/embedding" in msg
    assert "vae.encoder.extra_layer.weight" in msg
    assert "vae.decoder.conv_out.bias: [5]" in msg and "model expects [3]" in msg
    assert len(e.value.problems["missing (model parameter with no source key)"]) == 2


def test_discriminator_and_buffers_are_dropped(src, golden_dir):
    cfg = json.loads((src / "config.json").read_text())
    scales, vocab = len(cfg["v_patch_nums"]), int(cfg["vocab_size"])

    def add(state):
        state["disc.main.0.weight"] = np.zeros((64, 3, 4, 4), np.float32)
        state["disc.main.3.running_mean"] = np.zeros((128,), np.float32)
        # the usage buffer, with a scale count other than this config's (the original replaces it)
        state["vae.quantize.ema_vocab_hit_SV"] = np.zeros((scales + 1, vocab), np.float32)

    _rewrite(src, add)
    _, params = convert_tokenizer(src)  # no error
    _, ref = convert_tokenizer(golden_dir / "tokenizer")
    assert flatten_params(params).keys() == flatten_params(ref).keys()


def test_truncated_safetensors_is_one_line_naming_the_file(src):
    p = src / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        convert_tokenizer(src)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_foreign_bin_file_is_named(src):
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        convert_tokenizer(src)
    assert "pytorch_model.bin" in str(e.value) and "\n" not in str(e.value)


def test_torch_bin_weights_are_read_with_the_same_result(src, golden_dir):
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, src / "pytorch_model.bin")
    _, params = convert_tokenizer(src)
    _, ref = convert_tokenizer(golden_dir / "tokenizer")
    a, b = flatten_params(params), flatten_params(ref)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bin_holding_a_non_state_dict_is_named(src):
    (src / "model.safetensors").unlink()
    torch.save([1, 2, 3], src / "weights.bin")
    with pytest.raises(CheckpointError, match="weights.bin.*state dict"):
        convert_tokenizer(src)


def test_missing_weights_and_wrong_config(src, tmp_path):
    (src / "model.safetensors").rename(src / "other.npz")
    with pytest.raises(CheckpointError, match="no weights found"):
        convert_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: model_type='llama' is not a HART tokenizer"):
        convert_tokenizer(src)
    (src / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        convert_tokenizer(src)
    with pytest.raises(CheckpointError, match="not a directory"):
        convert_tokenizer(tmp_path / "nope")


def test_loading_an_incomplete_directory_is_refused(src, tmp_path):
    out = tmp_path / "converted"
    save_tokenizer(src, out)
    (out / "hart_jax.json").unlink()
    with pytest.raises(CheckpointError, match="not a hart-jax checkpoint"):
        HybridTokenizer.from_converted(out)
