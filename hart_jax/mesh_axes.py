"""Mesh-axis bookkeeping shared by the training shardings and the attention kernels' ``shard_map``."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping


def axes_tuple(rule: Any) -> tuple[str, ...]:
    """A logical rule's mesh axes as a tuple (``None`` -> ``()``, ``"x"`` -> ``("x",)``)."""
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def dividing_axes(
    names: Iterable[str], dim: int, mesh_shape: Mapping[str, int], used: Iterable[str] = ()
) -> tuple[str, ...]:
    """The axes of ``names``, in order, that together split ``dim`` evenly.

    An axis already in ``used`` (each mesh axis shards one dimension), absent from the
    mesh, of size 1, or whose size would no longer divide ``dim`` is skipped: that part
    of the dimension stays replicated rather than failing.
    """
    taken = set(used)
    keep: list[str] = []
    for ax in names:
        if ax in taken or ax in keep or ax not in mesh_shape or mesh_shape[ax] == 1:
            continue
        if dim % (math.prod(mesh_shape[a] for a in keep) * mesh_shape[ax]):
            continue
        keep.append(ax)
    return tuple(keep)


def spec_entry(axes: tuple[str, ...]) -> Any:
    """One ``PartitionSpec`` entry for a dimension split over ``axes`` (None, an axis, or a tuple)."""
    return None if not axes else axes[0] if len(axes) == 1 else axes
