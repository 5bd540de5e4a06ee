"""Analytic FLOP counts of HART's sampling program, part by part, and of a training step.

Counts the matrix products of the program (2 FLOPs per multiply-add: dense layers,
attention's two products, convolutions, the resampling matrices), from the configs
alone: nothing is traced or run. Elementwise work (norms, softmax, RoPE, the sampler's
arithmetic) is left out, so XLA's own count of the same program
(``compiled.cost_analysis()["flops"]``) is a little larger; ``tests/test_flops.py``
checks the two against each other on a tiny config.

Parts (the keys of :func:`sampling_flops`):

- ``text_encoder``: Qwen2 over the ``B`` prompts (prefix + context tokens), its
  attention over all ``L x L`` pairs (the dense program computes them; the causal /
  padding mask only hides them);
- ``transformer_linear``: the blocks' q/k/v, output and SwiGLU projections, every stage,
  on ``2B`` rows (conditional and unconditional);
- ``transformer_attention``: each stage's queries against the keys they can see (the
  cached prefix plus their own scale), summed over blocks: what the ``xla`` path
  computes; the kernels skip or pad blocks around it;
- ``head``: the conditioning projection of the context, AdaLN before the head and the
  vocabulary head (the first stage's last token, then every token);
- ``sampling``: word embeddings of the next stage's inputs, the Gumbel-softmax mixture
  ``softmax(.) @ codebook`` (``more_smooth``), the level embeddings, the multi-scale
  quantizer's bicubic / area resampling and φ convolutions;
- ``diffusion_head``: the MLP denoiser's respaced steps over the last scale's tokens
  (``2B`` rows per step) and its conditioning;
- ``decoder``: ``post_quant_conv`` and the tokenizer's decoder (convolutions and the mid
  attention), per image.

Training (:func:`train_flops`): the teacher-forced transformer, its head and the diffusion
head, 3x the forward (``TRAIN_PASSES``), with attention counted either over the pairs HART's
level mask lets through (useful work) or over all ``L x L`` pairs (the dense convention).

Dimensions (docs/design.md): B batch (images); L tokens (text encoder input); T context tokens; l scale
tokens; K key tokens; C channels (model width); E text width; I MLP width; V
vocabulary; Z latent channels; M head width; F frequency embedding; D head dim; G
key/value heads; A heads; J respaced steps; X depth; H height; W width; S scales.
"""

from __future__ import annotations

from typing import Any

FREQ_EMBED = 256  # TimestepEmbedder's sinusoidal size (the transformer's and the head's)


def _dense(rows: float, n_in: int, n_out: int) -> float:
    return 2.0 * rows * n_in * n_out


def text_encoder_flops(qcfg: Any, batch: int, tokens: int) -> float:
    """Qwen2 forward over ``batch`` sequences of ``tokens`` (dense attention)."""
    e, i = qcfg.hidden_size, qcfg.intermediate_size
    d = qcfg.resolved_head_dim
    q_out, kv_out = qcfg.num_attention_heads * d, qcfg.num_key_value_heads * d
    rows = batch * tokens
    per_layer = (
        _dense(rows, e, q_out) + 2 * _dense(rows, e, kv_out) + _dense(rows, q_out, e)
        + 2 * _dense(rows, e, i) + _dense(rows, i, e)
        + 2 * 2.0 * batch * tokens * tokens * q_out  # logits and probs @ v over all pairs
    )
    return qcfg.num_hidden_layers * per_layer


def stage_tokens(cfg: Any) -> list[tuple[int, int]]:
    """``(query tokens, visible key tokens)`` of each sampling stage (stage 0: the
    context block, which sees itself fully)."""
    return [(end - start, end) for start, end in cfg.stage_slices()]


def transformer_flops(cfg: Any, batch: int) -> dict[str, float]:
    """Blocks (linear, attention) and head over every sampling stage (``2B`` rows)."""
    r = 2 * batch
    c, i, v = cfg.embed_dim, cfg.mlp_hidden, cfg.vocab_size
    per_token_block = _dense(1, c, 3 * c) + _dense(1, c, c) + 2 * _dense(1, c, i) + _dense(1, i, c)
    linear = attn = head = 0.0
    for si, (q, k) in enumerate(stage_tokens(cfg)):
        linear += cfg.depth * r * q * per_token_block
        attn += cfg.depth * 2 * 2.0 * r * q * k * c
        head += _dense(r, c, 2 * c) + _dense(r * (1 if si == 0 else q), c, v)
        if not cfg.disable_aln:
            linear += cfg.depth * _dense(r, c, 6 * c)
    if not cfg.is_c2i:
        head += _dense(r * cfg.context_token, cfg.context_dim, c)  # context_embed
    return {"transformer_linear": linear, "transformer_attention": attn, "head": head}


def _resample(batch: int, n_in: int, n_out: int, z: int) -> float:
    """Two separable resampling matmuls ``[n_out, n_in]`` (H, then W); none when equal."""
    if n_in == n_out:
        return 0.0
    return 2.0 * batch * z * (n_out * n_in * n_in + n_out * n_out * n_in)


