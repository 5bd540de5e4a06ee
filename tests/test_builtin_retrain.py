"""A shortened retraining of every stage of the built-in model (``hart_jax.builtin.retrain
--smoke``): the same code path as the full retraining, on a few images. Its own file so the
suite's workers can run it beside the rest of test_builtin.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_retrain_smoke_runs_every_stage(tmp_path):
    """A few steps of every stage on a few images: the same code path as the full retraining."""
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_backend_optimization_level=0")
    env.pop("JAX_PLATFORMS", None)
    out = tmp_path / "run"
    docs = tmp_path / "grids"
    docs.mkdir()
    (docs / "samples_step09999.png").write_bytes(b"an earlier run's grid")  # replaced, not kept
    r = subprocess.run([sys.executable, "-m", "hart_jax.builtin.retrain", str(out), "--smoke", "--docs", str(docs)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # one grid per checkpoint of each run (smoke: the first step, then every 2 of 4) + the demo grid
    assert sorted(p.name for p in docs.glob("*.png")) == [
        "samples_final.png", "samples_step00001.png", "samples_step00002.png", "samples_step00004.png",
        "tokenizer_step00001.png", "tokenizer_step00002.png", "tokenizer_step00004.png",
    ]
    summary = json.loads((out / "retrain.json").read_text())
    assert set(summary["seconds"]) == {"data", "text_encoder", "tokenizer", "codes", "transformer", "pipeline",
                                       "evaluate", "total"}
    assert 0.0 <= summary["faithfulness"]["accuracy"] <= 1.0
    from hart_jax.pipeline import HARTPipeline

    pipe = HARTPipeline.from_converted(out / "model")
    assert pipe(["a red circle"], seed=0).shape == (1, 32, 32, 3)
    # a second run into the same directory is refused without --force
    r = subprocess.run([sys.executable, "-m", "hart_jax.builtin.retrain", str(out), "--smoke"], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr.strip().splitlines()[-1]
