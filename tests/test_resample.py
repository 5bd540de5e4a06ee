"""PyTorch-exact area and bicubic resampling, checked against torch.nn.functional.interpolate."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import nchw, nhwc
from hart_jax.layers.resample import area_resize, bicubic_matrix, bicubic_resize, nearest_upsample2x

SIZES_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def _torch(x_NCHW, size, mode):
    return F.interpolate(torch.from_numpy(x_NCHW), size=size, mode=mode).numpy()


@pytest.mark.parametrize("pn", SIZES_1024[:-1])
def test_area_and_bicubic_match_torch_for_every_1024_scale(pn):
    rng = np.random.default_rng(pn)
    f = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(nchw(area_resize(nhwc(f), pn)), _torch(f, (pn, pn), "area"), atol=1e-5, rtol=1e-5)
    e = rng.standard_normal((2, 3, pn, pn)).astype(np.float32)
    np.testing.assert_allclose(
        nchw(bicubic_resize(nhwc(e), 64)), _torch(e, (64, 64), "bicubic"), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("src,dst", [(6, 4), (8, 5), (5, 3), (3, 7), (7, 13), (6, 2)])
def test_non_square_ratios_and_bicubic_downsampling(src, dst):
    rng = np.random.default_rng(src * 31 + dst)
    x = rng.standard_normal((1, 2, src, src + 1)).astype(np.float32)
    np.testing.assert_allclose(
        nchw(bicubic_resize(nhwc(x), (dst, dst + 2))), _torch(x, (dst, dst + 2), "bicubic"), atol=1e-5, rtol=1e-5
    )
    if dst < src:
        np.testing.assert_allclose(
            nchw(area_resize(nhwc(x), (dst, dst))), _torch(x, (dst, dst), "area"), atol=1e-5, rtol=1e-5
        )


def test_bicubic_uses_a_minus_075_not_jax_image():
    # jax.image.resize uses a=-0.5; the weights of one interior sample tell them apart.
    m = bicubic_matrix(4, 8)
    assert m.shape == (8, 4)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    # output 3 has source coordinate 1.25 -> taps 0..3 with Keys(a=-0.75) weights at t=0.25
    np.testing.assert_allclose(m[3], [-0.10546875, 0.87890625, 0.26171875, -0.03515625], atol=1e-7)


def test_same_size_is_identity_and_nearest_upsample():
    x = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    np.testing.assert_array_equal(area_resize(x, 3), x)
    np.testing.assert_array_equal(bicubic_resize(x, 3), x)
    up = np.asarray(nearest_upsample2x(x))
    assert up.shape == (2, 6, 6, 1)
    np.testing.assert_array_equal(up[:, ::2, ::2], x)
    np.testing.assert_array_equal(up[:, 1::2, 1::2], x)
