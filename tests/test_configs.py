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


def test_tokenizer_training_presets_build():
    import dataclasses

    from configs.tokenizer import PRESETS as TOK
    from configs.train import get_config, get_tokenizer_config
    from hart_jax.models.discriminator import DiscriminatorConfig
    from hart_jax.train.tokenizer_loop import tokenizer_config_from
    from hart_jax.train.tokenizer_objective import TokenizerLossConfig

    for preset, trainable in (("tokenizer_hart_1024", "decoder"), ("tokenizer_tiny", "all")):
        c = get_config(preset)
        assert c.task == "tokenizer" and c.tokenizer_train.trainable == trainable
        tok = tokenizer_config_from(c)
        assert {f.name for f in dataclasses.fields(tok)} == set(c.tokenizer)  # every field overridable
        TokenizerLossConfig.from_config(c.tokenizer_loss)
        DiscriminatorConfig(**c.discriminator)
    assert tokenizer_config_from(get_config("tokenizer_hart_1024")).downsample == 16
    assert get_config("tiny_t2i").task == "transformer"
    # another config file builds one from a TokenizerConfig dict + dotted overrides
    c = get_tokenizer_config(TOK["tiny"], {"train.batch_size": 4, "tokenizer.ch": 64, "compute_dtype": "bfloat16"})
    assert (c.train.batch_size, c.tokenizer.ch, c.compute_dtype, c.tokenizer.vocab_size) == (4, 64, "bfloat16", 640)
    with pytest.raises(ValueError, match="unknown tokenizer config field"):
        get_tokenizer_config(TOK["tiny"], {"train.no_such_field": 1})
