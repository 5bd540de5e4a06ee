"""HART's prompt encoding: tokenise, prepend the instruction prefix, run Qwen2.

Dimensions: B prompts; L prompt tokens (``max_length``, 300 in HART); P prefix
tokens; D the encoder's hidden size (1536).

The procedure of the release (reference §3), reproduced exactly:

1. every prompt is tokenised on its own with ``padding="max_length"``,
   ``max_length=L``, ``truncation=True``; the padding (and truncation) side is
   whatever the tokenizer's own config says;
2. the instruction prefix is tokenised alone (``padding="longest"``, i.e. none,
   same truncation limit) and its ids are prepended to every row;
3. ``context_mask = ids != pad_token_id``, ``context_position_ids =
   cumsum(context_mask) - 1`` (over the prompt tokens only);
4. the encoder sees ``[prefix ids | prompt ids]`` with attention mask
   ``[ones | context_mask]`` (causal + key padding inside the encoder) and
   contiguous positions ``0 .. P+L-1``; pad positions get real hidden states,
   which HART consumes;
5. the context is the last hidden state (after the final norm) at the last L
   positions, as float32.

Without a prefix (``prefix=None``) the encoder sees the prompt ids alone with
``attention_mask = context_mask``. The tokenizer comes from a local directory
through ``transformers.AutoTokenizer`` (no hub access).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.errors import CheckpointError
from hart_jax.loading import DEFAULT_MAX_LENGTH, load_text_encoder
from hart_jax.models.text_encoder import Qwen2Config, Qwen2Model
from hart_jax.train.sharding import DEFAULT_RULES, check_mesh, spec_for, tree_shardings

Dtype = Any
PrecisionLike = Any


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> Any:
    """``transformers.AutoTokenizer`` from a local directory (never the hub); needs a pad token."""
    from transformers import AutoTokenizer

    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: tokenizer directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on the file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{d}: cannot load a tokenizer ({msg})") from None
    if tok.pad_token_id is None:
        raise CheckpointError(f"{d}: the tokenizer has no pad token (HART pads every prompt to max_length)")
    return tok


@dataclasses.dataclass(frozen=True, eq=False)
class PromptTokens:
    """Token ids of a batch of prompts, as the release builds them (numpy, host side)."""

    prefix_ids: np.ndarray  # [P] int32; empty without a prefix
    context_tokens: np.ndarray  # [B, L] int32
    context_mask: np.ndarray  # [B, L] bool, ids != pad id
    context_position_ids: np.ndarray  # [B, L] int32, cumsum(mask) - 1
    truncated: tuple[int, ...] = ()  # indices of prompts cut to L tokens

    def encoder_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """``([prefix | ids] [B, P+L] int32, [ones | mask] [B, P+L] bool)``."""
        b = self.context_tokens.shape[0]
        p = self.prefix_ids.shape[0]
        ids = np.concatenate([np.broadcast_to(self.prefix_ids, (b, p)), self.context_tokens], axis=1)
        mask = np.concatenate([np.ones((b, p), dtype=bool), self.context_mask], axis=1)
        return ids.astype(np.int32), mask


class PromptEncoding(NamedTuple):
    """What HART's transformer takes from the text side."""

    context: jax.Array  # [B, L, D] float32
    context_mask: jax.Array  # [B, L] bool
    context_position_ids: jax.Array  # [B, L] int32
    context_tokens: jax.Array  # [B, L] int32


def _ids(tokenizer: Any, text: str, **kw: Any) -> list[int]:
    return list(tokenizer(text, **kw)["input_ids"])


