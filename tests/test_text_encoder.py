"""Qwen2 text encoder: parity with transformers' PyTorch Qwen2Model, converter, shapes, errors.

The reference models are tiny random transformers models built here (every
parameter overwritten with seeded random values so zero biases / unit norms hide
no conversion mistake), saved with ``save_pretrained``, converted and compared.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from safetensors.torch import save_file

from hart_jax.checkpoint import count_params
from hart_jax.convert.qwen2 import (
    convert_qwen2,
    convert_qwen2_state,
    expected_qwen2_params,
    load_qwen2_config,
)
from hart_jax.convert.table import flatten_params
from hart_jax.errors import CheckpointError, ConversionError
from hart_jax.models.text_encoder import Qwen2Config, Qwen2Model
from hart_jax.train.sharding import DEFAULT_RULES, logical_axes, make_mesh, tree_shardings

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
)
THETA = 5000.0  # not a default, so a config reader that ignores it fails parity


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Matrices ~ N(0, 1/fan_in), norm scales 1 + 0.1 N, biases 0.05 N (seeded, in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r / p.shape[-1] ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.05 * r)
    return model.eval()


def hf_qwen2(seed: int = 0, **overrides):
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2Model as HFQwen2Model

    cfg = HFQwen2Config(**{**TINY, "rope_theta": THETA, **overrides})
    return randomize_(HFQwen2Model(cfg), seed)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A saved tiny Qwen2Model and the live torch model."""
    model = hf_qwen2()
    d = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def converted(qwen2_dir):
    return convert_qwen2(qwen2_dir[0])


def padded_batch(seed: int, batch: int, length: int, valid: list[tuple[int, int]], vocab: int = 97):
    """Random ids and a 0/1 mask whose row i is 1 on ``[start, stop)`` of ``valid[i]``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int64)
    mask = np.zeros((batch, length), np.int64)
    for i, (a, b) in enumerate(valid):
        mask[i, a:b] = 1
    return ids, mask


def torch_hidden(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


# ------------------------------------------------------------------- parity
def test_config_read_from_checkpoint(qwen2_dir, converted):
    cfg, _ = converted
    assert cfg.rope_theta == THETA
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert cfg.resolved_head_dim == 16 and cfg.rms_norm_eps == 1e-5
    assert count_params(converted[1]) == sum(p.numel() for p in qwen2_dir[1].parameters())


def test_parity_fp32_padding(qwen2_dir, converted):
    """Hidden states at every position (pads included) within 1e-4 for mixed padding."""
    _, model = qwen2_dir
    cfg, variables = converted
    length = 330  # like HART's prefix + 300 tokens: exercises RoPE far from 0
    valid = [(0, 330), (0, 123), (57, 330), (0, 1)]  # full, right pad, left pad, one token
    ids, mask = padded_batch(1, 4, length, valid)
    ref = torch_hidden(model, ids, mask)
    out = jax.jit(Qwen2Model(cfg).apply)(variables, jnp.asarray(ids), jnp.asarray(mask))
    assert out.shape == (4, length, 64) and out.dtype == jnp.float32
    assert_close(out, ref, "last_hidden_state")


def test_parity_position_ids_and_no_mask(qwen2_dir, converted):
    """Explicit position ids (shifted) and the default all-ones mask."""
    _, model = qwen2_dir
    cfg, variables = converted
    ids, _ = padded_batch(2, 2, 20, [])
    pos = np.broadcast_to(np.arange(20) + 7, (2, 20)).copy()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), position_ids=torch.from_numpy(pos)).last_hidden_state.numpy()
    out = jax.jit(Qwen2Model(cfg).apply)(variables, jnp.asarray(ids), None, jnp.asarray(pos))
    assert_close(out, ref, "shifted positions")


def test_bf16_close_to_fp32(qwen2_dir, converted):
    """bf16 params and compute: bf16 output within a few bf16 ulps of the fp32 reference."""
    _, model = qwen2_dir
    cfg, variables = converted
    ids, mask = padded_batch(3, 2, 48, [(0, 48), (0, 30)])
    ref = torch_hidden(model, ids, mask)
    bf16_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), variables)
    out = jax.jit(Qwen2Model(cfg, dtype=jnp.bfloat16).apply)(bf16_params, ids, mask)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert err < 0.05, err


def test_qwen2_vl_sharded_checkpoint(tmp_path):
    """A transformers Qwen2-VL model saved in shards: vision tower and lm_head skipped,
    language model at parity (M-RoPE equals 1-D RoPE for text)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {
        **TINY,
        "rope_parameters": {"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": THETA},
        "bos_token_id": None,
        "eos_token_id": None,
    }
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
    vl = randomize_(Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision)), 5)
    vl.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any(k.startswith("visual.") for k in index["weight_map"])

    cfg, variables = convert_qwen2(tmp_path)
    assert cfg.source_model_type == "qwen2_vl" and cfg.rope_theta == THETA
    assert count_params(variables) == sum(p.numel() for p in vl.model.language_model.parameters())
    ids, mask = padded_batch(6, 3, 40, [(0, 40), (0, 17), (9, 40)])
    ref = torch_hidden(vl.model.language_model, ids, mask)
    assert_close(jax.jit(Qwen2Model(cfg).apply)(variables, ids, mask), ref, "qwen2-vl language model")


