"""Judge an image of the built-in shapes dataset by its pixels (no model involved).

``classify(image)`` returns a ``ShapeVerdict``: which named colour (``shapes.COLOURS``) and
which shape (``shapes.SHAPES``) the image shows, or ``None`` for either when it cannot tell.

  background   the per-channel median of the outermost ring of pixels (2 px wide from 32 px
               up, 1 px below);
  foreground   ``d`` = each pixel's RGB distance to the background. Pixels with
               ``d > MIN_CONTRAST`` are candidates (fewer than ``MIN_FRACTION`` of the
               image: nothing there); ``ref`` = the 75th percentile of the candidates' ``d``
               (the shape's own contrast); the largest 4-connected component of
               ``d > ref / 2`` is the shape. Soft weights ``clip((d / ref - 0.2) / 0.6, 0, 1)``
               (a symmetric ramp, so anti-aliased or blurred edges count by their coverage)
               in that component grown by 2 px are its mask;
  colour       the hue of the median colour of the component's core (``d >= 0.8 ref``)
               nearest to a named colour's hue (robust to brightness / saturation shifts);
               ``None`` when that colour is nearly grey (chroma < ``MIN_CHROMA``);
  shape        for each shape, the template whose centre and extent match the soft mask's
               first and second moments (square: var = side^2 / 12; disk: var = (side/4)^2;
               upright triangle with base b, height h: var_x = b^2 / 24, var_y = h^2 / 18,
               centroid 2/3 of the way down), rendered anti-aliased; the score is the soft IoU
               ``sum(min(mask, t)) / sum(max(mask, t))``; the best score wins if it is at
               least ``MIN_SCORE``, otherwise ``None``.

``fill_ratio`` (mask area over its sub-pixel bounding box: square ~1, disk ~pi/4, triangle
~1/2) is reported, not used. Works at any resolution >= 16.
"""

from __future__ import annotations

import colorsys
import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np

from hart_jax.data.shapes import COLOURS, SHAPES, ShapeSpec, coverage

MIN_CONTRAST = 40.0  # RGB distance below which a pixel is background
MIN_FRACTION = 0.01  # a foreground smaller than this share of the image is "nothing"
MIN_CHROMA = 40.0  # max - min channel of the foreground colour below which it is "grey"
MIN_SCORE = 0.6  # the best template IoU must reach this to name a shape

_HUES = {name: colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0] * 360.0 for name, rgb in COLOURS.items()}


@dataclasses.dataclass(frozen=True)
class ShapeVerdict:
    """What ``classify`` saw. ``colour`` / ``shape``: names, or ``None`` when undecided;
    ``background_rgb`` / ``foreground_rgb``: median colours (``foreground_rgb`` ``None`` when
    empty); ``foreground_fraction``: soft mask area over image area; ``fill_ratio``: mask area
    over its bounding box area; ``scores``: template IoU per shape; ``bbox``: the mask's
    sub-pixel bounding box ``(x0, y0, x1, y1)`` in pixels."""

    colour: str | None
    shape: str | None
    background_rgb: tuple[float, float, float]
    foreground_rgb: tuple[float, float, float] | None = None
    foreground_fraction: float = 0.0
    fill_ratio: float = 0.0
    scores: Mapping[str, float] = dataclasses.field(default_factory=dict, compare=False)
    bbox: tuple[float, float, float, float] | None = None


def _border(img: np.ndarray) -> np.ndarray:
    b = 2 if min(img.shape[:2]) >= 32 else 1
    return np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                           img[b:-b, :b].reshape(-1, 3), img[b:-b, -b:].reshape(-1, 3)])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean ``[H, W]`` mask (empty in, empty out)."""
    h, w = mask.shape
    n = h * w
    if not mask.any():
        return mask.copy()
    lab = np.where(mask, np.arange(n).reshape(h, w), n)
    while True:  # min-label propagation with pointer jumping
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, n)
        ext = np.append(new.ravel(), n)
        for _ in range(4):
            new = ext[new]
            ext = np.append(new.ravel(), n)
        if np.array_equal(new, lab):
            break
        lab = new
    counts = np.bincount(lab[mask], minlength=n)
    return lab == int(np.argmax(counts))


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def colour_name(rgb: Sequence[float]) -> str | None:
    """The named colour whose hue is nearest to ``rgb``'s; ``None`` for a near-grey ``rgb``."""
    r, g, b = (float(v) for v in rgb)
    if max(r, g, b) - min(r, g, b) < MIN_CHROMA:
        return None
    hue = colorsys.rgb_to_hsv(r / 255.0, g / 255.0, b / 255.0)[0] * 360.0
    return min(_HUES, key=lambda k: min(abs(hue - _HUES[k]), 360.0 - abs(hue - _HUES[k])))


