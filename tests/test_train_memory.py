"""Memory of the 0.7B preset's train state on a mesh of 8 (shapes only): FSDP divides
params + optimizer state + EMA by the mesh size."""

from __future__ import annotations

import jax

from configs.train import get_config
from hart_jax.train.loop import memory_report


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
