"""Every config file in configs/ parses, and every preset builds its model config."""

import importlib
from pathlib import Path

import pytest

CONFIG_FILES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if p.stem != "__init__")


def test_there_are_configs():
    assert "tokenizer" in CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_preset_loads(name):
    mod = importlib.import_module(f"configs.{name}")
    for preset in mod.PRESETS:
        cfg = mod.get_config(preset)
        assert len(cfg) > 0
    with pytest.raises(ValueError, match="unknown"):
        mod.get_config("no-such-preset")


def test_tokenizer_presets_build():
    from configs.tokenizer import PRESETS, get_config
    from hart_jax.models.autoencoder import TokenizerConfig

    for p in PRESETS:
        assert TokenizerConfig(**get_config(p)).downsample in (4, 16)


def test_transformer_presets_build():
    from configs.transformer import PRESETS, get_config
    from hart_jax.models.transformer import T2IConfig

    for p in PRESETS:
        cfg = T2IConfig(**get_config(p))
        assert cfg.seq_len == cfg.first_l + sum(n * n for n in cfg.patch_nums[1:])
