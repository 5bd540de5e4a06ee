"""Pallas attention kernels vs their jnp references (interpret mode on CPU), CUDA lowering, dispatcher.

Lowering for the GPU without one: on JAX 0.10.2 with a CPU-only jaxlib,
``jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))`` (inside an abstract mesh
naming an A100 or an H100, which JAX >= 0.11 needs to pick the Triton target, and from which
``hart_jax.attention`` takes the tile table's row) runs the Pallas
-> Triton lowering (the kernel's Triton IR is serialised into the
``__gpu$xla.gpu.triton`` custom call), so Pallas lowering errors (non power-of-two
shapes, unsupported ops) fail here in CI. What it cannot catch is a failure
inside Triton's own compiler, which runs only on a GPU. cuDNN cannot be lowered
this way (``jax.nn.dot_product_attention`` asks for the cuDNN version at trace
time and raises "cuDNN is not detected").
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import pallas_interpret_mode
from hart_jax import attention as attn
from hart_jax.kernels.cache_attention import CacheAttentionConfig, cache_attention, padded_cache_length
from hart_jax.kernels import tile_table
from hart_jax.kernels.level_attention import (
    LevelAttentionConfig,
    fit_block,
    kv_bounds,
    level_attention,
    q_bounds,
    round_up,
)
from hart_jax.kernels.reference import cache_attention_reference, level_attention_reference, level_mask
from hart_jax.models.transformer import T2IConfig
from hart_jax.train.sharding import DEFAULT_RULES

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Small tiles so the short test sequences span several blocks in every kernel.
SMALL = LevelAttentionConfig(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
TRITON_CALL = "__gpu$xla.gpu.triton"


def hart_levels(context_tokens: int, patch_nums, last_kept: int | None = None) -> np.ndarray:
    """Training level ids (``T2IConfig.level_ids``): text 0, scale s (s >= 1) has pn_s**2 tokens
    of level s; the last scale keeps ``last_kept`` tokens (they keep their level)."""
    return T2IConfig(context_token=context_tokens, patch_nums=tuple(patch_nums)).level_ids(last_kept)


def fixture_layout(golden_dir: Path) -> tuple[np.ndarray, int, int, int]:
    """Level ids ``[B, L]``, head count, head dim of the fixture transformer (config + kept
    mask), and the teacher-forced sequence length the fixture recorded (``tf_block0_out``)."""
    cfg = json.loads((golden_dir / "llm" / "config.json").read_text())
    with np.load(golden_dir / "t2i_golden.npz") as g:
        kept, recorded_len = g["tf_last_kept"], g["tf_block0_out"].shape[1]
    rows = [hart_levels(cfg["context_token"], cfg["patch_nums"], int(k.sum())) for k in kept]
    return np.stack(rows), cfg["num_heads"], cfg["embed_dim"] // cfg["num_heads"], recorded_len


def rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def assert_tree_close(actual, expected, tol, names):
    for a, e, n in zip(actual, expected, names):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(e, np.float32), atol=tol, rtol=tol, err_msg=n
        )


def check_level_attention(q_lev, k_lev, B, Lq, Lk, H, D, dtype, config, seed=0):
    """Pallas (interpret) vs fp32 reference: output and dq, dk, dv for a random cotangent."""
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, do = rand(kq, (B, Lq, H, D), dtype), rand(kd, (B, Lq, H, D), dtype)
    k, v = rand(kk, (B, Lk, H, D), dtype), rand(kv, (B, Lk, H, D), dtype)
    scale = 0.25 / np.sqrt(D)

    def kernel(q, k, v):
        return level_attention(q, k, v, q_lev, k_lev, scale=scale, config=config, interpret=True)

    def ref(q, k, v):
        return level_attention_reference(q, k, v, q_lev, k_lev, scale)

    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(kernel, q, k, v)
        return (o, *vjp(do))

    @jax.jit
    def run_ref(q, k, v, do):
        o, vjp = jax.vjp(ref, q, k, v)
        return (o, *vjp(do))

    got = run(q, k, v, do)
    want = run_ref(*(x.astype(jnp.float32) for x in (q, k, v, do)))
    assert all(g.dtype == dtype for g in got)
    assert_tree_close(got, want, TOL[dtype], ["out", "dq", "dk", "dv"])
    return got, want


# ----------------------------------------------------------------------------- interpret mode


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_level_attention_text_and_three_scales(dtype):
    """L = 300 + 4 + 9 + 16 (HART's first levels): not a multiple of any block size."""
    lev = hart_levels(300, (1, 2, 3, 4))
    assert len(lev) == 329
    check_level_attention(lev, lev, 1, 329, 329, 2, 16, dtype, SMALL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_level_attention_fixture_layout(golden_dir, dtype):
    """The fixture model's full layout [text | scales 1..N-2 | kept tokens of the last scale],
    per-batch level ids, default tile sizes (the sequence is padded to whole blocks)."""
    lev_BL, H, D, recorded_len = fixture_layout(golden_dir)
    B, L = lev_BL.shape
    assert L == recorded_len  # the teacher-forced sequence the reference ran
    check_level_attention(lev_BL, lev_BL, B, L, L, H, D, dtype, None, seed=1)


def test_level_attention_dq_tiles_of_its_own():
    """The dq kernel with tiles other than the dk/dv kernel's (and a forward block the largest
    of all, so the padding follows it): same output and gradients as the reference."""
    lev = hart_levels(300, (1, 2, 3, 4))
    split = LevelAttentionConfig(block_q=64, block_k=16, block_q_bwd=16, block_k_bwd=32,
                                 block_q_dq=32, block_k_dq=16, num_warps_dq=8, num_stages_dq=3)
    assert split.dq_tiles() == (32, 16, 8, 3) and SMALL.dq_tiles() == (16, 32, 4, 2)
    check_level_attention(lev, lev, 1, 329, 329, 2, 16, jnp.float32, split, seed=6)


def test_level_attention_unsorted_levels_and_blind_queries():
    """Arbitrary per-batch level ids, Lq != Lk, a head dim that is padded (24 -> 32), and
    queries whose level is below every key's (they see nothing: zero output, zero grads)."""
    B, Lq, Lk, H, D = 2, 45, 77, 2, 24
    rng = np.random.default_rng(0)
    q_lev = rng.integers(0, 5, (B, Lq)).astype(np.int32)
    k_lev = rng.integers(1, 5, (B, Lk)).astype(np.int32)
    q_lev[:, :3] = 0  # blind rows
    got, want = check_level_attention(q_lev, k_lev, B, Lq, Lk, H, D, jnp.float32, SMALL, seed=2)
    assert np.all(np.asarray(got[0])[:, :3] == 0.0) and np.all(np.asarray(got[1])[:, :3] == 0.0)
    assert np.all(np.isfinite(np.asarray(got[2])))


def test_level_attention_at_lengths_that_are_whole_blocks():
    """No ragged block in any kernel (unmasked loads only, no tail loop): 64 tokens in 4 levels
    with SMALL's tiles. (The cache kernel's case: ``test_cache_attention_reads_stacked_layers``.)"""
    lev = np.repeat(np.arange(4, dtype=np.int32), 16)
    check_level_attention(lev, lev, 1, 64, 64, 1, 16, jnp.float32, SMALL, seed=7)


def test_block_tables_skip_exactly_the_masked_blocks():
    """Every block pair outside the kernels' loop ranges is fully masked and every pair in an
    unmasked range is fully visible with no row past the end (any level order); for HART's
    sorted layout the loops cover exactly the visible pairs, and every whole pair but those of
    the ragged last blocks is read unmasked."""
    bq, bk = 32, 16

    def block_visibility(q_lev, k_lev):
        """(some query sees some key, every query sees every key) per block pair, from the
        dense mask over the real rows; then "whole" as the forward / dq loops may read it
        (never a ragged key block) and as the dk/dv loop may (never a ragged query block)."""
        vis = np.asarray(level_mask(jnp.asarray(q_lev[None]), jnp.asarray(k_lev[None])))[0]
        Q, K = vis.shape
        nq, nk = -(-Q // bq), -(-K // bk)
        pad = np.zeros((nq * bq, nk * bk), bool)
        pad[:Q, :K] = vis
        real = np.zeros_like(pad)
        real[:Q, :K] = True
        blocks, real = pad.reshape(nq, bq, nk, bk), real.reshape(nq, bq, nk, bk)
        whole = (blocks | ~real).all(axis=(1, 3))
        fwd_whole, bwd_whole = whole.copy(), whole.copy()
        fwd_whole[:, K // bk:] = False
        bwd_whole[Q // bq:, :] = False
        return blocks.any(axis=(1, 3)), fwd_whole, bwd_whole

    rng = np.random.default_rng(3)
    sorted_lev = hart_levels(300, (1, 2, 3, 4))
    for lev, tight in [(sorted_lev, True), (rng.permutation(sorted_lev), False)]:
        vis, fwd_whole, bwd_whole = block_visibility(lev, lev)
        tables = lambda f: [np.asarray(t)[0] for t in jax.jit(f, static_argnums=(2, 3))(  # noqa: E731
            jnp.asarray(lev[None]), jnp.asarray(lev[None]), bq, bk)]
        full, hi = tables(kv_bounds)
        lo, flo = tables(q_bounds)
        nq, nk = vis.shape
        nq_whole = len(lev) // bq
        cols, rows = np.arange(nk)[None, :], np.arange(nq)[:, None]
        fwd_unmasked, fwd_masked = cols < full[:, None], (cols >= full[:, None]) & (cols < hi[:, None])
        bwd_unmasked = (rows >= flo[None, :]) & (rows < nq_whole)
        bwd_masked = ((rows >= lo[None, :]) & (rows < flo[None, :])) | ((rows == nq_whole) & (rows >= flo[None, :]))
        assert not np.any(fwd_unmasked & ~fwd_whole) and not np.any(bwd_unmasked & ~bwd_whole)
        assert not np.any(vis & ~(fwd_unmasked | fwd_masked)) and not np.any(vis & ~(bwd_unmasked | bwd_masked))
        if tight:
            np.testing.assert_array_equal(fwd_unmasked | fwd_masked, vis)
            np.testing.assert_array_equal(bwd_unmasked | bwd_masked, vis)
            np.testing.assert_array_equal(fwd_unmasked, fwd_whole)
            np.testing.assert_array_equal(bwd_unmasked, bwd_whole)
            assert full[-1] == len(lev) // bk  # the ragged last query block reads every whole key block unmasked
            assert hi[0] == -(-300 // bk) < nk  # text queries stop at the end of the text
            assert lo[-1] == 313 // bq  # the last key block (level 3) is read from the first level-3 query on
            assert full[0] == 300 // bk  # the text's whole key blocks are read unmasked


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_attention(dtype):
    """One scale's 9 queries against a 71-entry cache; per-batch valid lengths incl. 0 and a full
    cache, and a scalar length; values above the cache size are clamped."""
    B, Lq, Lm, H, D = 3, 9, 71, 2, 16
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(4), 3)
    q = rand(kq, (B, Lq, H, D), dtype)
    k_cache, v_cache = rand(kk, (B, Lm, H, D), dtype), rand(kv, (B, Lm, H, D), dtype)
    scale = 0.25 / np.sqrt(D)
    run = jax.jit(
        lambda q, kc, vc, n: cache_attention(
            q, kc, vc, n, scale=scale, config=CacheAttentionConfig(block_k=16), interpret=True
        )
    )
    run_ref = jax.jit(lambda q, kc, vc, n: cache_attention_reference(q, kc, vc, n, scale))
    f32 = [x.astype(jnp.float32) for x in (q, k_cache, v_cache)]
    for n in (jnp.array([19, 71, 0], jnp.int32), jnp.array([80, 5, 16], jnp.int32), jnp.array(35, jnp.int32)):
        got = run(q, k_cache, v_cache, n)
        want = run_ref(*f32, n)
        assert got.dtype == dtype
        assert_tree_close([got], [want], TOL[dtype], [f"valid_len={n}"])
    assert np.all(np.asarray(run(q, k_cache, v_cache, jnp.array([19, 71, 0], jnp.int32)))[2] == 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_attention_reads_stacked_layers(dtype):
    """The sampler's layout: every block's caches stacked [NL, B, Lm, H, D], the block index traced,
    read in place at an aligned (128) and a ragged (71) cache length; 16 queries, one whole query
    block (the ragged one: ``test_cache_attention``), so at Lm = 128 no load is masked but the
    last key block of row 0 (37 entries)."""
    NL, B, Lq, H, D = 3, 2, 16, 2, 16
    for Lm, n in ((128, jnp.array([37, 128], jnp.int32)), (71, jnp.array([71, 0], jnp.int32))):
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(Lm), 3)
        q = rand(kq, (B, Lq, H, D), dtype)
        k_all, v_all = rand(kk, (NL, B, Lm, H, D), dtype), rand(kv, (NL, B, Lm, H, D), dtype)
        run = jax.jit(
            lambda q, kc, vc, n, layer: cache_attention(
                q, kc, vc, n, scale=0.1, layer=layer, config=CacheAttentionConfig(block_k=16), interpret=True
            )
        )
        for layer in range(NL):
            got = run(q, k_all, v_all, n, jnp.int32(layer))
            f32 = [x.astype(jnp.float32) for x in (q, k_all[layer], v_all[layer])]
            want = cache_attention_reference(*f32, n, 0.1)
            assert got.dtype == dtype
            assert_tree_close([got], [want], TOL[dtype], [f"Lm={Lm} layer={layer}"])
        # an index past the stack reads the last block, as lax.dynamic_slice would
        np.testing.assert_array_equal(run(q, k_all, v_all, n, jnp.int32(7)), run(q, k_all, v_all, n, jnp.int32(2)))
    with pytest.raises(ValueError, match="stacked"):
        cache_attention(q, k_all[0], v_all[0], n, scale=0.1, layer=0, interpret=True)
    with pytest.raises(ValueError, match="layer must be an integer scalar"):
        cache_attention(q, k_all, v_all, n, scale=0.1, layer=jnp.zeros(2, jnp.int32), interpret=True)


def test_cache_attention_is_forward_only():
    q = jnp.ones((1, 4, 1, 16))
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(lambda q: cache_attention(q, q, q, 4, scale=0.1, interpret=True).sum())(q)


def test_padded_cache_length():
    assert padded_cache_length(9750) == 9856 and padded_cache_length(9856) == 9856


# ----------------------------------------------------------------------------- CUDA lowering


# Abstract GPUs to lower for: device kind (as jax.Device.device_kind spells it) and SM count.
TARGETS = {
    "A100": ("NVIDIA A100-SXM4-80GB", 108),
    "H100": ("NVIDIA H100 80GB HBM3", 132),
}
HART_1024_LEVELS = (300, (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))


def _target_gpu(target: str = "H100"):
    """Name the GPU to lower for: JAX >= 0.11 takes the Triton target from the (abstract)
    device (0.12: compute capability 8.0 for the A100, 9.0 for the H100) and refuses without
    one; 0.10.2 falls back to 9.0, the H100's, whatever the device. ``hart_jax.attention``
    reads the tile table's row for this device."""
    kind, cores = TARGETS[target]
    dev = jax.sharding.AbstractDevice(device_kind=kind, num_cores=cores, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=dev))


def _lower_cuda(f, *args, target: str = "H100") -> str:
    fn = f if hasattr(f, "trace") else jax.jit(f)
    with _target_gpu(target):
        return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_launches(text: str) -> list[dict]:
    """Each Triton call of lowered text: kernel name, launch parameters and grid (the call's
    backend config) and the tiles the kernel recorded in its metadata."""
    out = []
    for line in text.splitlines():
        if TRITON_CALL not in line:
            continue
        line = re.sub(r'ir = "[^"]*"', "", line)  # the serialised Triton IR
        ints = {k: int(re.search(rf"\b{k} = (\d+) : i32", line)[1]) for k in ("num_warps", "num_stages", "grid_x")}
        meta = json.loads(re.search(r'serialized_metadata = "([^"]*)"', line)[1].replace("\\22", '"'))
        out.append({"name": re.search(r'name = "([^"]*)"', line)[1], **ints,
                    "tiles": {k: int(v) for k, v in meta.items()}})
    return out


def expected_launch(name: str, tiles: dict, queries: int, keys: int) -> dict:
    """A kernel's launch for ``tiles`` (the table's) at a shape: blocks shrunk for short
    sequences as the kernels do, one program per block of queries (keys, dk/dv), the last
    one ragged (no padding)."""
    fitted = {**tiles, "block_q": fit_block(tiles["block_q"], queries), "block_k": fit_block(tiles["block_k"], keys)}
    per, n = (fitted["block_k"], keys) if name.endswith("dkv") else (fitted["block_q"], queries)
    return {"name": name, "num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"],
            "grid_x": -(-n // per), "tiles": fitted}


def copies_of(text: str, dims: str) -> list[str]:
    """Lines of lowered ``text`` that pad, slice or concatenate an array whose type starts with
    ``dims`` (e.g. ``"1x9750x24x64"``): the copies the kernels are meant to do without."""
    ops = ("stablehlo.pad", "stablehlo.slice", "stablehlo.concatenate", "dynamic_slice", "dynamic_update_slice")
    return [line.strip()[:200] for line in text.splitlines()
            if f"tensor<{dims}" in line and any(op in line for op in ops)]


def table_tiles(target: str) -> dict[str, dict[str, int]]:
    """Every kernel's tiles in the shipped tile table's row for ``target`` (which must have one)."""
    level, cache, row = tile_table.configs_for(TARGETS[target][0], "gpu")
    assert row is not None, f"the tile table has no row for {TARGETS[target][0]}"
    return {**tile_table.level_tiles(level), **tile_table.cache_tiles(cache)}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_level_attention_lowers_for_cuda(dtype, target):
    """Forward (1 kernel) and gradient (forward + dk/dv + dq kernels) at the 0.7B model's
    training shape: 24 heads x 64, L = 9750 with HART's 14-level layout, through the
    dispatcher with no config: each kernel launches with the tile table's row for the target."""
    lev = hart_levels(*HART_1024_LEVELS)
    L = len(lev)
    assert L == 9750
    x = jax.ShapeDtypeStruct((1, L, 24, 64), dtype)

    def f(q, k, v):
        return attn.attention(q, k, v, q_levels=lev, k_levels=lev, scale=0.25 / 8, impl="pallas", interpret=False)

    def g(q, k, v):
        return jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    tiles = table_tiles(target)
    want = {n: expected_launch(f"hart_level_attention_{n[6:]}", tiles[n], L, L)
            for n in ("level_fwd", "level_dkv", "level_dq")}
    fwd, grad = _lower_cuda(f, x, x, x, target=target), _lower_cuda(g, x, x, x, target=target)
    assert triton_launches(fwd) == [want["level_fwd"]]
    assert triton_launches(grad) == [want["level_fwd"], want["level_dkv"], want["level_dq"]]
    # the ragged last blocks are masked inside the kernels: q, k, v, o, do are not padded or sliced
    assert not copies_of(fwd, f"1x{L}x24x64") and not copies_of(grad, f"1x{L}x24x64")


def test_small_shapes_lower_for_cuda():
    """Head dims 16 and 24 (padded to 32), a 67-token sequence and the smallest tiles."""
    for D in (16, 24):
        x = jax.ShapeDtypeStruct((2, 67, 4, D), jnp.bfloat16)
        lev = jax.ShapeDtypeStruct((2, 67), jnp.int32)
        g = lambda q, k, v, lv: jax.grad(  # noqa: E731
            lambda q, k, v: level_attention(q, k, v, lv, lv, scale=0.1, config=SMALL).astype(jnp.float32).sum(),
            argnums=(0, 1, 2),
        )(q, k, v)
        assert _lower_cuda(g, x, x, x, lev).count(TRITON_CALL) == 3


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("Lq", [4, 4096])
def test_cache_attention_lowers_for_cuda(Lq, target):
    """Sampling stages of the 1024 px model: 2x2 scale and the last 64x64 scale, CFG batch,
    against a 9856-entry cache with per-row valid lengths, through the dispatcher with no
    config: the kernel launches with the tile table's row for the target (its long-stage
    tiles at 4096 queries)."""
    Lm = padded_cache_length(9750)
    q = jax.ShapeDtypeStruct((4, Lq, 24, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, Lm, 24, 64), jnp.bfloat16)
    n = jax.ShapeDtypeStruct((4,), jnp.int32)
    f = lambda q, kc, vc, n: attn.cache_attention(  # noqa: E731
        q, kc, vc, valid_len=n, scale=0.25 / 8, impl="pallas", interpret=False)
    text = _lower_cuda(f, q, cache, cache, n, target=target)
    tiles = table_tiles(target)["cache_long" if Lq >= CacheAttentionConfig().long_queries else "cache"]
    assert triton_launches(text) == [expected_launch("hart_cache_attention", tiles, Lq, Lm)]
    # the cache and the queries are passed to the kernel as they are: no padded copy of them
    assert not copies_of(text, f"4x{Lm}x24x64") and not copies_of(text, f"4x{Lq}x24x64")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_stacked_cache_attention_lowers_for_cuda_without_copying_the_cache(target):
    """The last stage of the 1024 px model, 4 prompts x CFG, reading block 12 of the 24 blocks'
    stacked caches (11.6 GB of bf16 K and V, so the kernel needs 64-bit offsets): one Triton call,
    with the tile table's tiles for the target, takes the stacks themselves, with no
    dynamic_slice, pad or copy of them."""
    Lm = padded_cache_length(9750)
    q = jax.ShapeDtypeStruct((8, 4096, 24, 64), jnp.bfloat16)
    stack = jax.ShapeDtypeStruct((24, 8, Lm, 24, 64), jnp.bfloat16)
    n = jax.ShapeDtypeStruct((8,), jnp.int32)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    f = lambda q, kc, vc, n, layer: attn.cache_attention(  # noqa: E731
        q, kc, vc, valid_len=n, scale=0.25 / 8, layer=layer, impl="pallas", interpret=False)
    text = _lower_cuda(f, q, stack, stack, n, layer, target=target)
    tiles = table_tiles(target)["cache_long"]  # 4096 queries: the long stages' tiles
    assert triton_launches(text) == [expected_launch("hart_cache_attention", tiles, 4096, Lm)]
    stack_type = "tensor<24x8x9856x24x64xbf16>"
    ops_on_stack = [
        line for line in text.splitlines()
        if stack_type in line and any(op in line for op in ("dynamic_slice", "stablehlo.pad", "stablehlo.slice", "copy"))
    ]
    assert not ops_on_stack, ops_on_stack
    call = next(line for line in text.splitlines() if TRITON_CALL in line)
    assert call.count(stack_type) == 2, call  # K and V go to the kernel whole


def test_sampler_lowers_for_cuda_reading_the_stacked_caches_in_place():
    """The whole sampling program (tiny preset, blocks in a fori_loop, attention_impl=pallas)
    lowers for CUDA with one cache-attention call per stage, and the stacked caches are never
    sliced: the kernel reads each block's rows itself."""
    from hart_jax.random_init import preset_configs, random_pipeline, token_inputs
    from hart_jax.sampling import SamplingConfig

    pipe = random_pipeline(*preset_configs("tiny", attention_impl="pallas"), jnp.float32, abstract=True)
    cfg = pipe.t2i_cfg
    fn = pipe.program(2, SamplingConfig(scan_layers=True))
    args = (pipe.t2i_vars, pipe.tok_vars, pipe.text_params, *token_inputs(pipe, 2), jnp.float32(4.5))
    text = _lower_cuda(fn, *args)
    assert text.count(TRITON_CALL) == len(cfg.patch_nums)
    stack_type = (
        f"tensor<{cfg.depth}x4x{padded_cache_length(cfg.seq_len)}x{cfg.num_heads}x{cfg.head_dim}xf32>"
    )
    assert stack_type in text
    sliced = [line for line in text.splitlines() if stack_type in line and "dynamic_slice" in line]
    assert not sliced, sliced


# ----------------------------------------------------------------------------- dispatcher


def test_resolve_impl_defaults_and_logs_once(caplog):
    attn._logged.clear()
    with caplog.at_level(logging.INFO, logger="hart_jax.attention"):
        assert attn.resolve_impl("auto", "cpu") == "xla"
        assert attn.resolve_impl(None, "cpu") == "xla"
        assert attn.resolve_impl("auto", "cpu") == "xla"
        assert attn.resolve_impl("auto", "gpu") == attn.FASTEST_MEASURED_GPU_IMPL
        assert attn.resolve_impl("cudnn", "gpu") == "cudnn"
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [  # None is "auto": logged once with it
        "attention_impl=xla (requested auto, backend cpu)",
        f"attention_impl={attn.FASTEST_MEASURED_GPU_IMPL} (requested auto, backend gpu)",
        "attention_impl=cudnn (requested cudnn, backend gpu)",
    ]
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attn.resolve_impl("flash", "gpu")


def test_dispatcher_impls_agree():
    """xla and pallas (interpret, via the global flag) through the dispatcher, both entry points."""
    lev = hart_levels(6, (1, 2, 3, 4))
    B, L, H, D = 2, len(lev), 2, 16
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q, k, v = (rand(kk, (B, L, H, D), jnp.float32) for kk in ks)
    want = level_attention_reference(q, k, v, lev, lev, 0.0625)
    with pallas_interpret_mode(True):
        for impl in ("xla", "pallas"):
            run = jax.jit(
                lambda q, k, v, impl=impl: attn.attention(
                    q, k, v, q_levels=lev, k_levels=lev, scale=0.0625, impl=impl
                )
            )
            got = run(q, k, v)
            assert_tree_close([got], [want], 1e-5, [impl])
        want_c = cache_attention_reference(q[:, :9], k, v, 19, 0.0625)
        k_all, v_all = jnp.stack([v, k, v]), jnp.stack([k, v, k])  # block 1 holds (k, v)
        for impl in ("xla", "pallas"):
            got = attn.cache_attention(q[:, :9], k, v, valid_len=19, scale=0.0625, impl=impl)
            assert_tree_close([got], [want_c], 1e-5, [f"cache {impl}"])
            stacked = jax.jit(
                lambda q, ka, va, layer, impl=impl: attn.cache_attention(
                    q, ka, va, valid_len=19, scale=0.0625, layer=layer, impl=impl
                )
            )
            assert_tree_close([stacked(q[:, :9], k_all, v_all, jnp.int32(1))], [want_c], 1e-5, [f"stacked {impl}"])
    assert attn.resolve_impl("auto") == "xla"  # this machine is a CPU
    # xla path in bf16: bf16 matmul operands, fp32 softmax
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = attn.attention(qb, kb, vb, q_levels=lev, k_levels=lev, scale=0.0625, impl="xla")
    assert got.dtype == jnp.bfloat16
    assert_tree_close([got], [want], 2e-2, ["xla bf16"])


def test_kernel_precision_follows_xla_rules():
    assert attn._kernel_precision(None) == jax.lax.Precision.HIGHEST  # conftest: highest
    with jax.default_matmul_precision("bfloat16"):
        assert attn._kernel_precision(None) == jax.lax.Precision.DEFAULT
    assert attn._kernel_precision(jax.lax.Precision.DEFAULT) == jax.lax.Precision.DEFAULT


def test_dispatcher_rejects_bad_inputs():
    q = jnp.zeros((1, 5, 2, 16), jnp.float32)
    lev = np.zeros(5, np.int32)
    with pytest.raises(ValueError, match="cudnn.*bfloat16"):
        attn.attention(q, q, q, q_levels=lev, k_levels=lev, scale=0.1, impl="cudnn")
    with pytest.raises(ValueError, match="q_levels must have shape"):
        attn.attention(q, q, q, q_levels=np.zeros(4, np.int32), k_levels=lev, scale=0.1, impl="xla")
    with pytest.raises(ValueError, match="integer level ids"):
        level_attention(q, q, q, lev.astype(np.float32), lev, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="share a dtype"):
        level_attention(q, q.astype(jnp.bfloat16), q, lev, lev, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="valid_len must be a scalar"):
        cache_attention(q, q, q, jnp.zeros(3, jnp.int32), scale=0.1, interpret=True)
    # every implementation checks shapes before using them, through the dispatcher too
    for impl in attn.IMPLS:
        with pytest.raises(ValueError, match=r"must be \[B, L, A, D\]"):
            attn.attention(q[0], q[0], q[0], q_levels=lev, k_levels=lev, scale=0.1, impl=impl)
        with pytest.raises(ValueError, match=r"must be \[B, L, A, D\]"):
            attn.cache_attention(q[0], q, q, valid_len=3, scale=0.1, impl=impl)
        with pytest.raises(ValueError, match="must be stacked"):
            attn.cache_attention(q, q, q, valid_len=3, scale=0.1, layer=0, impl=impl)
    with pytest.raises(ValueError, match="power of two"):
        LevelAttentionConfig(block_q=48)
    with pytest.raises(ValueError, match="scale must be positive"):
        level_attention(q, q, q, lev, lev, scale=0.0, interpret=True)
    with pytest.raises(ValueError, match="scale must be positive"):
        cache_attention(q, q, q, 3, scale=-0.1, interpret=True)
    with pytest.raises(ValueError, match="block_q_long must be a power of two"):
        CacheAttentionConfig(block_q_long=48)
    with pytest.raises(ValueError, match="block_k_long must divide"):
        CacheAttentionConfig(block_k_long=256)


# ----------------------------------------------------------------------------- sharding


def test_pallas_kernels_split_over_the_context_mesh():
    """Under a context mesh the kernels run per device under shard_map (XLA cannot partition a
    Triton call); the result equals the unsharded reference. The Flax rules in context split
    rows over data x fsdp and heads over tensor; with no rules in context training's
    DEFAULT_RULES do the same (one sharding vocabulary)."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    from hart_jax.train.sharding import make_mesh

    assert len(jax.devices()) == 8
    mesh = make_mesh(2, 2, 2)
    lev = hart_levels(6, (1, 2, 3, 4))
    B, L, H, D = 4, len(lev), 4, 16
    ks = jax.random.split(jax.random.PRNGKey(11), 4)
    q, k, v, do = (rand(kk, (B, L, H, D), jnp.float32) for kk in ks)
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    qs, ks_, vs = (jax.device_put(x, sh) for x in (q, k, v))
    f = lambda q, k, v: attn.attention(q, k, v, q_levels=lev, k_levels=lev, scale=0.0625, impl="pallas")  # noqa: E731
    fb = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](do))
    ref = lambda q, k, v: level_attention_reference(q, k, v, lev, lev, 0.0625)  # noqa: E731
    NL, Lm = 3, 128
    k_all, v_all = rand(ks[0], (NL, B, Lm, H, D), jnp.float32), rand(ks[1], (NL, B, Lm, H, D), jnp.float32)
    n = jnp.array([5, 40, 128, 77], jnp.int32)
    cf = jax.jit(lambda q, ka, va, layer: attn.cache_attention(
        q, ka, va, valid_len=n, scale=0.1, layer=layer, impl="pallas"))
    with pallas_interpret_mode(True):
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            assert attn.kernel_mesh_axes(B, H)[1:] == (("data", "fsdp"), ("tensor",))
            assert "shard_map" in str(jax.make_jaxpr(f)(qs, ks_, vs))
            out, grads = jax.jit(f)(qs, ks_, vs), fb(qs, ks_, vs)
        with jax.set_mesh(mesh):  # no rules in context: DEFAULT_RULES
            assert attn.kernel_mesh_axes(B, H)[1:] == (("data", "fsdp"), ("tensor",))
            assert attn.kernel_spec("NBLHD", B, H) == P(None, ("data", "fsdp"), None, "tensor", None)
            got_c = cf(q[:, :9], k_all, v_all, jnp.int32(1))
    assert attn.kernel_mesh_axes(B, H) is None  # no context mesh: the kernels run as they are
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    assert_tree_close([out], [ref(q, k, v)], 1e-5, ["fwd"])
    assert_tree_close(list(grads), list(jax.vjp(ref, q, k, v)[1](do)), 1e-5, ["dq", "dk", "dv"])
    want_c = cache_attention_reference(q[:, :9], k_all[1], v_all[1], n, 0.1)
    assert_tree_close([got_c], [want_c], 1e-5, ["stacked cache"])


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_kernels_lower_for_cuda_on_each_devices_rows_and_heads(axis_type):
    """The 0.7B training shape on an abstract 2 x 2 x 2 mesh of H100s: forward and both backward
    Triton calls see [8 / 4 rows, L, 24 / 2 heads, 64], not the global arrays; the sampler's
    stacked-cache call (no rules in context: training's DEFAULT_RULES) sees its rows and heads
    of the stack. Both kinds of mesh axes (``Explicit`` is what
    ``AbstractMesh`` / ``make_mesh`` give by default from JAX 0.12 on)."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), abstract_device=dev,
                                     axis_types=(getattr(jax.sharding.AxisType, axis_type),) * 3)
    lev = hart_levels(300, (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))
    x = jax.ShapeDtypeStruct(
        (8, 9750, 24, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    )
    f = lambda q, k, v: attn.attention(q, k, v, q_levels=lev, k_levels=lev, scale=0.03, impl="pallas")  # noqa: E731
    g = lambda q, k, v: jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)  # noqa: E731

    def triton_operands(text):
        calls = [line for line in text.splitlines() if TRITON_CALL in line]
        return [set(re.findall(r"tensor<(\d+)x\d+x(\d+)x64xbf16>", c)) for c in calls]

    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        fwd = jax.jit(f).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
        bwd = jax.jit(g).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert triton_operands(fwd) == [{("2", "12")}]
    assert triton_operands(bwd) == [{("2", "12")}] * 3

    q = jax.ShapeDtypeStruct((8, 4096, 24, 64), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
    stack = jax.ShapeDtypeStruct((24, 8, 9856, 24, 64), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, ("data", "fsdp"), None, "tensor")))
    n = jax.ShapeDtypeStruct((8,), jnp.int32)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    c = lambda q, ka, va, n, layer: attn.cache_attention(  # noqa: E731
        q, ka, va, valid_len=n, scale=0.03, layer=layer, impl="pallas")
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(c).trace(q, stack, stack, n, layer).lower(lowering_platforms=("cuda",)).as_text()
    call = next(line for line in text.splitlines() if TRITON_CALL in line)
    assert "tensor<24x2x9856x12x64xbf16>" in call and "tensor<2x4096x12x64xbf16>" in call, call


# ----------------------------------------------------------------------------- benchmark


def test_attention_bench_smoke(tmp_path):
    """The benchmark's smoke mode runs in-process on CPU and writes its JSON (the tile sweep's
    smoke run is in tests/test_tile_table.py)."""
    from bench import attention_bench

    out = tmp_path / "bench.json"
    result = attention_bench.main(["--smoke", "--stages", "4", "--out", str(out)])
    assert json.loads(out.read_text())["training"] == result["training"]
    assert result["matmul_peak"]["tflops"] > 0
    by = {(r["pass"], r["impl"]): r for r in result["training"]}
    for impl in ("xla", "pallas"):
        for p in ("fwd", "fwd+bwd"):
            assert by[(p, impl)]["tflops"] > 0, by[(p, impl)]
    assert "error" in by[("fwd", "cudnn")]  # no cuDNN on a CPU: recorded, not fatal
    stages = [(r["stage"], r["impl"], r["layout"]) for r in result["sampling"] if "ms" in r]
    assert stages == [(4, "xla", "stacked"), (4, "pallas", "stacked")]
    assert "sweep" not in result


def test_xla_cache_attention_chunks_long_query_blocks(monkeypatch):
    """The dense sampling path splits queries so its logits stay under the budget; same result."""
    import hart_jax.attention as A
    from hart_jax.kernels import reference as R

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 36, 3, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 80, 3, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 80, 3, 8)), jnp.float32)
    full = R.cache_attention_reference(q, k, v, 71, 0.1)
    monkeypatch.setattr(A, "XLA_LOGITS_BUDGET_BYTES", 2 * 3 * 80 * 4 * 10)  # room for 10 query rows
    assert A._query_chunk(q.shape, 80) == 9
    np.testing.assert_allclose(A.cache_attention(q, k, v, valid_len=71, scale=0.1, impl="xla"), full, atol=1e-6)
