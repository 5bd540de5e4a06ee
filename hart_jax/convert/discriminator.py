"""Converter for the release tokenizer's PatchGAN discriminator (``disc.main.*``).

Kept only on request (``python -m hart_jax.convert tokenizer SRC OUT --keep-discriminator``):
conv weights OIHW -> HWIO, BatchNorm ``weight`` -> ``scale``, ``running_mean`` /
``running_var`` -> ``batch_stats`` ``mean`` / ``var``; ``num_batches_tracked`` is dropped.
The architecture (``ndf``, ``n_layers``, norm) is read off the keys. In a converted
directory the discriminator sits beside the autoencoder without changing what
``load_converted(dir, kind="tokenizer")`` returns (written by ``hart_jax.loading.discriminator_extras``,
read by ``hart_jax.loading.load_discriminator``):

    <dir>/discriminator/        Orbax PyTree {"params", "batch_stats"}
    <dir>/discriminator.json    its DiscriminatorConfig (ndf, n_layers, norm, in_channels)
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from hart_jax.convert.table import Rule, apply_table, conv2d
from hart_jax.errors import CheckpointError, ConversionError
from hart_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator

PREFIX = "disc."
IGNORE = (r"main\.\d+\.num_batches_tracked\Z",)


def discriminator_rules(cfg: DiscriminatorConfig) -> list[Rule]:
    """torch ``main.<i>.*`` (without ``disc.``) -> ``params/main_<i>/*`` and ``batch_stats/main_<i>/*``."""
    rules = []
    for i in cfg.conv_indices():
        rules += [Rule(f"main.{i}.weight", f"params/main_{i}/kernel", conv2d), Rule(f"main.{i}.bias", f"params/main_{i}/bias")]
    if cfg.norm != "none":
        for i in cfg.norm_indices():
            rules += [Rule(f"main.{i}.weight", f"params/main_{i}/scale"), Rule(f"main.{i}.bias", f"params/main_{i}/bias")]
            rules += [
                Rule(f"main.{i}.running_mean", f"batch_stats/main_{i}/mean"),
                Rule(f"main.{i}.running_var", f"batch_stats/main_{i}/var"),
            ]
    return rules


def expected_discriminator_variables(cfg: DiscriminatorConfig) -> dict[str, Any]:
    """ShapeDtypeStructs of ``{"params", "batch_stats"}`` for ``cfg`` (nothing allocated)."""
    model = NLayerDiscriminator(cfg)
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, cfg.in_channels)), train=False))
    return {"params": dict(v["params"]), "batch_stats": dict(v.get("batch_stats", {}))}


def infer_discriminator_config(state: Mapping[str, Any], source: str = "tokenizer") -> DiscriminatorConfig:
    """``ndf`` from ``main.0.weight``, ``n_layers`` from the number of convs (4-D weights),
    ``norm="batch"`` when running statistics are present (else ``"none"``)."""
    disc = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not disc:
        raise CheckpointError(f"{source}: no {PREFIX}* keys (this tokenizer checkpoint holds no discriminator)")
    if "main.0.weight" not in disc:
        raise ConversionError(f"{source}: discriminator: missing {PREFIX}main.0.weight (cannot tell ndf)")
    w0 = disc["main.0.weight"].shape
    convs = [k for k, v in disc.items() if re.fullmatch(r"main\.\d+\.weight", k) and len(v.shape) == 4]
    norm = "batch" if any(k.endswith(".running_mean") for k in disc) else "none"
    try:
        return DiscriminatorConfig(ndf=int(w0[0]), n_layers=len(convs) - 2, norm=norm, in_channels=int(w0[1]))
    except ValueError as e:
        raise ConversionError(f"{source}: discriminator: {e}") from None


def convert_discriminator_state(
    state: Mapping[str, Any],
    cfg: DiscriminatorConfig | None = None,
    *,
    source: str = "tokenizer",
    shapes_only: bool = False,
) -> tuple[DiscriminatorConfig, dict[str, Any]]:
    """The ``disc.*`` keys of a tokenizer state dict -> ``(config, {"params", "batch_stats"})``.

    Every missing, unexpected and mis-shaped key is reported in one one-line
    ``ConversionError``.
    """
    cfg = cfg or infer_discriminator_config(state, source)
    disc = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    try:
        out = apply_table(
            disc, discriminator_rules(cfg), expected_discriminator_variables(cfg), ignore=IGNORE,
            source=source, shapes_only=shapes_only, strip_prefixes=(PREFIX,),
        )
    except ConversionError as e:
        parts = [f"{kind}: {', '.join(items)}" for kind, items in e.problems.items()]
        raise ConversionError(
            f"{source}: discriminator keys do not fit NLayerDiscriminator(ndf={cfg.ndf}, n_layers={cfg.n_layers}, "
            f"norm={cfg.norm}): " + "; ".join(parts),
            list(e.problems.items()),
        ) from None
    out.setdefault("batch_stats", {})
    return cfg, out
