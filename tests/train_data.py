"""Small, structured training datasets made in the tests (shapes of colours, not noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 230), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square", "stripes", "cross")


def draw(shape: str, color: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` uint8 image: a coloured shape on a light background."""
    y, x = np.mgrid[:size, :size] / size
    cy, cx = 0.5 + 0.1 * rng.uniform(-1, 1, 2)
    if shape == "circle":
        m = (y - cy) ** 2 + (x - cx) ** 2 < 0.09
    elif shape == "square":
        m = (abs(y - cy) < 0.28) & (abs(x - cx) < 0.28)
    elif shape == "stripes":
        m = (np.floor(x * 6) % 2) == 0
    else:
        m = (abs(y - cy) < 0.1) | (abs(x - cx) < 0.1)
    img = np.full((size, size, 3), 235, np.uint8)
    img[m] = color
    return img


def examples(n: int, size: int = 32, *, kind: str = "t2i", context_shape=(6, 24), seed: int = 0) -> list[dict]:
    """``n`` examples; t2i rows carry a caption and its cached embedding (one fixed vector
    per word, zero padding), c2i rows a label = shape index."""
    rng = np.random.default_rng(seed)
    words = sorted(set(COLORS) | set(SHAPES) | {"a"})
    table = np.random.default_rng(123).normal(size=(len(words), context_shape[1])).astype(np.float32)
    out = []
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        row = {"image": draw(shape, COLORS[color], size, rng), "id": i}
        if kind == "t2i":
            caption = f"a {color} {shape}"
            t = context_shape[0]
            ctx = np.zeros(context_shape, np.float32)
            toks = caption.split()
            for j, w in enumerate(toks):
                ctx[j] = table[words.index(w)]
            mask = np.arange(t) < len(toks)
            row.update(caption=caption, context=ctx, context_mask=mask, context_position_ids=np.cumsum(mask) - 1)
        else:
            row["label"] = SHAPES.index(shape)
        out.append(row)
    return out


def write(out_dir: Path, n: int = 32, *, kind: str = "t2i", name: str = "shapes", **kw) -> Path:
    """Write the dataset with ``hart_jax.data.records.write_records``; returns the version dir."""
    from hart_jax.data.records import write_records

    ctx = kw.pop("context_shape", (6, 24))
    rows = examples(n, kind=kind, context_shape=ctx, **kw)
    if kind == "t2i":
        return write_records(out_dir, rows, name=name, kind="t2i", context_shape=ctx, context_dtype="float32")
    return write_records(out_dir, rows, name=name, kind="c2i", num_classes=len(SHAPES))