def sampling_ops_flops(
    cfg: Any, batch: int, more_smooth: bool = True, phi: bool = True, in_bounds: bool = False
) -> float:
    """Word embeddings, the Gumbel mixture, level embeddings and the quantizer's per-stage
    resampling + φ convs (image rows only, ``B``; ``in_bounds``: see ``_conv``)."""
    pn = cfg.patch_nums
    z, c, v = cfg.z_channels, cfg.embed_dim, cfg.vocab_size
    side = pn[-1]
    out = 0.0
    if cfg.use_timestep_embed:
        out += _dense(cfg.num_scales, FREQ_EMBED, c) + _dense(cfg.num_scales, c, c)
    for si, p in enumerate(pn):
        if more_smooth:
            out += 2.0 * batch * p * p * v * z
        if si < len(pn) - 1:
            out += _resample(batch, p, side, z)  # bicubic up to the last scale's side
            if phi:
                out += _conv(batch, side, 3, z, z, in_bounds)  # phi conv
            out += _resample(batch, side, pn[si + 1], z)  # area down to the next scale
            out += _dense(batch * pn[si + 1] ** 2, z, c)  # word_embed of the next input
    return out


def diffusion_head_flops(cfg: Any, batch: int, steps: int) -> float:
    """The denoiser over the last scale's ``2B`` rows of tokens (guided or not, every row
    is denoised) for ``steps`` respaced steps, plus the conditioning ``word_embed`` of the
    chosen codes."""
    rows = 2 * batch * cfg.patch_nums[-1] ** 2
    m, z, c = cfg.diff_width, cfg.z_channels, cfg.embed_dim
    per_row = (
        _dense(1, z, m) + _dense(1, FREQ_EMBED, m) + _dense(1, m, m) + _dense(1, c, m)
        + cfg.diff_depth * (_dense(1, m, 3 * m) + 2 * _dense(1, m, m))
        + _dense(1, m, 2 * m) + _dense(1, m, 2 * z)
    )
    return steps * rows * per_row + _dense(rows, z, c)


def _conv(batch: int, side: int, k: int, n_in: int, n_out: int, in_bounds: bool = False) -> float:
    """A ``k x k`` stride-1 convolution with ``k // 2`` zero padding on ``batch`` square
    maps of ``side``: every tap, or with ``in_bounds`` only the taps that read the map
    (how XLA's cost analysis counts a padded convolution)."""
    p = k // 2
    taps = (k * side - p * (p + 1)) ** 2 if in_bounds else k * k * side * side
    return 2.0 * batch * taps * n_in * n_out


def decoder_flops(tcfg: Any, batch: int, in_bounds: bool = False) -> float:
    """``post_quant_conv`` + the tokenizer's decoder on ``batch`` latents of the last
    scale's side (convolutions, 1x1 shortcuts and the lowest level's attention);
    ``in_bounds``: see ``_conv``."""
    chs = [tcfg.ch * m for m in tcfg.ch_mult]
    n = len(chs)
    z = tcfg.z_channels
    s = tcfg.v_patch_nums[-1]

    def conv(side: int, k: int, cin: int, cout: int) -> float:
        return _conv(batch, side, k, cin, cout, in_bounds)

    def resnet(side: int, cin: int, cout: int) -> float:
        out = conv(side, 3, cin, cout) + conv(side, 3, cout, cout)
        return out + (conv(side, 1, cin, cout) if cin != cout else 0.0)

    def attn(side: int, ch: int) -> float:
        return conv(side, 1, ch, 3 * ch) + conv(side, 1, ch, ch) + 2 * 2.0 * batch * side**4 * ch

    out = conv(s, tcfg.quant_conv_ks, z, z) + conv(s, 3, z, chs[-1])  # post_quant_conv, conv_in
    out += 2 * resnet(s, chs[-1], chs[-1]) + attn(s, chs[-1])  # mid
    for lvl in reversed(range(n)):
        cin = chs[lvl + 1] if lvl < n - 1 else chs[-1]
        for j in range(tcfg.num_res_blocks + 1):
            out += resnet(s, cin if j == 0 else chs[lvl], chs[lvl])
            if lvl == n - 1:
                out += attn(s, chs[lvl])
        if lvl != 0:
            s *= 2
            out += conv(s, 3, chs[lvl], chs[lvl])  # upsample: nearest x2, then a conv
    return out + conv(s, 3, chs[0], tcfg.in_channels)


