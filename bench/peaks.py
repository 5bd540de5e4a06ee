"""Hardware limits the benches report against: known dense bf16 peaks and a measured one."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

# dense bf16 peaks (TFLOP/s) of known accelerators (vendor figures, without sparsity)
KNOWN_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def known_peak(device_kind: str) -> float:
    """The vendor's dense bf16 peak of ``device_kind`` in FLOP/s, 0 when unknown."""
    for name, tf in KNOWN_PEAKS.items():
        if name in device_kind:
            return tf * 1e12
    return 0.0


def matmul_peak(n: int = 2048, dtype: Any = jnp.float32, reps: int = 5) -> float:
    """Measured FLOP/s of an ``n^3`` matmul in ``dtype`` on the default device (best of ``reps``)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)
