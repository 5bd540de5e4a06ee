"""Tokenizer presets (ml_collections), fields as in ``hart_jax.models.autoencoder.TokenizerConfig``.

    from configs.tokenizer import get_config
    cfg = TokenizerConfig(**get_config("hart_0p7b_1024"))

Presets: ``hart_0p7b_1024`` (the release's 1024 px tokenizer, 108,948,355 params)
``shapes_32`` (the built-in default model's 32 px tokenizer, ``hart_jax.builtin``)
and ``tiny`` (the shape of the golden fixture tokenizer, for fast tests).
"""

import ml_collections

PRESETS = {
    "hart_0p7b_1024": dict(
        vocab_size=4096,
        z_channels=32,
        ch=160,
        ch_mult=(1, 1, 2, 2, 4),
        v_patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
        quant_resi=0.5,
        share_quant_resi=4,
        quantizer_type="var_hybrid",
    ),
    "shapes_32": dict(
        vocab_size=64,
        z_channels=8,
        ch=16,
        ch_mult=(1, 2, 2),
        norm_groups=16,
        num_res_blocks=1,
        v_patch_nums=(1, 2, 3, 4, 6, 8),
        quant_resi=0.5,
        share_quant_resi=4,
        quantizer_type="var_hybrid",
    ),
    "tiny": dict(
        vocab_size=640,
        z_channels=8,
        ch=32,
        ch_mult=(1, 1, 2),
        v_patch_nums=(1, 2, 3, 4, 6),
        quant_resi=0.5,
        share_quant_resi=4,
        quantizer_type="var_hybrid",
    ),
}


def get_config(preset: str = "hart_0p7b_1024") -> ml_collections.ConfigDict:
    """The named preset as a ConfigDict."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose from {sorted(PRESETS)}")
    return ml_collections.ConfigDict(PRESETS[preset])