def tokenize_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    prefix: str | None = None,
) -> PromptTokens:
    """Tokenise ``prompts`` (and ``prefix``) exactly as the release; warn on truncation."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not a single string")
    if not prompts:
        raise ValueError("no prompts given")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token (HART pads every prompt to max_length)")
    rows, truncated = [], []
    for i, text in enumerate(prompts):
        ids = _ids(tokenizer, text, padding="max_length", max_length=max_length, truncation=True)
        if len(ids) != max_length:
            raise ValueError(f"prompt {i}: tokenizer returned {len(ids)} ids, expected {max_length}")
        n_full = len(_ids(tokenizer, text, truncation=False))
        if n_full > max_length:
            truncated.append(i)
            warnings.warn(
                f"prompt {i} has {n_full} tokens; truncated to {max_length} "
                f"({tokenizer.truncation_side} side): {text[:60]!r}...",
                stacklevel=2,
            )
        rows.append(ids)
    tokens = np.asarray(rows, dtype=np.int32)
    mask = tokens != pad
    positions = (np.cumsum(mask, axis=1) - 1).astype(np.int32)
    if prefix is None:
        prefix_ids = np.zeros((0,), np.int32)
    else:
        prefix_ids = np.asarray(
            _ids(tokenizer, prefix, padding="longest", max_length=max_length, truncation=True), np.int32
        )
        if len(_ids(tokenizer, prefix, truncation=False)) > max_length:
            warnings.warn(f"the prompt prefix is longer than {max_length} tokens and was truncated", stacklevel=2)
    return PromptTokens(prefix_ids, tokens, mask, positions, tuple(truncated))


def _cast_floats(tree: Any, dtype: Dtype) -> Any:
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


class PromptEncoder:
    """Prompts -> ``PromptEncoding`` with a converted Qwen2 and its tokenizer.

    ``tokenizer`` is a local directory or an already loaded tokenizer; ``params``
    the Flax params tree (``"params"`` collection) of ``config``; ``prefix`` the
    instruction prefix (``None``: no prefix). ``dtype`` is the compute dtype
    (float32 or bfloat16), ``param_dtype`` optionally casts the params once.
    With ``mesh`` (a ``hart_jax.train.sharding.make_mesh`` mesh) the params are placed by
    training's ``PARAM_LOGICAL_AXES`` under ``rules`` (default ``DEFAULT_RULES``) and the
    encoder runs under them, its batch split over the ``batch`` rule's axes that divide it.
    """

    def __init__(
        self,
        tokenizer: Any,
        params: Mapping[str, Any],
        config: Qwen2Config,
        prefix: str | None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype | None = None,
        precision: PrecisionLike = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
    ) -> None:
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.config = config
        self.prefix = prefix
        self.max_length = int(max_length)
        self.mesh = mesh
        self.rules = [tuple(r) for r in rules]
        if mesh is not None:
            check_mesh(mesh, self.rules, shard_params=False)
        self.model = Qwen2Model(config, dtype=dtype, precision=precision)
        params = dict(params)
        if param_dtype is not None:
            params = _cast_floats(params, param_dtype)
        if mesh is not None:
            params = jax.device_put(params, tree_shardings(params, mesh, self.rules))
        self.params = params
        n = self.max_length
        model = self.model

        def encode(params_: Any, ids_BS: jax.Array, mask_BS: jax.Array) -> jax.Array:
            hidden_BSD = model.apply({"params": params_}, ids_BS, mask_BS)
            return hidden_BSD[:, -n:].astype(jnp.float32)

        self._encode = jax.jit(encode)

    @classmethod
    def from_converted(
        cls, ckpt_dir: str | os.PathLike, *, use_prefix: bool = True, max_length: int | None = None, **kw: Any
    ) -> "PromptEncoder":
        """From a directory written by ``hart_jax.loading.save_text_encoder``."""
        cfg, params, prefix, settings = load_text_encoder(ckpt_dir)
        length = max_length if max_length is not None else int(settings.get("max_length", DEFAULT_MAX_LENGTH))
        return cls(ckpt_dir, params, cfg, prefix if use_prefix else None, max_length=length, **kw)

    def tokenize(self, prompts: Sequence[str]) -> PromptTokens:
        """The release's token ids, mask and position ids for ``prompts``."""
        return tokenize_prompts(self.tokenizer, prompts, max_length=self.max_length, prefix=self.prefix)

    def encode_tokens(self, tokens: PromptTokens) -> PromptEncoding:
        """Run the encoder on already tokenised prompts."""
        ids_BS, mask_BS = tokens.encoder_inputs()
        top = int(ids_BS.max())
        if top >= self.config.vocab_size:
            raise ValueError(f"token id {top} is outside the encoder's vocabulary ({self.config.vocab_size})")
        if ids_BS.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{ids_BS.shape[1]} tokens exceed max_position_embeddings={self.config.max_position_embeddings}"
            )
        if self.mesh is None:
            context = self._encode(self.params, jnp.asarray(ids_BS), jnp.asarray(mask_BS))
        else:
            spec = spec_for(("batch",), ids_BS.shape[:1], self.mesh, self.rules)
            sharding = jax.sharding.NamedSharding(self.mesh, spec)
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                context = self._encode(
                    self.params, jax.device_put(ids_BS, sharding), jax.device_put(mask_BS, sharding)
                )
        return PromptEncoding(
            context=context,
            context_mask=jnp.asarray(tokens.context_mask),
            context_position_ids=jnp.asarray(tokens.context_position_ids),
            context_tokens=jnp.asarray(tokens.context_tokens),
        )

    def __call__(self, prompts: Sequence[str]) -> PromptEncoding:
        """Tokenise and encode ``prompts``: context ``[B, L, D]`` fp32, mask, position ids."""
        return self.encode_tokens(self.tokenize(prompts))
