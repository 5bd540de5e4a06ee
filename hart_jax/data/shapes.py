"""A built-in procedural dataset: one coloured shape on a plain background (no download).

Legend:
  colours      ``COLOURS`` (6 saturated colours: red, green, blue, yellow, magenta, cyan)
  shapes       ``SHAPES`` = circle (disk), square (axis-aligned), triangle (upright, apex up,
               base = height = the bounding-box side)
  backgrounds  ``BACKGROUNDS`` (neutral: grey, white, black, beige; far from every colour)
  size         side of the shape's bounding box as a fraction of the image side, U[0.4, 0.75]
  centre       (cx, cy) in [0, 1], chosen so the shape keeps >= 1 px from every edge at any
               resolution >= 16
  class id     ``colour_index * len(SHAPES) + shape_index`` (``NUM_CLASSES`` = 18)

Example ``i`` of seed ``s`` depends on ``(s, i)`` alone (``np.random.default_rng([s, i])``),
so a dataset's first examples do not change with its length. Images are anti-aliased:
rendered at 4x (the shape tested at every point of the 4x grid) and area-downsampled.

    python -m hart_jax.data.shapes OUT_DIR --num N --resolution R [--seed 0] [--name shapes]
        [--split train] [--kind t2i|c2i] [--text-encoder DIR] [--tokenizer DIR
        [--patch-nums 1,2,...]] [--batch-size 8]

writes the TFDS array_record dataset ``OUT_DIR/NAME/1.0.0`` (t2i: image, caption, id;
c2i: image, label, id) through the same code as ``hart_jax.data.make_records``.
``hart_jax.data.shape_checker`` judges images of this kind by their pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hart_jax.errors import OneLineArgumentParser

RGB = tuple[int, int, int]

COLOURS: "OrderedDict[str, RGB]" = OrderedDict(
    [
        ("red", (220, 30, 30)),
        ("green", (30, 180, 50)),
        ("blue", (40, 70, 230)),
        ("yellow", (235, 210, 30)),
        ("magenta", (210, 40, 200)),
        ("cyan", (30, 200, 210)),
    ]
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: "OrderedDict[str, RGB]" = OrderedDict(
    [
        ("grey", (128, 128, 128)),
        ("white", (240, 240, 240)),
        ("black", (25, 25, 25)),
        ("beige", (210, 200, 180)),
    ]
)
NUM_CLASSES: int = len(COLOURS) * len(SHAPES)
SIZE_RANGE: tuple[float, float] = (0.4, 0.75)
SMALL, LARGE = 0.5, 0.65  # caption size words: "small" below SMALL, "large" above LARGE
MIN_RESOLUTION = 16
_MARGIN = 1.0 / MIN_RESOLUTION  # 1 px at the smallest resolution, more at larger ones
_SUPERSAMPLE = 4

PROMPTS: tuple[str, ...] = (
    "a red circle",
    "a green square",
    "a blue triangle",
    "a yellow circle",
    "a magenta square",
    "a cyan triangle",
    "a blue circle",
    "a red square",
    "a green triangle",
)


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One image: ``colour`` / ``shape`` / ``background`` names, ``size`` (bounding-box side
    over image side) and ``centre`` ``(cx, cy)`` in image fractions (y down)."""

    colour: str
    shape: str
    background: str
    size: float
    centre: tuple[float, float]

    def box(self) -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)`` in image fractions."""
        h = self.size / 2
        cx, cy = self.centre
        return cx - h, cy - h, cx + h, cy + h


def class_id(colour: str, shape: str) -> int:
    """``colour_index * len(SHAPES) + shape_index``."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def class_name(cid: int) -> tuple[str, str]:
    """The ``(colour, shape)`` of a class id (inverse of ``class_id``)."""
    if not 0 <= int(cid) < NUM_CLASSES:
        raise ValueError(f"class id must be in [0, {NUM_CLASSES}), got {cid}")
    c, s = divmod(int(cid), len(SHAPES))
    return list(COLOURS)[c], SHAPES[s]


def class_names() -> list[str]:
    """``"colour shape"`` for every class id, in id order."""
    return [" ".join(class_name(i)) for i in range(NUM_CLASSES)]