@pytest.mark.parametrize("prefix", ["", "model.", "model.language_model.", "language_model.model."])
def test_key_prefixes(tmp_path, qwen2_dir, converted, prefix):
    """Every known key layout converts to the same params; vision / lm_head / rotary keys skipped."""
    src, model = qwen2_dir
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    outer = "model." if prefix.startswith("model.") else ""
    state[f"{outer}visual.blocks.0.attn.qkv.weight"] = torch.zeros(6, 2)
    state["lm_head.weight"] = torch.zeros(97, 64)
    state[f"{prefix}layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    _, variables = convert_qwen2(tmp_path)
    want = flatten_params(converted[1]["params"])
    got = flatten_params(variables["params"])
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --------------------------------------------------------------- full size
QWEN2_1P5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
)


def test_full_size_shapes():
    """transformers' 1.5B key set (meta device, no memory) maps onto ``jax.eval_shape`` of the model."""
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2Model as HFQwen2Model

    with torch.device("meta"):
        hf = HFQwen2Model(HFQwen2Config(**QWEN2_1P5B))
    state = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32) for k, v in hf.state_dict().items()}
    cfg = Qwen2Config()  # defaults are the 1.5B model
    assert cfg == Qwen2Config.from_hf_dict({**QWEN2_1P5B, "model_type": "qwen2"})
    expected = flatten_params(expected_qwen2_params(cfg))
    got = flatten_params(convert_qwen2_state(state, cfg, shapes_only=True))
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert tuple(got[k].shape) == tuple(v.shape), k
    assert len(got) == len(state) == 2 + 28 * 12
    n = sum(int(np.prod(v.shape)) for v in expected.values())
    assert n == sum(p.numel() for p in hf.parameters()) == 1_543_714_304
    assert expected["layers_0/self_attn/q_proj/kernel"].shape == (1536, 1536)
    assert expected["layers_27/self_attn/k_proj/kernel"].shape == (1536, 256)
    assert expected["layers_0/mlp/down_proj/kernel"].shape == (8960, 1536)
    assert expected["embed_tokens/embedding"].shape == (151936, 1536)