def sampling_flops(
    t2i_cfg: Any,
    tok_cfg: Any,
    batch: int,
    *,
    text_cfg: Any | None = None,
    text_tokens: int = 0,
    more_smooth: bool = True,
    diffusion_steps: int | None = None,
    in_bounds: bool = False,
) -> dict[str, float]:
    """FLOPs of one sampling call for ``batch`` images, by part (see the module docstring).

    ``text_cfg`` / ``text_tokens``: the Qwen2 config and its input length (prefix +
    context tokens), or None when the program starts from text features.
    ``diffusion_steps``: the head's respaced steps (default ``num_sampling_steps``;
    0 when the program has no diffusion head). ``in_bounds`` counts only the convolution
    taps inside the map, as XLA's cost analysis does (default: every tap). HART's program runs the transformer and
    the head on ``2B`` rows (conditional, unconditional) whatever the guidance scale.
    """
    steps = int(t2i_cfg.num_sampling_steps) if diffusion_steps is None else diffusion_steps
    parts: dict[str, float] = {}
    if text_cfg is not None:
        parts["text_encoder"] = text_encoder_flops(text_cfg, batch, text_tokens)
    parts.update(transformer_flops(t2i_cfg, batch))
    parts["sampling"] = sampling_ops_flops(
        t2i_cfg, batch, more_smooth, phi=abs(tok_cfg.quant_resi) > 1e-6, in_bounds=in_bounds
    )
    parts["diffusion_head"] = diffusion_head_flops(t2i_cfg, batch, steps) if steps else 0.0
    parts["decoder"] = decoder_flops(tok_cfg, batch, in_bounds)
    return parts


# ------------------------------------------------------------------- training
# Training FLOPs = TRAIN_PASSES x the forward's: the backward pass costs two forwards (the
# gradients with respect to both the activations and the weights of every product).
TRAIN_PASSES = 3.0


def level_sizes(cfg: Any, n_keep: int | None = None) -> list[int]:
    """Tokens of each level of the training sequence: the level-0 block (text or class
    tokens), scales 1..N-2, and the ``n_keep`` kept tokens of the last scale (default all)."""
    last = cfg.patch_nums[-1] ** 2 if n_keep is None else int(n_keep)
    return [cfg.first_l] + [p * p for p in cfg.patch_nums[1:-1]] + [last]


def visible_attention_pairs(cfg: Any, n_keep: int | None = None) -> int:
    """(query, key) pairs HART's training mask lets through per sequence: key k is visible to
    query q iff ``level(k) <= level(q)`` (the level-0 block sees itself fully)."""
    sizes = level_sizes(cfg, n_keep)
    seen = total = 0
    for n in sizes:
        seen += n
        total += n * seen
    return total


def train_forward_flops(
    cfg: Any, batch: int, n_keep: int | None = None, batch_mul: int = 4, dense_attention: bool = False
) -> dict[str, float]:
    """Forward FLOPs of one teacher-forced training step, by part, for ``batch`` sequences
    with ``n_keep`` kept last-scale tokens (default all).

    ``transformer_attention`` counts the visible (query, key) pairs under the level mask
    (the useful work), or with ``dense_attention`` all ``L x L`` pairs (what the dense
    ``xla`` path computes). ``diffusion_head``: the denoiser on the kept tokens tiled
    ``batch_mul`` times, one step each. The frozen tokenizer and text encoder are not counted.
    """
    c, i, v = cfg.embed_dim, cfg.mlp_hidden, cfg.vocab_size
    seq = sum(level_sizes(cfg, n_keep))
    kept = level_sizes(cfg, n_keep)[-1]
    mid = seq - cfg.first_l - kept
    pairs = seq * seq if dense_attention else visible_attention_pairs(cfg, n_keep)
    per_token_block = _dense(1, c, 3 * c) + _dense(1, c, c) + 2 * _dense(1, c, i) + _dense(1, i, c)
    linear = batch * cfg.depth * seq * per_token_block
    if not cfg.disable_aln:
        linear += batch * cfg.depth * _dense(1, c, 6 * c)  # AdaLN of each block, once per sequence
    w, d, z = cfg.diff_width, cfg.diff_depth, cfg.z_channels
    diff_row = (
        _dense(1, z, w) + _dense(1, FREQ_EMBED, w) + _dense(1, w, w) + _dense(1, c, w)
        + d * (_dense(1, w, 2 * w) + _dense(1, w, 3 * w)) + _dense(1, w, 2 * w) + _dense(1, w, 2 * z)
    )
    return {
        "transformer_linear": linear,
        "transformer_attention": batch * cfg.depth * 2 * 2.0 * pairs * c,  # q @ k^T and probs @ v
        "head": _dense(batch * (1 + mid + kept), c, v),  # last level-0 token + every image input
        "word_embed": _dense(batch * (mid + 2 * kept), z, c),  # the inputs + the kept codes' condition
        "diffusion_head": batch * kept * batch_mul * diff_row,
    }


def train_flops(
    cfg: Any, batch: int, n_keep: int | None = None, batch_mul: int = 4, dense_attention: bool = False
) -> float:
    """Model FLOPs of one training step: ``TRAIN_PASSES`` x the forward (``train_forward_flops``)."""
    return TRAIN_PASSES * sum(train_forward_flops(cfg, batch, n_keep, batch_mul, dense_attention).values())
