"""The text encoder inside the step (``data.context="prompt"``): the pipeline tokenises
captions as the release does, and the step's frozen Qwen2 gives ``PromptEncoder``'s context."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train import get_config
from hart_jax.data.pipeline import make_loader
from hart_jax.loading import save_text_encoder
from hart_jax.models.text_encoder import Qwen2Config, Qwen2Model
from hart_jax.prompts import PromptEncoder
from hart_jax.train import loop
from hart_jax.train.objective import prepare_batch
from tests import train_data
from tests.test_prompts import build_tokenizer

T = 6  # the tiny model's context_token
PREFIX = "Draw: "


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_tiny")
    tok = build_tokenizer(root / "tok", "right")
    cfg = Qwen2Config(vocab_size=400, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rope_theta=1000.0)
    params = Qwen2Model(cfg).init(jax.random.PRNGKey(3), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree_util.tree_map(lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(4), x.shape), params)
    return save_text_encoder(root / "enc", cfg, params, prefix=PREFIX, tokenizer_dir=tok, max_length=T)


def test_prompt_path_matches_prompt_encoder(encoder_dir, tmp_path):
    train_data.write(tmp_path, 8, kind="t2i", name="shapes", size=24)
    c = get_config("tiny_t2i")
    c.data.context = "prompt"
    c.text_encoder = str(encoder_dir)
    comp = loop.build(c, devices=jax.devices()[:1])
    assert comp.batch_keys() == ("image", "input_ids", "attention_mask", "context_mask", "context_position_ids")
    loader = make_loader({"name": "shapes", "data_dir": str(tmp_path), "context": "prompt", "shuffle": False},
                         kind="t2i", resolution=comp.resolution, global_batch=4, seed=0,
                         tokenizer=comp.text_tokenizer, prefix=comp.text_prefix, max_length=T)
    local = next(iter(loader))
    src = {int(r["id"]): r["caption"] for r in train_data.examples(8, size=24)}
    captions = [src[int(i)] for i in local["id"]]
    enc = PromptEncoder.from_converted(encoder_dir)
    tokens = enc.tokenize(captions)
    ids, mask = tokens.encoder_inputs()
    np.testing.assert_array_equal(local["input_ids"], ids)
    np.testing.assert_array_equal(local["attention_mask"], mask)
    np.testing.assert_array_equal(local["context_position_ids"], tokens.context_position_ids)
    ref = enc.encode_tokens(tokens)

    batch = comp.global_batch(local)
    prep = jax.jit(lambda b, fp: prepare_batch(b, comp.tcfg, comp.frozen, fp)["context"])(batch, comp.frozen_params)
    np.testing.assert_allclose(np.asarray(prep), np.asarray(ref.context), atol=1e-5, rtol=1e-5)
    assert prep.shape == (4, T, 24)


def test_prompt_path_needs_an_encoder():
    c = get_config("tiny_t2i")
    c.data.context = "prompt"
    with pytest.raises(ValueError, match="needs text_encoder"):
        loop.build(c, devices=jax.devices()[:1])
