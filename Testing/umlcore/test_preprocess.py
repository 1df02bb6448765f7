"""umlcore.preprocess: slicing axis, exact permutation, normalisation, padding, resizing, 2.5D context."""

import numpy as np
import pytest
import torch

from umlcore.card import Normalization
from umlcore.preprocess import (crop_to, from_slices, inplane_axes, normalize, pad_to_multiple, resized_shape,
                                slice_axis_index, to_slices, with_context)


def test_slice_axis_follows_the_direction_matrix(oblique_direction):
    assert slice_axis_index((1, 0, 0, 0, 1, 0, 0, 0, 1), "axial") == 2
    assert slice_axis_index((1, 0, 0, 0, 1, 0, 0, 0, 1), "coronal") == 1
    assert slice_axis_index((1, 0, 0, 0, 1, 0, 0, 0, 1), "sagittal") == 0
    assert slice_axis_index(oblique_direction, "axial") == 2
    # a sagittal acquisition: index axis 0 runs along S (column 0 = (0, 0, 1))
    assert slice_axis_index((0, 1, 0, 0, 0, 1, 1, 0, 0), "axial") == 0
    assert slice_axis_index((0, 1, 0, 0, 0, -1, -1, 0, 0), "axial") == 0  # also when it runs towards I
    with pytest.raises(ValueError, match="unknown slicing axis"):
        slice_axis_index((1, 0, 0, 0, 1, 0, 0, 0, 1), "oblique")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_to_slices_is_exactly_undone(axis):
    a = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (z, y, x)
    s = to_slices(a, axis)
    assert s.shape[0] == a.shape[2 - axis]
    np.testing.assert_array_equal(from_slices(s, axis), a)
    assert inplane_axes(axis) == tuple(i for i in range(3) if i != axis)


def test_normalisation_modes():
    v = np.concatenate([np.linspace(0, 100, 999), [1e6]]).astype(np.float32)
    p = normalize(v, Normalization("percentile", 0.5, 99.5))
    assert p.dtype == np.float32 and p.min() == 0.0 and p.max() == 1.0
    z = normalize(v, Normalization("zscore"))
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
    np.testing.assert_array_equal(normalize(v, Normalization("none")), v)
    assert not normalize(np.ones(10), Normalization("percentile")).any()


def test_pad_crop_and_resized_shape():
    x = torch.randn(2, 3, 13, 20)
    p = pad_to_multiple(x, 8)
    assert p.shape[-2:] == (16, 24) and torch.equal(crop_to(p, (13, 20)), x) and not p[..., 13:, :].any()
    assert pad_to_multiple(x[..., :8, :16], 8).shape[-2:] == (8, 16)
    assert resized_shape((100, 50), (0.5, 2.0), (1.0, 1.0)) == (50, 100)


def test_with_context_stacks_each_channels_neighbours_and_repeats_the_edges():
    stack = (10 * np.arange(2)[None, :] + np.arange(4)[:, None]).astype(np.float32)[:, :, None, None]  # (4, 2, 1, 1)
    out = with_context(stack, 0, 4, 1)
    assert out.shape == (4, 6, 1, 1)
    # value 10 c + z: channel c's slices z-1, z, z+1, then channel c+1's; slice -1 and 4 repeat slices 0 and 3
    np.testing.assert_array_equal(out[:, :, 0, 0], [[0, 0, 1, 10, 10, 11], [0, 1, 2, 10, 11, 12],
                                                    [1, 2, 3, 11, 12, 13], [2, 3, 3, 12, 13, 13]])
    np.testing.assert_array_equal(with_context(stack, 1, 3, 2)[:, :5, 0, 0], [[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]])
    assert torch.equal(with_context(torch.from_numpy(stack), 0, 4, 1), torch.from_numpy(out))
    np.testing.assert_array_equal(with_context(stack, 1, 3, 0), stack[1:3])
    np.testing.assert_array_equal(with_context(stack[:1], 0, 1, 1)[0, :, 0, 0], [0, 0, 0, 10, 10, 10])  # one slice
