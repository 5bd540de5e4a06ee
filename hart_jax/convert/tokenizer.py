"""Converter for a release's ``tokenizer/`` directory (``HARTAutoEncoderWithDisc``).

Keys may carry the ``vae.`` prefix (the release) or not (a bare ``HARTAutoEncoder``
state dict). The statistics buffer ``quantize.ema_vocab_hit_SV`` is dropped, and so is
the training discriminator (``disc.*``) unless ``keep_discriminator`` asks to convert it
(``hart_jax.convert.discriminator``: stored beside the params, invisible to
``load_converted``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from hart_jax.convert.table import Rule, apply_table, conv_rules, expected_params, norm_rules
from hart_jax.convert.torch_io import find_weight_file, load_state_dict, read_config
from hart_jax.errors import CheckpointError
from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig

KIND = "tokenizer"
IGNORE = (r"disc\.", r"quantize\.ema_vocab_hit_SV\Z")


def _resnet_rules(t: str, f: str) -> list[Rule]:
    return (
        norm_rules(f"{t}.norm1", f"{f}/norm1")
        + conv_rules(f"{t}.conv1", f"{f}/conv1")
        + norm_rules(f"{t}.norm2", f"{f}/norm2")
        + conv_rules(f"{t}.conv2", f"{f}/conv2")
        + conv_rules(f"{t}.nin_shortcut", f"{f}/nin_shortcut")
    )


def _attn_rules(t: str, f: str) -> list[Rule]:
    return (
        norm_rules(f"{t}.norm", f"{f}/norm")
        + conv_rules(f"{t}.qkv", f"{f}/qkv")
        + conv_rules(f"{t}.proj_out", f"{f}/proj_out")
    )


def _coder_rules(name: str) -> list[Rule]:
    """Rules of an Encoder (``down``) or Decoder (``up``)."""
    lv = "down" if name == "encoder" else "up"
    rs = "downsample" if lv == "down" else "upsample"
    return (
        conv_rules(f"{name}.conv_in", f"{name}/conv_in")
        + _resnet_rules(f"{name}.{lv}.{{l}}.block.{{b}}", f"{name}/{lv}_{{l}}/block_{{b}}")
        + _attn_rules(f"{name}.{lv}.{{l}}.attn.{{b}}", f"{name}/{lv}_{{l}}/attn_{{b}}")
        + conv_rules(f"{name}.{lv}.{{l}}.{rs}.conv", f"{name}/{lv}_{{l}}/{rs}/conv")
        + _resnet_rules(f"{name}.mid.block_1", f"{name}/mid/block_1")
        + _attn_rules(f"{name}.mid.attn_1", f"{name}/mid/attn_1")
        + _resnet_rules(f"{name}.mid.block_2", f"{name}/mid/block_2")
        + norm_rules(f"{name}.norm_out", f"{name}/norm_out")
        + conv_rules(f"{name}.conv_out", f"{name}/conv_out")
    )


def tokenizer_rules() -> list[Rule]:
    """The full PyTorch -> Flax table of the autoencoder (keys without ``vae.``)."""
    return (
        _coder_rules("encoder")
        + _coder_rules("decoder")
        + _coder_rules("decoder2")
        + conv_rules("quant_conv", "quant_conv")
        + conv_rules("post_quant_conv", "post_quant_conv")
        + conv_rules("post_quant_conv2", "post_quant_conv2")
        + [Rule("quantize.embedding.weight", "quantize/embedding/embedding")]
        # φ convs: partially shared (qresi_ls.k), shared (qresi) and non-shared (k).
        + conv_rules("quantize.quant_resi.qresi_ls.{k}", "quantize/quant_resi_{k}")
        + conv_rules("quantize.quant_resi.qresi", "quantize/quant_resi_0")
        + conv_rules("quantize.quant_resi.{k}", "quantize/quant_resi_{k}")
    )


def expected_tokenizer_params(cfg: TokenizerConfig) -> dict[str, Any]:
    """Shapes of the model's params for ``cfg`` via ``jax.eval_shape`` (nothing allocated)."""
    model = HARTAutoEncoder(cfg)
    side = cfg.v_patch_nums[-1] * cfg.downsample
    img = jnp.zeros((1, side, side, cfg.in_channels), jnp.float32)
    return expected_params(lambda: model.init(jax.random.PRNGKey(0), img))