# ----------------------------------------------------------------- sharding
def test_sharded_run_matches_single_device():
    cfg = Qwen2Config(**{**TINY, "vocab_size": 128, "num_hidden_layers": 1})
    model = Qwen2Model(cfg)
    ids, mask = padded_batch(7, 4, 24, [(0, 24), (0, 10), (3, 24), (0, 24)], vocab=128)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), expected_qwen2_params(cfg)
    )
    ref = jax.jit(model.apply)({"params": params}, ids, mask)

    # training's sharding vocabulary: every Qwen2 parameter has its own logical axes
    want = {
        "embed_tokens/embedding": ("vocab", "embed"), "norm/scale": ("norm",),
        "layers_0/input_layernorm/scale": ("norm",), "layers_0/post_attention_layernorm/scale": ("norm",),
        "layers_0/self_attn/q_proj/kernel": ("embed", "heads"), "layers_0/self_attn/q_proj/bias": ("heads",),
        "layers_0/self_attn/k_proj/kernel": ("embed", "kv_heads"), "layers_0/self_attn/k_proj/bias": ("kv_heads",),
        "layers_0/self_attn/v_proj/kernel": ("embed", "kv_heads"), "layers_0/self_attn/v_proj/bias": ("kv_heads",),
        "layers_0/self_attn/o_proj/kernel": ("heads", "embed"),
        "layers_0/mlp/gate_proj/kernel": ("embed", "mlp"), "layers_0/mlp/up_proj/kernel": ("embed", "mlp"),
        "layers_0/mlp/down_proj/kernel": ("mlp", "embed"),
    }
    flat = flatten_params(params)
    assert {k: logical_axes(k, flat[k].ndim) for k in flat} == want
    mesh = make_mesh(2, 2, 2)
    sharded = jax.device_put(params, tree_shardings(params, mesh, DEFAULT_RULES))
    attn = sharded["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert attn["q_proj"]["kernel"].addressable_shards[0].data.shape == (32, 32)
    assert attn["k_proj"]["kernel"].addressable_shards[0].data.shape == (32, 16)  # 2 kv heads x 16 over tensor
    assert attn["k_proj"]["bias"].sharding.spec == jax.sharding.PartitionSpec("tensor")
    assert sharded["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = jax.jit(model.apply)({"params": sharded}, jax.device_put(ids, batch), jax.device_put(mask, batch))
    assert_close(out, ref, "sharded", atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ configs
def test_config_variants():
    base = {**TINY, "model_type": "qwen2"}
    assert Qwen2Config.from_hf_dict({**base, "rope_theta": 123.0}).rope_theta == 123.0  # transformers 4.x
    five = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 77.0}}
    assert Qwen2Config.from_hf_dict(five).rope_theta == 77.0  # transformers 5.x
    assert Qwen2Config.from_hf_dict(base).rope_theta == 10000.0  # transformers' qwen2 default
    flat_vl = {
        **TINY,
        "model_type": "qwen2_vl",
        "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {"depth": 32},
    }
    assert Qwen2Config.from_hf_dict(flat_vl).rope_theta == 1e6
    nested_vl = {"model_type": "qwen2_vl", "text_config": five, "vision_config": {}}
    want = dataclasses.replace(Qwen2Config.from_hf_dict(five), source_model_type="qwen2_vl")
    assert Qwen2Config.from_hf_dict(nested_vl) == want
    no_kv = {k: v for k, v in base.items() if k != "num_key_value_heads"}
    assert Qwen2Config.from_hf_dict(no_kv).num_key_value_heads == 4
    for cfg in (Qwen2Config.from_hf_dict(five), Qwen2Config.from_hf_dict(nested_vl)):
        assert Qwen2Config.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type='llama' is not a Qwen2"),
        ({"model_type": None}, "model_type=None"),
        ({"hidden_size": None}, "missing field"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_hidden_layers": 0}, "sizes must be positive: num_hidden_layers=0"),
    ],
)
def test_bad_configs(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "qwen2", **change}))
    with pytest.raises(CheckpointError, match=message) as e:
        load_qwen2_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


# ------------------------------------------------------------------- errors
def test_non_qwen2_checkpoint_refused(tmp_path, qwen2_dir):
    """A llama config next to otherwise fine weights is refused before any weight is read."""
    src, _ = qwen2_dir
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        convert_qwen2(tmp_path)


def test_missing_shard(tmp_path, qwen2_dir):
    _, model = qwen2_dir
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard\\(s\\) {shards[1]} .*model.safetensors.index.json"):
        convert_qwen2(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        convert_qwen2(tmp_path)


def test_shard_lacking_indexed_key(tmp_path, qwen2_dir):
    _, model = qwen2_dir
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.0.mlp.extra.weight"] = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="layers.0.mlp.extra.weight"):
        convert_qwen2(tmp_path)


def test_wrong_shape_missing_and_unexpected_keys(tmp_path, qwen2_dir):
    src, model = qwen2_dir
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)  # 3 kv heads instead of 2
    del state["norm.weight"]
    state["layers.0.self_attn.extra.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ConversionError) as e:
        convert_qwen2(tmp_path)
    msg = str(e.value)
    assert "wrong shape" in msg and "layers.1.self_attn.k_proj.weight: [48, 64]" in msg
    assert "model expects [64, 32]" in msg
    assert "missing" in msg and "norm/scale [64]" in msg
    assert "unexpected" in msg and "layers.0.self_attn.extra.weight" in msg
    assert set(e.value.problems) == {
        "missing (model parameter with no source key)",
        "unexpected (source key with no model parameter)",
        "wrong shape",
    }


def test_truncated_weights(tmp_path, qwen2_dir):
    src, _ = qwen2_dir
    data = (src / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        convert_qwen2(tmp_path)