def sample_spec(rng: np.random.Generator) -> ShapeSpec:
    """Uniform colour, shape and background; size in ``SIZE_RANGE``; a centre that keeps the
    whole shape >= 1 px inside the image at any resolution >= 16."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = float(rng.uniform(*SIZE_RANGE))
    lo, hi = size / 2 + _MARGIN, 1 - size / 2 - _MARGIN
    cx, cy = (float(v) for v in rng.uniform(lo, hi, 2))
    return ShapeSpec(colour, shape, background, size, (cx, cy))


def coverage(shape: str, box: tuple[float, float, float, float], resolution: int | tuple[int, int],
             supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased ``[R, R]`` (or ``[H, W]`` for ``resolution=(H, W)``) float32 coverage in
    [0, 1] of ``shape`` filling ``box`` (``x0, y0, x1, y1`` in pixels, y down): the shape
    tested at the centres of a ``supersample``-times finer grid, then area-averaged."""
    hh, ww = (int(resolution), int(resolution)) if np.isscalar(resolution) else (int(v) for v in resolution)
    k = int(supersample)
    x = (np.arange(ww * k, dtype=np.float64)[None, :] + 0.5) / k
    y = (np.arange(hh * k, dtype=np.float64)[:, None] + 0.5) / k
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "square":
        m = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    elif shape == "circle":
        m = ((x - (x0 + x1) / 2) / (w / 2)) ** 2 + ((y - (y0 + y1) / 2) / (h / 2)) ** 2 <= 1.0
    elif shape == "triangle":  # apex at the top centre, base along the bottom edge
        m = (y >= y0) & (y < y1) & (np.abs(x - (x0 + x1) / 2) <= (y - y0) / h * w / 2)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return np.broadcast_to(m, (hh * k, ww * k)).reshape(hh, k, ww, k).mean(axis=(1, 3), dtype=np.float32)


def render(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """The ``[R, R, 3]`` uint8 image of ``spec``."""
    r = int(resolution)
    if r < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION}, got {r}")
    box = tuple(v * r for v in spec.box())
    a = coverage(spec.shape, box, r)[..., None]
    bg = np.asarray(BACKGROUNDS[spec.background], np.float32)
    fg = np.asarray(COLOURS[spec.colour], np.float32)
    return np.rint(bg + a * (fg - bg)).astype(np.uint8)


def size_word(size: float) -> str | None:
    """``"small"`` / ``"large"`` / ``None`` (middle sizes get no word)."""
    return "small" if size < SMALL else "large" if size > LARGE else None


def caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A lower-case caption naming the colour and the shape exactly once (optionally the
    size word and the background)."""
    with_size, with_background = rng.random() < 0.5, rng.random() < 0.4
    sw = size_word(spec.size)
    text = f"a {sw + ' ' if sw and with_size else ''}{spec.colour} {spec.shape}"
    if with_background:
        text += f" on a {spec.background} background"
    return text


def example(index: int, seed: int = 0, resolution: int = 64) -> dict[str, Any]:
    """Example ``index`` of dataset ``seed``: ``image`` ``[R, R, 3]`` uint8, ``caption``,
    ``label`` (class id), ``id`` (= index), ``colour``, ``shape``, ``background``, ``size``;
    a function of ``(seed, index)`` only."""
    rng = np.random.default_rng([int(seed), int(index)])
    spec = sample_spec(rng)
    return {
        "image": render(spec, resolution),
        "caption": caption(spec, rng),
        "label": class_id(spec.colour, spec.shape),
        "id": int(index),
        "colour": spec.colour,
        "shape": spec.shape,
        "background": spec.background,
        "size": spec.size,
        "spec": spec,
    }


def examples(num: int, resolution: int = 64, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``example(i, seed, resolution)`` for ``i`` in ``range(num)``."""
    for i in range(int(num)):
        yield example(i, seed, resolution)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (argument errors: one ``error: ...`` line, exit 2)."""
    ap = OneLineArgumentParser(prog="python -m hart_jax.data.shapes", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="data directory; the dataset goes to OUT_DIR/NAME/1.0.0")
    ap.add_argument("--num", type=int, required=True, help="number of examples")
    ap.add_argument("--resolution", type=int, required=True, help=f"image side in pixels (>= {MIN_RESOLUTION})")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (example i depends on (seed, i) only)")
    ap.add_argument("--name", default="shapes", help="dataset name (default: shapes)")
    ap.add_argument("--kind", default="t2i", help="t2i (image + caption) or c2i (image + class label)")
    from hart_jax.data.make_records import add_cache_arguments

    add_cache_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module docstring); returns the exit status."""
    from hart_jax.data.make_records import build_records, parse_patch_nums
    from hart_jax.data.records import DEFAULT_VERSION

    args = build_parser().parse_args(argv)
    try:
        if args.num < 1:
            raise ValueError(f"--num must be >= 1, got {args.num}")
        if args.resolution < MIN_RESOLUTION:
            raise ValueError(f"--resolution must be >= {MIN_RESOLUTION}, got {args.resolution}")
        if args.kind not in ("t2i", "c2i"):
            raise ValueError(f"--kind must be 't2i' or 'c2i', got {args.kind!r}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        final = Path(args.out_dir) / args.name / DEFAULT_VERSION
        if final.exists():
            raise FileExistsError(f"{final} already exists; remove it or choose another name")
        rows = examples(args.num, args.resolution, args.seed)
        if args.kind == "c2i":
            rows = ({k: e[k] for k in ("image", "label", "id")} for e in rows)
        else:
            rows = ({k: e[k] for k in ("image", "caption", "id")} for e in rows)
        out = build_records(
            rows, args.out_dir, name=args.name, kind=args.kind, split=args.split,
            text_encoder=args.text_encoder, tokenizer=args.tokenizer,
            patch_nums=parse_patch_nums(args.patch_nums), batch_size=args.batch_size,
            context_dtype=args.context_dtype, class_names=class_names() if args.kind == "c2i" else None,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num} examples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