def _templates(w: np.ndarray) -> dict[str, tuple[float, float, float, float]]:
    """Per shape, the box whose template has ``w``'s centroid and second moments."""
    h, wd = w.shape
    a = w.sum()
    ys, xs = np.mgrid[:h, :wd] + 0.5
    cx, cy = (w * xs).sum() / a, (w * ys).sum() / a
    vx = max((w * (xs - cx) ** 2).sum() / a, 1e-6)
    vy = max((w * (ys - cy) ** 2).sum() / a, 1e-6)
    out = {}
    for shape, (kx, ky) in {"square": (12.0, 12.0), "circle": (16.0, 16.0), "triangle": (24.0, 18.0)}.items():
        bw, bh = np.sqrt(kx * vx), np.sqrt(ky * vy)
        top = cy - (2.0 / 3.0 if shape == "triangle" else 0.5) * bh
        out[shape] = (cx - bw / 2, top, cx + bw / 2, top + bh)
    return out


def classify(image: np.ndarray) -> ShapeVerdict:
    """The colour and shape that an ``[H, W, 3]`` uint8 image shows (see the module docstring)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or min(img.shape[:2]) < 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {img.shape}")
    img = img.astype(np.float32)
    bg = np.median(_border(img), axis=0)
    bg_t = tuple(float(v) for v in bg)
    d = np.linalg.norm(img - bg, axis=-1)
    n = d.size
    cand = d > MIN_CONTRAST
    if cand.sum() < MIN_FRACTION * n:
        return ShapeVerdict(None, None, bg_t)
    ref = float(np.percentile(d[cand], 75))
    comp = largest_component(d > max(ref / 2, MIN_CONTRAST))
    if comp.sum() < MIN_FRACTION * n:
        return ShapeVerdict(None, None, bg_t)
    w = np.clip((d / ref - 0.2) / 0.6, 0.0, 1.0) * _dilate(comp, 2)
    core = comp & (d >= 0.8 * ref)
    fg = np.median(img[core if core.sum() >= 4 else comp], axis=0)
    fg_t = tuple(float(v) for v in fg)
    area = float(w.sum())
    px, py = w.max(axis=0), w.max(axis=1)
    cols, rows = np.nonzero(px > 0)[0], np.nonzero(py > 0)[0]
    bw, bh = float(px.sum()), float(py.sum())
    bbox = (float(cols[0]), float(rows[0]), float(cols[0]) + bw, float(rows[0]) + bh)
    scores = {}
    for shape, box in _templates(w).items():
        t = coverage(shape, box, w.shape)
        scores[shape] = float(np.minimum(w, t).sum() / np.maximum(w, t).sum())
    best = max(scores, key=scores.get)
    return ShapeVerdict(
        colour=colour_name(fg),
        shape=best if scores[best] >= MIN_SCORE else None,
        background_rgb=bg_t,
        foreground_rgb=fg_t,
        foreground_fraction=area / n,
        fill_ratio=area / max(bw * bh, 1e-6),
        scores=scores,
        bbox=bbox,
    )


def matches(image: np.ndarray, colour: str, shape: str) -> bool:
    """Whether ``image`` shows a ``colour`` ``shape``."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {colour!r}/{shape!r}; colours {list(COLOURS)}, shapes {SHAPES}")
    v = classify(image)
    return v.colour == colour and v.shape == shape


def accuracy(images: Iterable[np.ndarray], specs: Iterable[ShapeSpec | Mapping | tuple[str, str]]) -> float:
    """Share of ``images`` that ``matches`` their spec (a ``ShapeSpec``, an ``example`` dict, or
    a ``(colour, shape)`` pair)."""
    hits = total = 0
    for img, spec in zip(images, specs, strict=True):
        if isinstance(spec, ShapeSpec):
            colour, shape = spec.colour, spec.shape
        elif isinstance(spec, Mapping):
            colour, shape = spec["colour"], spec["shape"]
        else:
            colour, shape = spec
        hits += matches(img, colour, shape)
        total += 1
    if not total:
        raise ValueError("accuracy of no images")
    return hits / total
