"""Full-size 1024 px tokenizer: shapes only (jax.eval_shape), against the release manifest."""

import numpy as np

from configs.tokenizer import get_config
from hart_jax.checkpoint import count_params
from hart_jax.convert.table import flatten_params
from hart_jax.convert.tokenizer import convert_tokenizer_state, expected_tokenizer_params
from hart_jax.convert.torch_io import load_manifest
from hart_jax.models.autoencoder import TokenizerConfig

VAE_PARAMS_1024 = 108_948_355


def test_converter_mapping_covers_exactly_the_release_params(golden_dir):
    cfg = TokenizerConfig(**get_config("hart_0p7b_1024"))
    manifest = load_manifest(golden_dir / "hart-0.7b-1024px.tokenizer.keys.json")
    expected = expected_tokenizer_params(cfg)
    assert count_params(expected) == VAE_PARAMS_1024

    converted = convert_tokenizer_state(manifest, cfg, source="manifest", shapes_only=True)
    got, want = flatten_params(converted), flatten_params(expected)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k

    vae_keys = {k for k in manifest if k.startswith("vae.") and k != "vae.quantize.ema_vocab_hit_SV"}
    assert sum(int(np.prod(manifest[k].shape)) for k in vae_keys) == VAE_PARAMS_1024
    assert len(vae_keys) == len(want)
