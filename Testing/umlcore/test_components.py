"""umlcore.components: connected components, the uncertainty filter, the largest components and their centres."""

import numpy as np
import pytest

from umlcore.components import component_centres, largest_components, remove_uncertain_components


def test_component_centres_are_largest_first_with_the_widest_slice():
    mask = np.zeros((4, 20, 20), np.uint8)
    mask[1:3, 2:6, 2:6] = 1      # 32 voxels, both slices 16: the first slice wins the tie
    mask[0:4, 10:13, 14:17] = 1  # 36 voxels
    mask[3, 12:15, 14:17] = 1    # ... rows 13-14 are new there: 42 voxels, widest in slice 3 (rows 10-14)
    (big, z1, y1, x1), (small, z2, y2, x2) = component_centres(mask, 3)
    assert (big, z1) == (42, 3) and (y1, x1) == pytest.approx((12.0, 15.0))
    assert (small, z2, y2, x2) == (32, 1, 3.5, 3.5)
    assert component_centres(mask, 1) == [(42, 3, 12.0, 15.0)]
    assert component_centres(np.zeros_like(mask), 2) == []
    components, found = largest_components(mask, 3)
    assert [f[1:] for f in found] == component_centres(mask, 3)
    assert [int((components == cid).sum()) for cid, *_ in found] == [42, 32] and components[mask == 0].max() == 0
    assert largest_components(np.zeros_like(mask), 2)[1] == []


def test_remove_uncertain_components_drops_whole_components_by_mean_uncertainty():
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[0:2, 1:3, 1:3] = 1  # component A: 8 voxels, mean u 0.02
    labels[1, 5:7, 5:7] = 1  # component B: 4 voxels, mean u 0.25 (one voxel 0.7)
    labels[2, 0, 7] = 1  # component C: touches A only diagonally -> separate (6-connected), u 0.09
    u = np.full(labels.shape, 0.5, np.float32)
    u[0:2, 1:3, 1:3] = 0.02
    u[1, 5:7, 5:7] = 0.1
    u[1, 6, 6] = 0.7
    u[2, 0, 7] = 0.09
    before = labels.copy()
    out, removed = remove_uncertain_components(labels, u, 0.1)
    np.testing.assert_array_equal(labels, before)  # input untouched
    assert removed == 1 and out[1, 5:7, 5:7].sum() == 0
    assert out[0:2, 1:3, 1:3].all() and out[2, 0, 7] == 1
    assert remove_uncertain_components(labels, u, 0.05)[1] == 2
    assert remove_uncertain_components(np.zeros_like(labels), u, 0.1)[1] == 0
