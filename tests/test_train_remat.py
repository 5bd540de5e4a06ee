"""The blocks as one scanned stack: rematerialisation policies against the unrolled form,
the release converter's per-block keys onto rows of the stack, and converted directories in
the per-block layout (written before the stack) loading stacked."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.train import get_config
from hart_jax.checkpoint import save_converted
from hart_jax.convert.llm import convert_llm, llm_rules
from hart_jax.errors import CheckpointError
from hart_jax.loading import load_transformer
from hart_jax.models.transformer import (
    HARTTransformer,
    init_inputs,
    init_variables,
    stack_blocks,
    unstack_blocks,
)
from hart_jax.train.loop import _model_config


@pytest.fixture(scope="module")
def tiny():
    """The tiny_t2i preset's model (fp32, xla attention), its variables and random inputs."""
    cfg = dataclasses.replace(_model_config(get_config("tiny_t2i")), attention_impl="xla")
    variables = init_variables(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ctx, x, pos, mask = init_inputs(cfg, 2)
    ctx = jnp.asarray(rng.standard_normal(ctx.shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    kept = jnp.asarray(np.sort(rng.permutation(cfg.patch_nums[-1] ** 2)[:2 * cfg.patch_nums[-1]]))
    kept = jnp.broadcast_to(kept, (2, kept.shape[0]))
    return cfg, variables, (ctx, x, pos, mask, kept)


def _loss_and_grads(cfg, params, inputs, **model_kw):
    model = HARTTransformer(cfg, **model_kw)

    def loss(p):
        logits, h, _ = model.apply({"params": p}, *inputs, method=HARTTransformer.teacher_forced)
        return jnp.mean(jnp.square(logits)) + jnp.mean(jnp.square(h))

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_match_the_unrolled_blocks(tiny):
    cfg, variables, inputs = tiny
    params = variables["params"]
    assert cfg.depth >= 2
    for leaf in jax.tree_util.tree_leaves(params["blocks"]):
        assert leaf.shape[0] == cfg.depth  # one stack, leading layer axis
    assert not any(k.startswith("blocks_") for k in params)
    ref_loss, ref_grads = _loss_and_grads(cfg, params, inputs, unroll_blocks=True)
    ref_flat = jax.tree_util.tree_leaves_with_path(ref_grads)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for _, g in jax.tree_util.tree_leaves_with_path(ref_grads["blocks"]))
    for remat in ("none", "dots", "full"):
        loss, grads = _loss_and_grads(cfg, params, inputs, remat=remat)
        np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5, err_msg=remat)
        for (path, g), (_, r) in zip(jax.tree_util.tree_leaves_with_path(grads), ref_flat):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"{remat} {jax.tree_util.keystr(path)}")
    with pytest.raises(ValueError, match="remat must be one of"):
        HARTTransformer(cfg, remat="some").init(jax.random.PRNGKey(0), method=HARTTransformer.init_all)


def test_release_block_keys_fill_rows_of_the_stack(golden_dir):
    """Every ``blocks.{i}.*`` tensor of the release fixture lands, transformed by its rule, in
    row i of the stacked parameter; the unstacked view round-trips."""
    cfg, variables = convert_llm(golden_dir / "llm")
    params = variables["params"]
    state = load_file(golden_dir / "llm" / "model.safetensors")
    rules = [(r, r.regex()) for r in llm_rules() if r.torch.startswith("blocks.{i}.")]
    checked = set()
    for key, value in state.items():
        for rule, rx in rules:
            m = rx.match(key)
            if m:
                break
        else:
            continue
        i = int(m["i"])
        node = params["blocks"]
        for part in rule.flax.split("/")[1:]:
            node = node[part]
        np.testing.assert_array_equal(np.asarray(node[i]), np.asarray(rule.transform(value)), err_msg=key)
        checked.add(i)
    assert checked == set(range(cfg.depth))
    flat = jax.tree_util.tree_leaves(stack_blocks(unstack_blocks(params), cfg.depth))
    for a, b in zip(flat, jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert set(unstack_blocks(params)) >= {f"blocks_{i}" for i in range(cfg.depth)}


def test_per_block_checkpoint_loads_stacked(tiny, tmp_path):
    cfg, variables, inputs = tiny
    host = jax.tree_util.tree_map(np.asarray, variables["params"])
    old = unstack_blocks(host)
    assert "blocks" not in old and "blocks_1" in old
    d = save_converted(tmp_path / "old", {"params": old}, cfg.to_hf_dict(), kind="transformer")
    config, loaded = load_transformer(d)
    assert config["depth"] == cfg.depth
    for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(loaded["params"]),
                                jax.tree_util.tree_leaves_with_path(host)):
        assert pa == pb
        np.testing.assert_array_equal(a, b)
    # a per-block directory with a hole is refused by name
    del old[f"blocks_{cfg.depth - 1}"]
    bad = save_converted(tmp_path / "bad", {"params": old}, cfg.to_hf_dict(), kind="transformer")
    with pytest.raises(CheckpointError, match=r"are not blocks_0\.\.blocks_"):
        load_transformer(bad)
