"""Conversion rules of the residual diffusion head (``diffloss.net.*`` -> ``diffloss/net/...``).

The transformer converter includes ``diffusion_head_rules()``; ``timestep_embedder_rules``
also serves the transformer's ``lvl_embed`` (same ``mlp.0`` / ``mlp.2`` layout).
PyTorch ``X.adaLN_modulation.1`` (after the SiLU at index 0) -> Flax ``X/adaLN_modulation_1``;
``final_layer.norm_final`` has no parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hart_jax.convert.table import Rule, dense_rules, expected_params, norm_rules
from hart_jax.models.diffusion_head import DiffLoss


def timestep_embedder_rules(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    """``{t}.mlp.0`` / ``{t}.mlp.2`` Linear layers of a ``TimestepEmbedder``."""
    return dense_rules(f"{torch_prefix}.mlp.0", f"{flax_prefix}/mlp_0") + dense_rules(
        f"{torch_prefix}.mlp.2", f"{flax_prefix}/mlp_2"
    )


def diffusion_head_rules(torch_prefix: str = "diffloss.net", flax_prefix: str = "diffloss/net") -> list[Rule]:
    """Every parameter of ``SimpleMLPAdaLN`` (any depth, via the ``{i}`` placeholder)."""
    t, f = torch_prefix, flax_prefix
    blk_t, blk_f = f"{t}.res_blocks.{{i}}", f"{f}/res_blocks_{{i}}"
    return (
        timestep_embedder_rules(f"{t}.time_embed", f"{f}/time_embed")
        + dense_rules(f"{t}.cond_embed", f"{f}/cond_embed")
        + dense_rules(f"{t}.input_proj", f"{f}/input_proj")
        + norm_rules(f"{blk_t}.in_ln", f"{blk_f}/in_ln")
        + dense_rules(f"{blk_t}.mlp.0", f"{blk_f}/mlp_0")
        + dense_rules(f"{blk_t}.mlp.2", f"{blk_f}/mlp_2")
        + dense_rules(f"{blk_t}.adaLN_modulation.1", f"{blk_f}/adaLN_modulation_1")
        + dense_rules(f"{t}.final_layer.linear", f"{f}/final_layer/linear")
        + dense_rules(f"{t}.final_layer.adaLN_modulation.1", f"{f}/final_layer/adaLN_modulation_1")
    )


def expected_diffloss_params(model: DiffLoss) -> dict[str, Any]:
    """Shapes of ``model``'s params (``{"net": ...}``) via ``jax.eval_shape``; nothing allocated."""
    n = 2
    args = (
        jnp.zeros((n, model.target_channels), jnp.float32),
        jnp.zeros((n, model.z_channels), jnp.float32),
        jnp.zeros((n,), jnp.int32),
        jnp.zeros((n, model.target_channels), jnp.float32),
    )
    return expected_params(lambda: model.init(jax.random.PRNGKey(0), *args))
