"""Full-size 1024 px tokenizer: shapes only (jax.eval_shape), against the release manifest."""

import json

import numpy as np

from configs.tokenizer import get_config
from hart_jax.checkpoint import count_params
from hart_jax.convert.table import flatten_params
from hart_jax.convert.tokenizer import convert_tokenizer_state, expected_tokenizer_params
from hart_jax.convert.torch_io import load_manifest
from hart_jax.models.autoencoder import TokenizerConfig


def test_converter_mapping_covers_exactly_the_release_params(golden_dir):
    cfg = TokenizerConfig(**get_config("hart_0p7b_1024"))
    summary = json.loads((golden_dir / "hart-0.7b-1024px.summary.json").read_text())["tokenizer"]
    recorded = TokenizerConfig.from_hf_dict({**summary["config"], "model_type": "hart_autoencoder_with_disc"},
                                            source="summary.json")
    assert cfg == recorded  # the preset is the release config the fixture recorded
    vae_params = summary["vae_params"]
    manifest = load_manifest(golden_dir / "hart-0.7b-1024px.tokenizer.keys.json")
    expected = expected_tokenizer_params(cfg)
    assert count_params(expected) == vae_params

    converted = convert_tokenizer_state(manifest, cfg, source="manifest", shapes_only=True)
    got, want = flatten_params(converted), flatten_params(expected)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k

    vae_keys = {k for k in manifest if k.startswith("vae.") and k != "vae.quantize.ema_vocab_hit_SV"}
    assert sum(int(np.prod(manifest[k].shape)) for k in vae_keys) == vae_params
    assert len(vae_keys) == len(want)
