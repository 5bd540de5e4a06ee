"""Full-size 0.7B 1024 px transformer: shapes only (jax.eval_shape) against the release manifests."""

import json
from pathlib import Path

import numpy as np
import pytest

from configs.transformer import get_config
from hart_jax.checkpoint import count_params
from hart_jax.convert.llm import IGNORE, convert_llm_state
from hart_jax.convert.table import flatten_params
from hart_jax.convert.torch_io import load_manifest
from hart_jax.models.transformer import T2IConfig, abstract_params, unstack_blocks

PRIMARY = ("hart-0.7b-1024px.transformer.keys.json", "transformer")
ALTERNATIVE = ("hart-0.7b-1024px.transformer.keys.alt-d16-adaln.json", "transformer.alt-d16-adaln")


def _summary(golden_dir: Path) -> dict:
    """The fixture's record of the release-size configs and parameter counts."""
    return json.loads((golden_dir / "hart-0.7b-1024px.summary.json").read_text())


def _config_from_summary(golden_dir: Path, entry: str) -> T2IConfig:
    """``entry``'s transformer config, with the vocabulary and latent width of the summary's tokenizer."""
    summary = _summary(golden_dir)
    d = dict(summary[entry]["config"])
    d["model_type"] = "hart_transformer_t2i"
    tok = summary["tokenizer"]["config"]
    return T2IConfig.from_hf_dict(d, vocab_size=tok["vocab_size"], z_channels=tok["z_channels"], source=entry)


def test_preset_is_the_summary_config(golden_dir):
    assert T2IConfig(**get_config("hart_0p7b_1024")) == _config_from_summary(golden_dir, "transformer")


@pytest.mark.parametrize("manifest,entry", [PRIMARY, ALTERNATIVE], ids=["primary", "alt-d16-adaln"])
def test_mapping_covers_exactly_the_manifest(golden_dir, manifest, entry):
    cfg = _config_from_summary(golden_dir, entry)
    total = _summary(golden_dir)[entry]["total_params"]
    keys = load_manifest(golden_dir / manifest)
    expected = abstract_params(cfg)
    assert count_params(expected) == total
    assert count_params(expected["diffloss"]) == _summary(golden_dir)[entry]["diffloss_params"]

    converted = convert_llm_state(keys, cfg, source=manifest, shapes_only=True)
    got, want = flatten_params(converted), flatten_params(expected)
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape for k in want)

    import re

    params = [k for k in keys if not any(re.match(p, k) for p in IGNORE)]
    assert len(params) == len(flatten_params(unstack_blocks(expected)))  # one source key per block row
    assert sum(int(np.prod(keys[k].shape)) for k in params) == total
