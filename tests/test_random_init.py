"""Initialisation without the full-length forward, independent of the attention
implementation, and random-weight pipelines for benchmarks (``hart_jax.random_init``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hart_jax.models.transformer import HARTTransformer, T2IConfig, abstract_params, init_inputs, init_variables
from hart_jax.random_init import preset_configs, prompt_draws, random_like, random_pipeline


def _variants(cfg: T2IConfig) -> dict[str, T2IConfig]:
    return {
        "t2i": cfg,
        "c2i": dataclasses.replace(cfg, context_token=0, num_classes=10, disable_aln=False),
        "adaln": dataclasses.replace(cfg, disable_aln=False),
        "shared_aln": dataclasses.replace(cfg, shared_aln=True),
        "l2_norm_embed": dataclasses.replace(cfg, attn_l2_norm=True, use_timestep_embed=False),
    }


def test_init_variables_equals_full_sequence_init():
    """Same parameter tree and the same values as ``init`` through the whole sequence."""
    cfg = preset_configs("tiny")[1]
    key = jax.random.PRNGKey(7)
    full = jax.jit(HARTTransformer(cfg).init)(key, *init_inputs(cfg))
    cheap = jax.jit(lambda k: init_variables(cfg, k))(key)
    full, cheap = (jax.tree_util.tree_flatten_with_path(v)[0] for v in (full, cheap))
    assert [p for p, _ in full] == [p for p, _ in cheap]
    for (path, a), (_, b) in zip(full, cheap):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", ["c2i", "adaln", "shared_aln", "l2_norm_embed"])
def test_init_variables_has_every_parameter(variant):
    """The other layouts: the same parameter tree (shapes, dtypes) as the full init."""
    cfg = _variants(preset_configs("tiny")[1])[variant]
    key = jax.random.PRNGKey(0)
    full = jax.eval_shape(lambda: HARTTransformer(cfg).init(key, *init_inputs(cfg)))
    assert jax.eval_shape(lambda: init_variables(cfg, key)) == full


@pytest.mark.parametrize("variant", ["t2i", "c2i"])
def test_init_does_not_depend_on_attention_impl(variant):
    """An inference-only choice never reaches initialisation: ``cudnn`` refuses fp32 inputs
    (and any CPU), yet the fp32 init traces; the model it builds is the ``xla`` one."""
    cfg = dataclasses.replace(_variants(preset_configs("tiny")[1])[variant], attention_impl="cudnn")
    with pytest.raises(ValueError, match="cudnn"):  # the path init must not take
        jax.eval_shape(lambda: HARTTransformer(cfg).init(jax.random.PRNGKey(0), *init_inputs(cfg)))
    shapes = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))
    assert shapes == jax.eval_shape(lambda: init_variables(dataclasses.replace(cfg, attention_impl="xla"),
                                                           jax.random.PRNGKey(0)))


def test_random_pipeline_with_cudnn_sets_up():
    """``bench/sample_bench.py --attention-impl cudnn`` used to fail in setup (fp32 init through
    the cudnn path); the pipeline keeps cudnn for inference."""
    pipe = random_pipeline(*preset_configs("tiny", attention_impl="cudnn"), jnp.float32, abstract=True)
    assert pipe.t2i_cfg.attention_impl == "cudnn"
    assert jax.tree_util.tree_structure(pipe.t2i_vars["params"]) == jax.tree_util.tree_structure(
        abstract_params(pipe.t2i_cfg))


def test_full_size_abstract_setup():
    """The 0.7B + Qwen2-1.5B pipeline as shapes (nothing allocated, nothing compiled): every
    weight abstract, the transformer the release's parameter count."""
    tok, t2i, q = preset_configs("full", 1024)
    pipe = random_pipeline(tok, t2i, q, jnp.bfloat16, abstract=True)
    leaves = jax.tree_util.tree_leaves((pipe.t2i_vars, pipe.tok_vars, pipe.text_params))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n_t2i = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(pipe.t2i_vars))
    assert n_t2i == 732_399_168  # the release's count with the diffusion head (configs/transformer.py)
    assert pipe.resolution == 1024


def test_random_like_values():
    shapes = {"dense": {"kernel": jax.ShapeDtypeStruct((64, 32), jnp.float32),
                        "bias": jax.ShapeDtypeStruct((32,), jnp.float32)},
              "norm": {"scale": jax.ShapeDtypeStruct((32,), jnp.bfloat16)},
              "emb": {"embedding": jax.ShapeDtypeStruct((100, 8), jnp.bfloat16)}}
    v = random_like(shapes, jax.random.PRNGKey(0), std=0.5)
    assert v["dense"]["kernel"].shape == (64, 32) and v["dense"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(v["dense"]["bias"], 0)
    np.testing.assert_array_equal(v["norm"]["scale"], 1)
    assert v["norm"]["scale"].dtype == jnp.bfloat16 and v["emb"]["embedding"].dtype == jnp.bfloat16
    k = np.asarray(v["dense"]["kernel"])
    assert abs(k.std() - 0.5) < 0.05 and abs(k.mean()) < 0.05
    e = np.asarray(v["emb"]["embedding"], np.float32)
    assert not np.allclose(e[:, :4].ravel()[:32], k.ravel()[:32], atol=1e-2)  # different slices of the draw


def test_prompt_draws_shapes():
    ids, attn, mask, pos = prompt_draws(3, 10, 50, prefix_len=4)
    assert ids.shape == (3, 14) and attn.shape == (3, 14) and mask.shape == (3, 10) and pos.shape == (3, 10)
    assert ids.max() < 50 and attn[:, :4].all()
    np.testing.assert_array_equal(attn[:, 4:], mask)
    assert (mask.sum(1) >= 4).all()
    np.testing.assert_array_equal(pos, np.cumsum(mask, 1) - 1)
