"""A small Qwen2-architecture text encoder for the built-in model, with its own BPE tokenizer.

The tokenizer is a byte-pair encoding fitted to the dataset's captions with the ``tokenizers``
library (whitespace pre-tokenisation, ``<pad>`` and ``<unk>`` specials, right padding), saved
as a ``transformers`` fast tokenizer so ``hart_jax.prompts.load_tokenizer`` reads it like
Qwen2's own. The encoder is ``hart_jax.models.text_encoder.Qwen2Model`` with random weights
drawn by the architecture's own initialiser (normal(0.02), unit norm scales) and kept frozen,
as the release keeps Qwen2 frozen: the captions have a closed vocabulary of a few dozen words
and no text corpus exists here to pretrain on, so the encoder's job is only to give each
word a distinct, fixed representation; the transformer's context embedding learns to read it.

The result is a converted text-encoder directory (``hart_jax.loading.save_text_encoder``
layout: params, config, tokenizer files, an empty instruction prefix, ``prompt.json``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.models.text_encoder import Qwen2Config, Qwen2Model

PAD, UNK = "<pad>", "<unk>"


def fit_bpe(captions: Iterable[str], vocab_size: int) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` whose BPE is fitted to ``captions``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[PAD, UNK], show_progress=False)
    tok.train_from_iterator(list(captions), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, padding_side="right", truncation_side="right"
    )


def random_params(cfg: Qwen2Config, seed: int) -> Any:
    """Fresh ``Qwen2Model`` params (the ``"params"`` collection) from the model's initialisers."""
    model = Qwen2Model(cfg)
    variables = model.init(jax.random.PRNGKey(int(seed)), jnp.zeros((1, 1), jnp.int32))
    return jax.tree_util.tree_map(np.asarray, variables["params"])


def build_text_encoder(
    out_dir: str | os.PathLike,
    captions: Iterable[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 96,
    max_length: int = 16,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Fit the BPE, draw the encoder and write a converted text-encoder directory."""
    from hart_jax.loading import save_text_encoder

    tokenizer = fit_bpe(captions, vocab_size)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        rope_theta=10000.0, max_position_embeddings=max(64, 4 * max_length),
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return save_text_encoder(
            out_dir, cfg, random_params(cfg, seed), prefix="", tokenizer_dir=tmp, max_length=max_length,
            source=f"hart_jax.builtin.text_encoder (BPE on captions, random frozen Qwen2, seed {seed})",
            force=force,
        )
