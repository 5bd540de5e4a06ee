"""Faithfulness of a text-to-image pipeline on the shapes prompts, judged by pixels.

Each prompt names a colour and a shape (``hart_jax.data.shapes``); an image counts as faithful
when ``hart_jax.data.shape_checker`` finds that colour AND that shape in it. Nothing here
asks the model anything: the verdict comes from the decoded pixels alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from hart_jax.data import shape_checker, shapes


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """A prompt and what it asks for."""

    text: str
    colour: str
    shape: str


def eval_prompts(n: int, seed: int = 0) -> list[EvalPrompt]:
    """``n`` varied prompts: every (colour, shape) pair in turn, each phrased at random as the
    dataset's captions are (optional size word, optional background)."""
    pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    rng = np.random.default_rng([int(seed), 7])
    out = []
    for i in range(int(n)):
        colour, shape = pairs[i % len(pairs)]
        size = ("", "small ", "large ")[int(rng.integers(3))]
        text = f"a {size}{colour} {shape}"
        if rng.random() < 0.4:
            text += f" on a {list(shapes.BACKGROUNDS)[int(rng.integers(len(shapes.BACKGROUNDS)))]} background"
        out.append(EvalPrompt(text, colour, shape))
    return out


@dataclasses.dataclass(frozen=True)
class Faithfulness:
    """Fraction of faithful images, per-part fractions, and every image with its verdict."""

    accuracy: float
    colour_accuracy: float
    shape_accuracy: float
    prompts: list[EvalPrompt]
    seeds: list[int]
    verdicts: list[shape_checker.ShapeVerdict]
    images: np.ndarray  # [N, H, W, 3] uint8

    def summary(self) -> str:
        """One line: the three fractions and the count."""
        return (f"{self.accuracy:.1%} faithful (colour {self.colour_accuracy:.1%}, shape {self.shape_accuracy:.1%}) "
                f"over {len(self.prompts)} samples")


def faithfulness(pipe: Any, n: int = 64, *, seed: int = 0, prompt_seed: int = 0, batch_size: int = 32,
                 **sampling: Any) -> Faithfulness:
    """Sample ``n`` images (image i: prompt i of ``eval_prompts(n, prompt_seed)``, seed ``seed + i``)
    with ``pipe`` (a ``HARTPipeline``; ``sampling`` goes to its call) and judge each by pixels."""
    prompts = eval_prompts(n, prompt_seed)
    seeds = [int(seed) + i for i in range(len(prompts))]
    images = pipe([p.text for p in prompts], seed=seeds, batch_size=min(batch_size, len(prompts)), **sampling)
    verdicts = [shape_checker.classify(im) for im in images]
    col = np.array([v.colour == p.colour for v, p in zip(verdicts, prompts)])
    shp = np.array([v.shape == p.shape for v, p in zip(verdicts, prompts)])
    return Faithfulness(float(np.mean(col & shp)), float(np.mean(col)), float(np.mean(shp)), prompts, seeds,
                        verdicts, np.asarray(images))


def tile_images(images: Sequence[np.ndarray], cols: int, scale: int = 1) -> np.ndarray:
    """Images tiled row-major into ``cols`` columns with a 2 px gap, upscaled by ``scale``
    (nearest), uint8."""
    imgs = np.asarray(images, np.uint8)
    n, h, w, c = imgs.shape
    rows = -(-n // cols)
    gap = 2
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, cols)
        canvas[gap + r * (h + gap): gap + r * (h + gap) + h, gap + q * (w + gap): gap + q * (w + gap) + w] = im
    return canvas.repeat(scale, 0).repeat(scale, 1) if scale > 1 else canvas
