"""LPIPS-VGG: parity with a plain-torch reference on random weights, gradients, loading errors.

The weights are random (seeded) state dicts in the ``lpips`` package layout; nothing
is downloaded. The reference below uses only torch.nn.functional ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import assert_close, nhwc
from hart_jax.errors import CheckpointError
from hart_jax.models.lpips import LPIPS, load_lpips, load_lpips_params, lpips_distance

CH = (64, 128, 256, 512, 512)
# torchvision vgg16().features index of each conv, per LPIPS slice (a max-pool opens slices 2-5).
SLICES = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ``lpips.LPIPS(net='vgg').state_dict()`` (He-scaled convs, non-negative lins)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"scaling_layer.shift": SHIFT.clone(), "scaling_layer.scale": SCALE.clone()}
    cin = 3
    for s, idxs in SLICES.items():
        c = CH[s - 1]
        for i in idxs:
            sd[f"net.slice{s}.{i}.weight"] = torch.randn(c, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
            sd[f"net.slice{s}.{i}.bias"] = torch.randn(c, generator=g) * 0.05
            cin = c
    for k, c in enumerate(CH):
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g)
    return sd


def torch_lpips(sd: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference per-layer LPIPS ``[B, 5]`` of NCHW images in [-1, 1]."""

    def feats(h):
        out = []
        h = (h - SHIFT) / SCALE
        for s, idxs in SLICES.items():
            if s > 1:
                h = F.max_pool2d(h, 2, 2)
            for i in idxs:
                h = F.relu(F.conv2d(h, sd[f"net.slice{s}.{i}.weight"], sd[f"net.slice{s}.{i}.bias"], padding=1))
            out.append(h)
        return out

    res = []
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        d = F.conv2d((a - b) ** 2, sd[f"lin{k}.model.1.weight"])
        res.append(d.mean(dim=(2, 3))[:, 0])
    return torch.stack(res, dim=1)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return make_state()


@pytest.fixture(scope="module")
def files(state, tmp_path_factory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("lpips")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "lpips_vgg.safetensors"))
    torch.save(state, d / "lpips_vgg.pth")
    return {"safetensors": d / "lpips_vgg.safetensors", "pth": d / "lpips_vgg.pth"}


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = 0.5 * x + 0.5 * (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1)
    return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def loaded(files):
    return load_lpips(files["safetensors"])


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_matches_torch_reference(kind, files, state, images):
    x, y = images
    module, params = load_lpips(files[kind])
    ref_BL = torch_lpips(state, torch.from_numpy(x), torch.from_numpy(y)).numpy()
    got_BL = module.apply({"params": params}, nhwc(x), nhwc(y), method=LPIPS.per_layer)
    got_B = lpips_distance(module, params, nhwc(x), nhwc(y))
    assert got_B.shape == (2,) and got_B.dtype == jnp.float32
    assert (ref_BL > 1e-2).all()  # every level contributes, so the comparison is meaningful
    assert_close(got_BL, ref_BL, "per-layer")
    assert_close(got_B, ref_BL.sum(1), "distance")
    err = float(np.max(np.abs(np.asarray(got_B) - ref_BL.sum(1))))
    rel = float(np.max(np.abs(np.asarray(got_BL) - ref_BL) / ref_BL))
    print(f"{kind}: max abs error vs torch {err:.2e}, per-layer max rel {rel:.2e}, distance {ref_BL.sum(1)}")


def test_torchvision_layout_and_aliases(state, files, tmp_path):
    """``features.{i}`` trunk + ``lins.{k}`` duplicates + ignored classifier == the lpips layout."""
    sd = {}
    for s, idxs in SLICES.items():
        for i in idxs:
            for w in ("weight", "bias"):
                sd[f"features.{i}.{w}"] = state[f"net.slice{s}.{i}.{w}"]
    for k in range(5):
        sd[f"lin{k}.model.0.weight"] = state[f"lin{k}.model.1.weight"]
        sd[f"lins.{k}.model.0.weight"] = state[f"lin{k}.model.1.weight"]
    sd["classifier.0.weight"] = torch.zeros(4, 8)
    torch.save(sd, tmp_path / "tv.pt")
    got = load_lpips_params(tmp_path / "tv.pt")
    want = load_lpips_params(files["safetensors"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_zero_on_identical_and_gradient(loaded, images):
    module, params = loaded
    x, y = (jnp.asarray(nhwc(a)) for a in images)
    assert np.all(np.asarray(lpips_distance(module, params, x, x)) == 0.0)

    def loss(x_, p_):
        return jnp.sum(lpips_distance(module, p_, x_, y))

    gx, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
    gx = np.asarray(gx)
    assert np.isfinite(gx).all() and np.abs(gx).max() > 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gp))  # frozen


def _save(sd: dict[str, torch.Tensor], path) -> str:
    torch.save(sd, path)
    return str(path)


def _one_line_error(path, match: str) -> str:
    with pytest.raises(CheckpointError) as ei:
        load_lpips(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg
    return msg


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.pth", "file not found")


def test_missing_keys_listed(state, tmp_path):
    sd = {k: v for k, v in state.items() if k not in ("net.slice3.12.weight", "lin2.model.1.weight")}
    msg = _one_line_error(_save(sd, tmp_path / "partial.pth"), "missing 2")
    assert "net.slice3.12.weight" in msg and "lin2.model.1.weight" in msg


def test_lin_layers_only_hint(state, tmp_path):
    sd = {k: v for k, v in state.items() if k.startswith("lin")}  # what weights/v0.1/vgg.pth holds
    _one_line_error(_save(sd, tmp_path / "vgg.pth"), "no VGG16 trunk")


def test_misshaped_and_unexpected_keys(state, tmp_path):
    sd = dict(state)
    sd["lin1.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    sd["net.slice9.0.weight"] = torch.zeros(1)
    msg = _one_line_error(_save(sd, tmp_path / "bad.pth"), "wrong shape 1: lin1.model.1.weight")
    assert "unexpected 1: net.slice9.0.weight" in msg


def test_wrong_scaling_constants(state, tmp_path):
    sd = dict(state)
    sd["scaling_layer.scale"] = torch.ones(1, 3, 1, 1)
    _one_line_error(_save(sd, tmp_path / "scale.pth"), "scaling_layer.scale")


@pytest.mark.parametrize("name", ["junk.pth", "junk.safetensors"])
def test_not_a_weight_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    _one_line_error(p, "not a readable")


def test_normalisation_gradient_at_zero_features():
    """A pixel whose ReLU features are all zero gives a zero gradient, not NaN (torch's sqrt gives NaN)."""
    from hart_jax.models.lpips import _unit_normalize

    f = jnp.zeros((1, 1, 2, 4)).at[0, 0, 1].set(jnp.array([1.0, 2.0, 0.0, 3.0]))
    g = jax.grad(lambda a: jnp.sum(_unit_normalize(a) ** 2 * jnp.arange(4.0)))(f)
    assert np.isfinite(np.asarray(g)).all() and np.all(np.asarray(g)[0, 0, 0] == 0)
    assert_close(_unit_normalize(f)[0, 0, 1], np.array([1.0, 2.0, 0.0, 3.0]) / np.sqrt(14.0))
