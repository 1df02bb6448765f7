"""Connected components of a labelmap: their sizes, mean uncertainty and where they lie.

Components are 6-connected and taken over all segments together (``labels > 0``), in slice order ``(S, H, W)``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["label_components", "remove_uncertain_components", "largest_components", "component_centres"]


def label_components(labels: np.ndarray, uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The components of ``labels > 0`` and their size and mean uncertainty.

    Args:
        labels: ``(Z, Y, X)`` labelmap.
        uncertainty: ``(Z, Y, X)`` per-voxel uncertainty.

    Returns:
        ``components`` (``(Z, Y, X)`` int, 0 = background, 1..N), ``sizes`` ``(N + 1,)`` and ``mean_u`` ``(N + 1,)``
        indexed by component id (entry 0 describes the background).
    """
    mask = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(mask, False))
    flat = components.ravel()
    sizes = np.bincount(flat, minlength=int(components.max()) + 1)
    sums = np.bincount(flat, weights=uncertainty.ravel().astype(np.float64), minlength=len(sizes))
    return components, sizes, sums / np.maximum(sizes, 1)


def remove_uncertain_components(labels: np.ndarray, uncertainty: np.ndarray,
                                max_uncertainty: float) -> tuple[np.ndarray, int]:
    """Drop the components whose mean voxel uncertainty exceeds ``max_uncertainty`` (the card's
    ``component_max_uncertainty``: on the synthetic validation cases false-positive blobs had a mean uncertainty of
    0.05-0.3, lesions 0.02-0.04).

    Returns:
        The filtered labelmap (a copy; ``labels`` is not modified) and the number of components removed.
    """
    components, _, mean_u = label_components(labels, uncertainty)
    drop = mean_u > max_uncertainty
    drop[0] = False  # the background is not a component
    out = labels.copy()
    out[drop[components]] = 0
    return out, int(drop.sum())


def largest_components(mask: np.ndarray, limit: int) -> tuple[np.ndarray, list[tuple[int, int, int, float, float]]]:
    """The 6-connected 3D components of ``mask > 0`` and where the ``limit`` largest are read.

    Args:
        mask: ``(S, H, W)`` labelmap in slice order.
        limit: How many components at most.

    Returns:
        ``(components, found)``: ``components`` ``(S, H, W)`` int (0 = background, then one id per component) and,
        largest first, ``(id, voxels, slice, y, x)`` per component: its id in ``components``, its size, the slice
        where it has the most voxels (the first on ties) and its centroid in that slice (pixels, fractional).
        Components of equal size come in the order of their first voxel in ``mask``'s memory order.
    """
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((mask > 0).astype(np.uint8)), False))
    ids, first = np.unique(labels.ravel(), return_index=True)
    if ids[-1] == 0:
        return labels, []
    sizes = np.bincount(labels.ravel())[ids]
    keep = ids > 0
    ids, first, sizes = ids[keep], first[keep], sizes[keep]
    out = []
    for k in np.lexsort((first, -sizes))[:limit]:
        comp = labels == ids[k]
        area = comp.reshape(comp.shape[0], -1).sum(axis=1)
        z = int(np.argmax(area))
        y, x = np.argwhere(comp[z]).mean(axis=0)
        out.append((int(ids[k]), int(sizes[k]), z, float(y), float(x)))
    return labels, out


def component_centres(mask: np.ndarray, limit: int) -> list[tuple[int, int, float, float]]:
    """``(voxels, slice, y, x)`` of the ``limit`` largest components of ``mask > 0``, largest first
    (:func:`largest_components` without the ids)."""
    return [found[1:] for found in largest_components(mask, limit)[1]]
