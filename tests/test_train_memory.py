"""Memory of the 0.7B preset's train state on a mesh of 8 (shapes only): FSDP divides
params + optimizer state + EMA by the mesh size."""

from __future__ import annotations

import jax

from configs.train import get_config
from hart_jax.train.memory import memory_report


def test_0p7b_state_is_divided_by_fsdp():
    c = get_config("hart_0p7b_1024")
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
    rep = memory_report(c, jax.devices())
    assert rep["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert rep["num_params"] == 732_399_168  # the release's count, diffusion head included
    # fp32 params + Adam (mu, nu) + EMA = 16 bytes per parameter
    assert rep["total_bytes"] >= 16 * rep["num_params"]
    for name in ("params", "opt_state", "ema_params"):
        total, per = rep[f"{name}_total_bytes"], rep[f"{name}_per_device_bytes"]
        assert per <= total / 8 * 1.005, (name, per, total / 8)  # only norm scales stay replicated
    assert rep["per_device_bytes"] <= rep["total_bytes"] / 8 * 1.005


def test_tensor_axis_also_divides():
    c = get_config("hart_0p7b_1024")
    c.mesh.fsdp, c.mesh.tensor = 4, 2
    rep = memory_report(c, jax.devices())
    assert rep["per_device_bytes"] <= rep["total_bytes"] / 8 * 1.01
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1  # pure data parallel replicates everything
    rep = memory_report(c, jax.devices())
    assert rep["per_device_bytes"] == rep["total_bytes"]


def test_every_training_preset_is_consistent():
    """Each transformer preset's model, tokenizer and objective fit together, and each tokenizer
    preset builds its tokenizer (no weights built); the built-in model's presets too."""
    from configs import shapes
    from configs.train import PRESETS
    from hart_jax.models.autoencoder import TokenizerConfig
    from hart_jax.train.loop import _model_config

    presets = [(name, get_config(name)) for name in PRESETS] + [(n, shapes.get_config(n)) for n in shapes.PRESETS]
    for name, c in presets:
        if c.get("task", "transformer") == "tokenizer":
            tk = dict(c.tokenizer)
            tk["ch_mult"], tk["v_patch_nums"] = tuple(tk["ch_mult"]), tuple(tk["v_patch_nums"])
            assert TokenizerConfig(**tk).downsample >= 1, name
            assert c.train.grad_accum == 1, name
            continue
        tcfg = _model_config(c)
        tk = {k: v for k, v in c.tokenizer.items() if k != "checkpoint"}
        tk["ch_mult"], tk["v_patch_nums"] = tuple(tk["ch_mult"]), tuple(tk["v_patch_nums"])
        tok = TokenizerConfig(**tk)
        assert (tok.vocab_size, tok.z_channels) == (tcfg.vocab_size, tcfg.z_channels), name
        assert tuple(tok.v_patch_nums)[-1] == tcfg.patch_nums[-1], name
        assert tcfg.is_c2i == (c.data.kind == "c2i"), name
        assert c.train.batch_size % c.train.grad_accum == 0
    assert get_config("hart_0p7b_1024").compute_dtype == "bfloat16"
    assert _model_config(get_config("hart_c2i_d20")).patch_nums[-1] * 16 == 256


def test_compiled_step_memory_per_remat_policy(capsys):
    """The compiled step's memory analysis (tiny preset, one device): every field present and
    positive, the donated state aliased, and full rematerialisation needs fewer temporaries
    than none; the CLI refuses an unknown preset in one line."""
    from hart_jax.train.memory import format_report, main, step_memory

    reps = {}
    for remat in ("none", "full"):
        c = get_config("tiny_t2i")
        c.train.batch_size, c.train.remat, c.data.codes = 32, remat, True
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
        c.model.attention_impl = "xla"
        reps[remat] = step_memory(c, devices=jax.devices()[:1])
    for remat, r in reps.items():
        assert r["remat"] == remat and r["batch"] == 32 and r["n_keep"] == 32  # tiny: 36 last-scale tokens, 4 dropped
        for k in ("temp_bytes", "argument_bytes", "output_bytes", "state_bytes", "peak_bytes"):
            assert r[k] > 0, (remat, k)
        assert r["alias_bytes"] == r["state_bytes"]  # the state is donated
        assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
        assert "fits in 80 GiB" in format_report(r, 80.0)
    assert reps["full"]["temp_bytes"] < reps["none"]["temp_bytes"], {k: r["temp_bytes"] for k, r in reps.items()}
    assert main(["--config", "configs/train.py:no_such_preset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config configs/train.py:no_such_preset: unknown training preset") and err.count("\n") == 1