def convert_tokenizer_state(
    state: Mapping[str, Any], cfg: TokenizerConfig, *, source: str = "tokenizer", shapes_only: bool = False
) -> dict[str, Any]:
    """Map a (``vae.``-prefixed or bare) state dict onto the Flax params of ``cfg``."""
    return apply_table(
        state,
        tokenizer_rules(),
        expected_tokenizer_params(cfg),
        ignore=IGNORE,
        source=source,
        shapes_only=shapes_only,
        strip_prefixes=("vae.",),
    )


def load_tokenizer_config(src_dir: str | os.PathLike) -> TokenizerConfig:
    """``TokenizerConfig`` from ``<src_dir>/config.json``; errors name the file."""
    if not Path(src_dir).is_dir():
        raise CheckpointError(f"{src_dir}: not a directory")
    return read_config(Path(src_dir) / "config.json", TokenizerConfig.from_hf_dict)


def convert_tokenizer(
    src_dir: str | os.PathLike, weights: str | os.PathLike | None = None
) -> tuple[TokenizerConfig, dict[str, Any]]:
    """Read a release ``tokenizer/`` directory; return ``(config, {"params": ...})``.

    ``weights`` overrides the weight file (default: ``model.safetensors``, then
    ``pytorch_model.bin``, then the only ``*.bin``).
    """
    cfg = load_tokenizer_config(src_dir)
    wfile = Path(weights) if weights else find_weight_file(src_dir)
    state = load_state_dict(wfile)
    params = convert_tokenizer_state(state, cfg, source=str(wfile))
    return cfg, {"params": params}


def verify_tokenizer(cfg: TokenizerConfig, variables: Mapping[str, Any], side: int | None = None) -> None:
    """Run encode -> quantize -> decode on a small random image; raise if not finite."""
    import numpy as np

    model = HARTAutoEncoder(cfg)
    side = side or cfg.downsample * 4
    img = jax.random.uniform(jax.random.PRNGKey(0), (1, side, side, cfg.in_channels), minval=-1.0, maxval=1.0)
    out = np.asarray(model.apply(variables, img, (1, 2, 4))["out"])
    if out.shape != img.shape or not np.isfinite(out).all():
        raise CheckpointError(f"converted tokenizer produced {'non-finite' if out.shape == img.shape else out.shape} output")


def save_tokenizer(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    force: bool = False,
    keep_discriminator: bool = False,
) -> Path:
    """Convert ``src_dir``, check the result runs, and write it atomically to ``out_dir``;
    ``keep_discriminator`` also converts the ``disc.*`` PatchGAN (an error if absent)."""
    from hart_jax.checkpoint import check_output, load_converted, save_converted

    check_output(out_dir, force)
    cfg = load_tokenizer_config(src_dir)
    wfile = Path(weights) if weights else find_weight_file(src_dir)
    state = load_state_dict(wfile)
    variables = {"params": convert_tokenizer_state(state, cfg, source=str(wfile))}
    extras: dict[str, Any] = {}
    if keep_discriminator:
        from hart_jax.convert.discriminator import convert_discriminator_state
        from hart_jax.loading import discriminator_extras

        dcfg, dvars = convert_discriminator_state(state, source=str(wfile))
        extras = discriminator_extras(dcfg, dvars)
    verify_tokenizer(cfg, variables)
    out = save_converted(
        out_dir, variables, cfg.to_hf_dict(), kind=KIND, source=str(Path(src_dir).absolute()), force=force, **extras
    )
    _, reloaded = load_converted(out, kind=KIND)
    verify_tokenizer(cfg, reloaded)
    return out
