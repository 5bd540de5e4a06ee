"""Transformer presets (ml_collections), fields as in ``hart_jax.models.transformer.T2IConfig``.

Presets:
  ``hart_0p7b_1024``: the release's text-to-image model (732,399,168 params with the
      diffusion head), 14 scales for a 64x64 latent;
  ``hart_c2i_d20`` / ``d24`` / ``d30``: class-conditional ImageNet 256 px models sized by
      VAR's convention (width 64*depth, depth heads, 10 scales), per-block AdaLN;
  ``shapes_32``: the built-in default model (32 px procedural shapes, ``hart_jax.builtin``);
  ``tiny``: the shape of the golden fixture model (fast tests).
"""

import ml_collections

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
HART_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def _c2i(depth: int) -> dict:
    return dict(
        context_token=0, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
        patch_nums=VAR_256, disable_aln=False, use_timestep_embed=False, use_context_norm=False,
        sep_aln_pooling_mode="max", diff_width=1024, diff_depth=6, vocab_size=4096, z_channels=32, rope_2d="hart",
    )


PRESETS = {
    "hart_0p7b_1024": dict(
        context_token=300, context_dim=1536, depth=24, embed_dim=1536, num_heads=24, patch_nums=HART_1024,
        disable_aln=True, use_timestep_embed=True, use_context_norm=True, sep_aln_pooling_mode="max",
        diff_width=1024, diff_depth=6, num_sampling_steps="8", vocab_size=4096, z_channels=32, rope_2d="hart",
    ),
    "hart_c2i_d20": _c2i(20),
    "hart_c2i_d24": _c2i(24),
    "hart_c2i_d30": _c2i(30),
    # Two departures from the release's t2i layout, both measured on the built-in task
    # (docs/builtin.md): per-block AdaLN on the pooled text (with attention alone the shape word
    # moved the codes' likelihood by ~6 nats per image and samples came out as blobs; with AdaLN
    # ~23 nats) and the true 2-D RoPE rotation at base 100 (hd = 16: base 10000 leaves two of
    # the four frequencies nearly constant over an 8x8 grid).
    "shapes_32": dict(
        context_token=16, context_dim=64, depth=4, embed_dim=64, num_heads=4, patch_nums=(1, 2, 3, 4, 6, 8),
        disable_aln=False, use_timestep_embed=True, use_context_norm=True, diff_width=64, diff_depth=2,
        vocab_size=64, z_channels=8, rope_2d="rotation", rope_theta=100.0,
    ),
    "tiny": dict(
        context_token=6, context_dim=24, depth=2, embed_dim=64, num_heads=4, patch_nums=(1, 2, 3, 4, 6),
        disable_aln=True, use_timestep_embed=True, use_context_norm=True, diff_width=32, diff_depth=2,
        vocab_size=640, z_channels=8, rope_2d="hart",
    ),
}


def get_config(preset: str = "hart_0p7b_1024") -> ml_collections.ConfigDict:
    """The named preset as a ConfigDict."""
    if preset not in PRESETS:
        raise ValueError(f"unknown transformer preset {preset!r}; choose from {sorted(PRESETS)}")
    return ml_collections.ConfigDict(PRESETS[preset])
