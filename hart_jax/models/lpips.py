"""LPIPS (VGG16 trunk) perceptual distance in Flax Linen, NHWC, from a local weight file.

Dimensions (docs/design.md):
  B batch; R doubled batch (x then y through one trunk call); H height (image >= 16:
  four 2x2 max-pools before relu5_3; each level its own); W width (likewise);
  C channels (3, then per level 64, 128, 256, 512, 512).

The metric of the ``lpips`` package (``LPIPS(net='vgg')``, v0.1): images in [-1, 1]
-> ScalingLayer -> torchvision's ``vgg16().features`` up to relu5_3 -> each level's
features divided by their channel norm (+1e-10) -> squared difference -> 1x1 "lin"
conv (no bias) -> spatial mean -> sum over the five levels. Only inference is
modelled (no dropout, no ``spatial`` / ``lpips=False`` variants).

Weights come only from a local file (nothing is downloaded); see ``load_lpips_params``
for the accepted layouts. Reading them is a conversion on load (the one model module that
imports ``hart_jax.convert``, by design): the weights exist only as torch files (the
``lpips`` package's ``vgg.pth`` and torchvision's VGG16), never as a converted directory.
The parameters are frozen: ``lpips_distance`` stops their gradient, while gradients flow
to the images.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.convert.table import Rule, apply_table, conv_rules, conv2d, expected_params
from hart_jax.convert.torch_io import load_state_dict
from hart_jax.errors import CheckpointError, ConversionError

Dtype = Any
PrecisionLike = Any

# lpips' ScalingLayer: (x - shift) / scale, per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips.normalize_tensor
CHANNELS = (64, 128, 256, 512, 512)
LAYER_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# Convs per VGG16 block; a 2x2 max-pool precedes every block but the first.
BLOCK_DEPTHS = (2, 2, 3, 3, 3)
MIN_SIDE = 16


def _vgg_layout() -> list[tuple[int, int, str]]:
    """``(slice 1..5, torchvision features index, Flax name)`` of each of the 13 convs."""
    out, idx = [], 0
    for b, depth in enumerate(BLOCK_DEPTHS, start=1):
        if b > 1:
            idx += 1  # MaxPool2d
        for j in range(1, depth + 1):
            out.append((b, idx, f"conv{b}_{j}"))
            idx += 2  # Conv2d + ReLU
    return out


VGG_LAYOUT = _vgg_layout()  # conv indices 0, 2 | 5, 7 | 10, 12, 14 | 17, 19, 21 | 24, 26, 28


# --------------------------------------------------------------------- model
class VGG16Features(nn.Module):
    """torchvision ``vgg16().features[:30]``: five ReLU outputs, one per block."""

    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, ...]:
        feats = []
        h = x_BHWC
        for b, depth in enumerate(BLOCK_DEPTHS, start=1):
            if b > 1:
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")  # floor, as torch
            for j in range(1, depth + 1):
                c = CHANNELS[b - 1]
                h = nn.Conv(
                    c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    precision=self.precision, name=f"conv{b}_{j}",
                )(h)
                h = nn.relu(h)
            feats.append(h)
        return tuple(feats)


def _unit_normalize(f_BHWC: jax.Array) -> jax.Array:
    """``f / (||f||_channels + eps)``; the norm's gradient at an all-zero vector is 0, not NaN."""
    f_BHWC = f_BHWC.astype(jnp.float32)
    s_BHW1 = jnp.sum(f_BHWC * f_BHWC, axis=-1, keepdims=True)
    pos = s_BHW1 > 0
    norm_BHW1 = jnp.where(pos, jnp.sqrt(jnp.where(pos, s_BHW1, 1.0)), 0.0)
    return f_BHWC / (norm_BHW1 + EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG distance of NHWC images in [-1, 1]; ``__call__`` -> ``[B]`` fp32."""

    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self) -> None:
        self.net = VGG16Features(self.dtype, self.precision)
        self.lins = [
            nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, precision=self.precision, name=f"lin{k}")
            for k in range(len(CHANNELS))
        ]

    def per_layer(self, x_BHWC: jax.Array, y_BHWC: jax.Array) -> jax.Array:
        """Each level's contribution ``[B, L]`` (their sum is the distance)."""
        if x_BHWC.shape != y_BHWC.shape or x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two NHWC RGB images of one shape, got {x_BHWC.shape} and {y_BHWC.shape}")
        if min(x_BHWC.shape[1:3]) < MIN_SIDE:
            raise ValueError(f"LPIPS-VGG needs images of side >= {MIN_SIDE}, got {x_BHWC.shape[1:3]}")
        B = x_BHWC.shape[0]
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        xy_RHWC = jnp.concatenate([x_BHWC, y_BHWC], axis=0).astype(jnp.float32)
        xy_RHWC = (xy_RHWC - shift) / scale
        out = []
        for lin, f_RHWC in zip(self.lins, self.net(xy_RHWC.astype(self.dtype))):
            f_RHWC = _unit_normalize(f_RHWC)
            d_BHWC = jnp.square(f_RHWC[:B] - f_RHWC[B:])
            out.append(jnp.mean(lin(d_BHWC)[..., 0], axis=(1, 2)))
        return jnp.stack(out, axis=1)

    def __call__(self, x_BHWC: jax.Array, y_BHWC: jax.Array) -> jax.Array:
        return jnp.sum(self.per_layer(x_BHWC, y_BHWC), axis=1)


def lpips_distance(module: LPIPS, params: Mapping[str, Any], x_BHWC: jax.Array, y_BHWC: jax.Array) -> jax.Array:
    """LPIPS distance ``[B]`` fp32 of images in [-1, 1]; gradients reach the images, not ``params``."""
    if set(params) == {"params"}:  # a variables dict is accepted too
        params = params["params"]
    params = jax.lax.stop_gradient(params)
    return module.apply({"params": params}, x_BHWC, y_BHWC)


# ------------------------------------------------------------------- loading
def lpips_rules() -> list[Rule]:
    """torch key -> Flax path table of both accepted layouts (see ``load_lpips_params``)."""
    rules: list[Rule] = []
    for s, i, name in VGG_LAYOUT:
        rules += conv_rules(f"net.slice{s}.{i}", f"net/{name}")  # lpips' LPIPS.state_dict()
        rules += conv_rules(f"features.{i}", f"net/{name}")  # torchvision vgg16().state_dict()
    for k in range(len(CHANNELS)):
        for j in (1, 0):  # NetLinLayer with / without its Dropout
            rules.append(Rule(f"lin{k}.model.{j}.weight", f"lin{k}/kernel", conv2d))
    return rules


IGNORE = (r"classifier\.",)  # torchvision's fully connected head
_LINS_RE = re.compile(r"lins\.(\d+)\.(.*)\Z")


def expected_lpips_params() -> dict[str, Any]:
    """Shapes of ``LPIPS``'s params (``jax.eval_shape``; nothing allocated)."""
    img = jnp.zeros((1, MIN_SIDE, MIN_SIDE, 3), jnp.float32)
    return expected_params(lambda: LPIPS().init(jax.random.PRNGKey(0), img, img))


def _lpips_key(path: str) -> str:
    """The ``lpips``-layout torch key of a Flax path (for reports)."""
    for s, i, name in VGG_LAYOUT:
        if path.startswith(f"net/{name}/"):
            return f"net.slice{s}.{i}." + ("weight" if path.endswith("kernel") else "bias")
    return f"{path.split('/')[0]}.model.1.weight"


def _one_line(src: str, e: ConversionError) -> str:
    """``apply_table``'s report on one line; missing parameters named by their lpips torch key."""
    parts = []
    for kind, items in e.problems.items():
        if kind.startswith("missing"):
            items = [_lpips_key(it.split(" ")[0]) for it in items]
        shown = "; ".join(items[:16]) + (f"; ... and {len(items) - 16} more" if len(items) > 16 else "")
        parts.append(f"{kind.split(' (')[0]} {len(items)}: {shown}")
    missing = e.problems.get("missing (model parameter with no source key)", [])
    hint = ""
    if sum(m.startswith("net/") for m in missing) == 2 * len(VGG_LAYOUT):
        hint = " (no VGG16 trunk: combine torchvision's vgg16 weights with the lin layers, see docs/training.md)"
    return f"{src}: not an LPIPS-VGG state dict: " + " | ".join(parts) + hint


def _canonical(state: Mapping[str, Any], src: str) -> dict[str, Any]:
    """Fold ``lins.{k}.*`` (LPIPS's ModuleList alias) into ``lin{k}.*``; check the scaling buffers."""
    out: dict[str, Any] = {}
    aliases: dict[str, Any] = {}
    for key, value in state.items():
        m = _LINS_RE.match(key)
        if m:
            aliases[f"lin{m.group(1)}.{m.group(2)}"] = (key, value)
        elif key in ("scaling_layer.shift", "scaling_layer.scale"):
            want = np.asarray(SHIFT if key.endswith("shift") else SCALE, np.float32)
            got = np.asarray(value, np.float32)
            if got.size != 3 or not np.allclose(got.reshape(3), want, rtol=0, atol=1e-6):
                raise CheckpointError(f"{src}: {key} is {got.reshape(-1).tolist()}, expected {want.tolist()}")
        else:
            out[key] = value
    for key, (orig, value) in aliases.items():
        if key not in out:
            out[key] = value
        elif np.shape(out[key]) != np.shape(value) or not np.array_equal(out[key], value):
            raise CheckpointError(f"{src}: {orig} and {key} differ (both name the same lin layer)")
    return out


def load_lpips_params(path: str | os.PathLike) -> dict[str, Any]:
    """Read a local LPIPS-VGG weight file into ``LPIPS``'s params (fp32 jax arrays).

    ``.safetensors``, or a torch state dict (``.pth`` / ``.pt`` / ``.bin``, loaded with
    ``weights_only=True``) holding:
      - the trunk as ``net.slice{s}.{i}.weight|bias`` (``lpips.LPIPS(net='vgg').state_dict()``)
        or as torchvision's ``features.{i}.weight|bias`` (``classifier.*`` is ignored);
      - the five lin layers as ``lin{k}.model.1.weight`` (``weights/v0.1/vgg.pth``),
        ``lin{k}.model.0.weight`` (no dropout) or ``lins.{k}.model.*.weight`` (equal copies merge);
      - optionally ``scaling_layer.shift|scale``, which must hold lpips' constants.
    Any problem is a one-line ``CheckpointError`` naming the file and every offending key.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found")
    try:
        raw = load_state_dict(p)
    except CheckpointError as e:  # keep the report on one line
        raise CheckpointError(" ".join(str(e).split())) from None
    state = _canonical(raw, str(p))
    try:
        params = apply_table(state, lpips_rules(), expected_lpips_params(), ignore=IGNORE, source=str(p))
    except ConversionError as e:
        raise CheckpointError(_one_line(str(p), e)) from None
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def load_lpips(
    path: str | os.PathLike, *, dtype: Dtype = jnp.float32, precision: PrecisionLike = None
) -> tuple[LPIPS, dict[str, Any]]:
    """``(LPIPS module, params)`` from a local weight file; use with ``lpips_distance``."""
    return LPIPS(dtype=dtype, precision=precision), load_lpips_params(path)
