"""Reading PyTorch checkpoints (safetensors / ``.bin``) and key manifests.

Every failure becomes a one-line ``CheckpointError`` that names the file. torch is
imported lazily: it is needed only for ``.bin`` files and bf16/fp16 safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import numpy as np

from hart_jax.checkpoint import read_json
from hart_jax.errors import CheckpointError

WEIGHT_FILE_ORDER = ("model.safetensors", "pytorch_model.bin")


def find_weight_file(src_dir: str | os.PathLike, preferred: Sequence[str] = WEIGHT_FILE_ORDER) -> Path:
    """First existing file of ``preferred`` in ``src_dir``, else the only other ``*.bin``."""
    d = Path(src_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    for name in preferred:
        if (d / name).is_file():
            return d / name
    bins = sorted(p for p in d.glob("*.bin") if p.is_file())
    if len(bins) == 1:
        return bins[0]
    found = ", ".join(p.name for p in sorted(d.iterdir())) or "nothing"
    if len(bins) > 1:
        raise CheckpointError(
            f"{d}: several .bin files ({', '.join(b.name for b in bins)}) and none of "
            f"{', '.join(preferred)}; name the weight file explicitly"
        )
    raise CheckpointError(f"{d}: no weights found (looked for {', '.join(preferred)} or a *.bin; found {found})")


C = TypeVar("C")


def read_config(path: str | os.PathLike, from_dict: Callable[..., C]) -> C:
    """``from_dict(<parsed JSON>, source=path)``; a rejected config becomes a
    ``CheckpointError`` whose message names the file."""
    p = Path(path)
    d = read_json(p)
    try:
        return from_dict(d, source=str(p))
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e) if str(p) in str(e) else f"{p}: {e}") from None


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy (bf16/fp16 widened to fp32)."""
    p = Path(path)
    try:
        from safetensors import safe_open

        out = {}
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                out[k] = _to_numpy(f.get_tensor(k))
        return out
    except FileNotFoundError:
        raise CheckpointError(f"{p}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for bad headers/data
        raise CheckpointError(f"{p}: not a readable safetensors file (truncated or foreign?): {e}") from None


def load_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``torch.save``d state dict, loaded with ``weights_only=True``."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint (truncated or foreign?): {msg}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{p}: entry {k!r} is a {type(v).__name__}, not a tensor; is this a state dict?")
        out[str(k)] = _to_numpy(v)
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load ``.safetensors`` or a torch ``.bin``/``.pt`` state dict by extension."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return load_safetensors(p)
    return load_torch_bin(p)


def load_manifest(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """A ``{key: [shape, dtype]}`` key manifest as ShapeDtypeStructs (no weights)."""
    d = read_json(path)
    out = {}
    for k, v in d.items():
        try:
            shape, dtype = v
            out[k] = jax.ShapeDtypeStruct(tuple(int(s) for s in shape), np.dtype(dtype))
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: entry {k!r} is not [shape, dtype]") from None
    return out
