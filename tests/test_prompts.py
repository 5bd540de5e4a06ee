"""HART prompt encoding: token ids, masks, positions and context against the release's procedure.

The release's procedure is restated here in PyTorch (tokenise each prompt on its
own, pad to max_length, prepend the tokenised prefix, ``[ones | mask]``, take the
last L hidden states) and run with transformers' ``Qwen2Model`` on a tiny random
model and a tiny byte-level BPE tokenizer built in the test. Prefixes are the
test's own; the release's prefix is never used here.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close

from hart_jax.convert.qwen2 import convert_and_save, convert_qwen2, main, read_prompt_prefix
from hart_jax.errors import CheckpointError
from hart_jax.loading import PREFIX_FILE, RELEASE_PREFIX_SHA256
from hart_jax.prompts import PromptEncoder, load_tokenizer, tokenize_prompts
from hart_jax.train.sharding import make_mesh

L = 48  # prompt tokens (HART: 300)
PREFIX = 'Rewrite the "prompt" below in detail.\n\nUser Prompt:\n'
SENTENCES = [
    "a small fluffy white cat sleeping on a warm sunny windowsill",
    "a bustling city street at dusk with glowing street lamps",
    "a double-decker bus passing towering glass skyscrapers",
    "Rewrite the prompt below in detail. User Prompt: enhanced description",
]
PROMPTS = [
    "a cat sleeping",
    "a busy city street at dusk, glowing lamps and a crowd of people in colourful clothing",
    "",
    " ".join(SENTENCES * 2),  # longer than L: truncated
]
PAD = "<|endoftext|>"
VOCAB = 400


def build_tokenizer(path, padding_side: str):
    """A byte-level BPE (Qwen-like) trained on a few sentences, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, padding_side=padding_side)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    return {side: build_tokenizer(tmp_path_factory.mktemp(f"tok_{side}"), side) for side in ("right", "left")}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Tiny random transformers Qwen2Model saved (with a right-padding tokenizer) and converted."""
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2Model as HFQwen2Model

    cfg = HFQwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=3000.0,
        max_position_embeddings=256,
    )
    model = HFQwen2Model(cfg).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r / p.shape[-1] ** 0.5 if p.ndim >= 2 else (1 + 0.1 * r if name.endswith("weight") else 0.05 * r))
    d = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(d)
    build_tokenizer(d, "right")
    jcfg, variables = convert_qwen2(d)
    return d, model, jcfg, variables["params"]


# ------------------------------------------------------ the release, restated
def original_tokens(tokenizer, prompts, max_length, prefix):
    """Token ids / mask / positions / prefix ids built as the release builds them."""
    rows = [
        tokenizer(p, return_tensors="pt", padding="max_length", max_length=max_length, truncation=True).input_ids[0]
        for p in prompts
    ]
    tokens = torch.stack(rows)
    mask = tokens != tokenizer.pad_token_id
    positions = torch.cumsum(mask, dim=1) - 1
    prefix_ids = None
    if prefix is not None:
        prefix_ids = tokenizer(
            prefix, return_tensors="pt", padding="longest", max_length=max_length, truncation=True
        ).input_ids[0]
    return tokens, mask, positions, prefix_ids


def original_context(model, tokenizer, prompts, max_length, prefix):
    """The release's encoder call on transformers' Qwen2Model: last L hidden states, fp32."""
    tokens, mask, positions, prefix_ids = original_tokens(tokenizer, prompts, max_length, prefix)
    with torch.no_grad():
        if prefix_ids is None:
            hidden = model(tokens, attention_mask=mask).last_hidden_state
        else:
            b, p = tokens.shape[0], prefix_ids.shape[0]
            ids = torch.cat([prefix_ids[None].repeat(b, 1), tokens], dim=1)
            attn = torch.cat([torch.ones(b, p, dtype=torch.bool), mask], dim=1)
            hidden = model(ids, attention_mask=attn).last_hidden_state[:, p:]
    return hidden.float().numpy(), tokens.numpy(), mask.numpy(), positions.numpy()


# --------------------------------------------------------------- token ids
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_ids_identical_to_release(tokenizer_dirs, side):
    tok = load_tokenizer(tokenizer_dirs[side])
    assert tok.padding_side == side
    with pytest.warns(UserWarning, match="prompt 3 has 86 tokens; truncated to 48"):
        got = tokenize_prompts(tok, PROMPTS, max_length=L, prefix=PREFIX)
    tokens, mask, positions, prefix_ids = original_tokens(tok, PROMPTS, L, PREFIX)
    np.testing.assert_array_equal(got.context_tokens, tokens.numpy())
    np.testing.assert_array_equal(got.context_mask, mask.numpy())
    np.testing.assert_array_equal(got.context_position_ids, positions.numpy())
    np.testing.assert_array_equal(got.prefix_ids, prefix_ids.numpy())
    assert got.truncated == (3,)
    assert got.context_tokens.shape == (4, L) and got.context_mask.dtype == bool
    # Layout sanity: the empty prompt is all padding (positions all -1), the long one has none.
    assert not got.context_mask[2].any() and (got.context_position_ids[2] == -1).all()
    assert got.context_mask[3].all()
    short = got.context_mask[0]
    assert short[0 if side == "right" else -1] and not short[-1 if side == "right" else 0]
    ids, attn = got.encoder_inputs()
    p = len(prefix_ids)
    np.testing.assert_array_equal(ids[:, :p], np.broadcast_to(prefix_ids.numpy(), (4, p)))
    assert attn[:, :p].all() and (attn[:, p:] == got.context_mask).all()


def test_tokenize_rejects_bad_input(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["right"])
    with pytest.raises(TypeError, match="not a single string"):
        tokenize_prompts(tok, "a cat", max_length=L)
    with pytest.raises(ValueError, match="no prompts"):
        tokenize_prompts(tok, [], max_length=L)


def test_tokenizer_without_pad_refused(tmp_path, tokenizer_dirs):
    cfg = json.loads((tokenizer_dirs["right"] / "tokenizer_config.json").read_text())
    cfg.pop("pad_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_text((tokenizer_dirs["right"] / "tokenizer.json").read_text())
    with pytest.raises(CheckpointError, match="no pad token"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------ hidden states
@pytest.mark.parametrize("side, prefix", [("right", PREFIX), ("left", PREFIX), ("right", None), ("left", None)])
def test_context_matches_release(qwen, tokenizer_dirs, side, prefix):
    """Context at all L positions (pads included) within 1e-4; mask and positions exact."""
    _, model, cfg, params = qwen
    enc = PromptEncoder(tokenizer_dirs[side], params, cfg, prefix, max_length=L)
    with pytest.warns(UserWarning, match="truncated"):
        out = enc(PROMPTS)
    ref, tokens, mask, positions = original_context(model, enc.tokenizer, PROMPTS, L, prefix)
    assert out.context.shape == (4, L, 64) and out.context.dtype == jnp.float32
    assert out.context_mask.dtype == jnp.bool_
    assert_close(out.context, ref, f"context {side} {prefix is not None}")
    np.testing.assert_array_equal(out.context_tokens, tokens)
    np.testing.assert_array_equal(out.context_mask, mask)
    np.testing.assert_array_equal(out.context_position_ids, positions)


def test_bf16_and_sharded_encoder(qwen, tokenizer_dirs):
    """bf16 compute (context still fp32) stays near fp32; a mesh-sharded encoder matches."""
    _, _, cfg, params = qwen
    prompts = PROMPTS[:3] + ["a bus"]
    ref = PromptEncoder(tokenizer_dirs["right"], params, cfg, PREFIX, max_length=L)(prompts).context
    bf16 = PromptEncoder(
        tokenizer_dirs["right"], params, cfg, PREFIX, max_length=L, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
    )
    assert bf16.params["norm"]["scale"].dtype == jnp.bfloat16
    out = bf16(prompts).context
    assert out.dtype == jnp.float32
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert err < 0.05, err
    mesh = make_mesh(2, 1, 4)  # training's mesh and rules: MLP width over tensor, batch over data
    sharded = PromptEncoder(tokenizer_dirs["right"], params, cfg, PREFIX, max_length=L, mesh=mesh)
    assert sharded.params["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "tensor"
    )
    assert_close(sharded(prompts).context, ref, "sharded", atol=1e-5, rtol=1e-5)
    model_mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    with pytest.raises(ValueError, match=r"mesh axes \['model'\] are not named by the sharding rules"):
        PromptEncoder(tokenizer_dirs["right"], params, cfg, PREFIX, max_length=L, mesh=model_mesh)


def test_token_outside_vocabulary(qwen, tokenizer_dirs):
    _, _, cfg, params = qwen
    small = cfg.__class__(**{**cfg.__dict__, "vocab_size": 100})
    small_params = {**params, "embed_tokens": {"embedding": params["embed_tokens"]["embedding"][:100]}}
    enc = PromptEncoder(tokenizer_dirs["right"], small_params, small, None, max_length=L)
    with pytest.raises(ValueError, match="outside the encoder's vocabulary \\(100\\)"):
        enc(["a bustling city street"])


# --------------------------------------------------------- prefix handling
CONSTANTS_PY = '''
default_prompts = ["a cat", "a dog"]

llm_system_prompt = """Rewrite the "prompt" below in detail.

