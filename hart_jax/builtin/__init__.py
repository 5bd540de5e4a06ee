"""The built-in default model: a small text-to-image HART trained by hart-jax itself on the
procedural shapes dataset (``hart_jax.data.shapes``), shipped in the converted-pipeline layout
that ``sample.py --ckpt`` reads, and the recipe that retrains it from nothing.

``DEFAULT_CKPT`` is the shipped pipeline directory; ``python sample.py`` without ``--ckpt``
uses it. ``python -m hart_jax.builtin.retrain OUT_DIR`` rebuilds it (see that module).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CKPT = Path(__file__).resolve().parent / "shapes-32px"
