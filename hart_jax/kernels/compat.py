"""The few Pallas names that move between JAX versions, looked up in one place.

The kernels are written for the Pallas Triton backend. Its 2-D matmul is
``jax.experimental.pallas.triton.dot`` (``pl.dot`` is a deprecated alias); a
squeezed block dimension is ``pl.squeezed`` (formerly ``None``); masked loads and stores
are ``pallas.triton.load`` / ``store`` (formerly ``pl.load`` / ``pl.store``). The class holding its
compiler parameters is ``jax.experimental.pallas.triton.CompilerParams`` on the
pinned JAX 0.10.2 and on 0.11.x; older releases called it
``TritonCompilerParams`` (in ``pallas.triton`` or ``pallas.gpu``) or exposed it
as ``pl.GPUCompilerParams``. Every lookup of such a name goes through here.
"""

from __future__ import annotations

import functools
from typing import Any

from jax.experimental import pallas as pl

try:  # JAX >= 0.7 keeps the Triton dot here; pl.dot is deprecated
    from jax.experimental.pallas.triton import dot as _triton_dot
except ImportError:  # pragma: no cover - older JAX
    _triton_dot = None

try:  # masked loads / stores (JAX >= 0.7: pallas.triton.load / store on a ref view)
    from jax.experimental.pallas.triton import load as _triton_load
    from jax.experimental.pallas.triton import store as _triton_store
except ImportError:  # pragma: no cover - older JAX: pl.load / pl.store with an index
    _triton_load = _triton_store = None


# A block dimension that is indexed away (size 1, not present in the kernel's ref).
# ``pl.squeezed`` on current JAX; ``None`` meant the same before it existed.
SQUEEZED = getattr(pl, "squeezed", None)


def dot(a, b, trans_a: bool = False, trans_b: bool = False, precision=None):
    """Pallas 2-D matmul with fp32 accumulation (``pallas.triton.dot``, formerly ``pl.dot``)."""
    fn = _triton_dot if _triton_dot is not None else pl.dot
    return fn(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def load(ref, mask=None, other=None):
    """Read the whole of ``ref`` (a ref or a ``ref.at[...]`` view); where ``mask`` (broadcast to
    its shape) is False nothing is read and ``other`` is returned. Rows past the end of the
    array may only be read masked (on the GPU they are outside the buffer)."""
    if mask is None:
        return ref[...]
    if _triton_load is not None:
        return _triton_load(ref, mask=mask, other=other)
    return pl.load(ref, (), mask=mask, other=other)  # pragma: no cover


def store(ref, val, mask=None) -> None:
    """Write ``val`` to the whole of ``ref``, only where ``mask`` (broadcast) is True."""
    if mask is None:
        ref[...] = val
    elif _triton_store is not None:
        _triton_store(ref, val, mask=mask)
    else:  # pragma: no cover
        pl.store(ref, (), val, mask=mask)


@functools.lru_cache(maxsize=None)
def _triton_params_class() -> type:
    candidates: list[tuple[str, str]] = [
        ("jax.experimental.pallas.triton", "CompilerParams"),
        ("jax.experimental.pallas.triton", "TritonCompilerParams"),
        ("jax.experimental.pallas.gpu", "TritonCompilerParams"),
    ]
    import importlib

    for module_name, attr in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, attr, None)
        if cls is not None:
            return cls
    cls = getattr(pl, "GPUCompilerParams", None) or getattr(pl, "TritonCompilerParams", None)
    if cls is None:
        raise ImportError(
            "this JAX has no Pallas Triton compiler-params class "
            "(looked for pallas.triton.CompilerParams, TritonCompilerParams, pl.GPUCompilerParams)"
        )
    return cls


def triton_compiler_params(num_warps: int, num_stages: int) -> Any:
    """Explicit Triton compiler parameters (the default GPU lowering changes between versions)."""
    return _triton_params_class()(num_warps=num_warps, num_stages=num_stages)
