"""Which mesh axes split a dimension: shared by the training shardings and the kernels' shard_map."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from hart_jax.mesh_axes import axes_tuple, dividing_axes
from hart_jax.train.sharding import DEFAULT_RULES, make_mesh, spec_for

SHAPE = {"data": 2, "fsdp": 4, "tensor": 2, "one": 1}


def test_axes_tuple():
    assert axes_tuple(None) == () and axes_tuple("fsdp") == ("fsdp",) and axes_tuple(["data", "fsdp"]) == ("data", "fsdp")


def test_dividing_axes_keeps_the_axes_that_split_evenly_in_order():
    assert dividing_axes(("data", "fsdp"), 8, SHAPE) == ("data", "fsdp")
    assert dividing_axes(("data", "fsdp"), 4, SHAPE) == ("data",)  # 2 x 4 does not divide 4
    assert dividing_axes(("fsdp", "data"), 4, SHAPE) == ("fsdp",)
    assert dividing_axes(("data", "fsdp", "tensor"), 6, SHAPE) == ("data",)
    assert dividing_axes(("tensor",), 3, SHAPE) == ()
    # taken elsewhere, absent, size 1 or repeated: skipped
    assert dividing_axes(("data", "tensor"), 8, SHAPE, used=("data",)) == ("tensor",)
    assert dividing_axes(("nowhere", "one", "tensor", "tensor"), 8, SHAPE) == ("tensor",)


def test_spec_for_uses_each_mesh_axis_once_and_drops_what_does_not_divide():
    assert len(jax.devices()) == 8
    mesh = make_mesh(2, 2, 2)
    rules = DEFAULT_RULES
    assert spec_for(("embed", "mlp"), (64, 256), mesh, rules) == P("fsdp", "tensor")
    assert spec_for(("embed", "mlp"), (63, 256), mesh, rules) == P(None, "tensor")
    assert spec_for(("batch", "length", "act_embed"), (8, 71, 64), mesh, rules) == P(("data", "fsdp"))
    assert spec_for(("batch", "embed"), (8, 64), mesh, rules) == P(("data", "fsdp"))  # fsdp already used