User Prompt:\\n"""

max_seq_len = 10240
'''


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_prefix_from_constants_py(tmp_path):
    """Parsed (not executed) from a module-level assignment; hash-checked."""
    f = tmp_path / "hart" / "utils" / "constants.py"
    f.parent.mkdir(parents=True)
    f.write_text(CONSTANTS_PY)
    assert read_prompt_prefix(f, expected_sha256=sha(PREFIX)) == PREFIX
    assert PREFIX.endswith("User Prompt:\n") and PREFIX.count("\n") == 3
    # The package (or repository) directory works as well.
    assert read_prompt_prefix(tmp_path, expected_sha256=sha(PREFIX)) == PREFIX
    with pytest.raises(CheckpointError, match=f"SHA-256 {sha(PREFIX)} does not match the release's"):
        read_prompt_prefix(f)
    assert read_prompt_prefix(f, allow_mismatch=True) == PREFIX


def test_prefix_from_text_file_is_exact(tmp_path):
    f = tmp_path / "prefix.txt"
    text = "Line one.\r\nLine two with ünïcode.\n"
    f.write_bytes(text.encode("utf-8"))
    assert read_prompt_prefix(f, expected_sha256=sha(text)) == text
    with pytest.raises(CheckpointError, match=str(f)):
        read_prompt_prefix(f, expected_sha256=RELEASE_PREFIX_SHA256)


@pytest.mark.parametrize(
    "source, message",
    [
        ("x = 1\n", "no module-level assignment to 'llm_system_prompt'"),
        ("llm_system_prompt = 'a' + 'b'\n", "not assigned a plain string literal"),
        ("def f():\n    llm_system_prompt = 'a'\n", "no module-level assignment"),
        ("llm_system_prompt = '''unterminated\n", "cannot parse as Python"),
    ],
)
def test_bad_prefix_sources(tmp_path, source, message):
    f = tmp_path / "constants.py"
    f.write_text(source)
    with pytest.raises(CheckpointError, match=message):
        read_prompt_prefix(f, allow_mismatch=True)
    with pytest.raises(CheckpointError, match="not found"):
        read_prompt_prefix(tmp_path / "nope.txt", allow_mismatch=True)


# ------------------------------------------------------- converted directory
def test_converted_directory_is_self_contained(tmp_path, qwen, tokenizer_dirs):
    src, _, cfg, params = qwen
    pfile = tmp_path / "prefix.txt"
    pfile.write_bytes(PREFIX.encode("utf-8"))
    out = tmp_path / "text_encoder"
    with pytest.raises(CheckpointError, match="does not match the release's"):
        convert_and_save(src, out, prefix_source=pfile)
    assert not out.exists()
    convert_and_save(src, out, prefix_source=pfile, allow_prefix_mismatch=True, max_length=L)
    assert (out / PREFIX_FILE).read_bytes() == PREFIX.encode("utf-8")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    settings = json.loads((out / "prompt.json").read_text())
    assert settings == {
        "prefix_file": PREFIX_FILE,
        "prefix_sha256": sha(PREFIX),
        "prefix_is_release": False,
        "max_length": L,
    }
    with pytest.raises(CheckpointError, match="already exists"):
        convert_and_save(src, out, prefix_source=pfile, allow_prefix_mismatch=True)

    loaded = PromptEncoder.from_converted(out)
    assert loaded.prefix == PREFIX and loaded.max_length == L and loaded.config == cfg
    direct = PromptEncoder(tokenizer_dirs["right"], params, cfg, PREFIX, max_length=L)
    prompts = PROMPTS[:3]
    np.testing.assert_array_equal(loaded(prompts).context, direct(prompts).context)

    (out / PREFIX_FILE).write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="differs from"):
        PromptEncoder.from_converted(out)


def test_conversion_needs_tokenizer_files(tmp_path, qwen):
    src, _, _, _ = qwen
    pfile = tmp_path / "prefix.txt"
    pfile.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        convert_and_save(src, tmp_path / "o", prefix_source=pfile, allow_prefix_mismatch=True, tokenizer_dir=empty)


def test_command_line(tmp_path, qwen, capsys):
    src, _, cfg, _ = qwen
    pfile = tmp_path / "prefix.txt"
    pfile.write_bytes(PREFIX.encode("utf-8"))
    out = tmp_path / "cli"
    assert main([str(src), str(out), "--prefix-from", str(pfile)]) == 2
    assert "does not match the release's" in capsys.readouterr().err
    assert main([str(src), str(out), "--prefix-from", str(pfile), "--allow-prefix-mismatch", "--max-length", "48"]) == 0
    loaded = PromptEncoder.from_converted(out)
    assert loaded.prefix == PREFIX and loaded.max_length == 48 and loaded.config == cfg
