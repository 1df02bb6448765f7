"""The lesion reader: a second, small network that reads each segmented lesion's margin and kinetics from a patch.

The UML network's classifier pools features of whole slices; on the synthetic breast DCE-MRI it encodes washout
kinetics but not spiculated margins (docs/model.md, "linear probes"). The reader looks where the segmentation
found lesions instead: around each of the ``max_components`` largest connected components of the (filtered)
labelmap it cuts an in-plane patch of ``patch_size`` x ``patch_size`` pixels of ``pixel_mm`` mm, in the
component's widest slice, centred on the component's centroid there, with ``context_slices`` slices on either
side, from every named channel normalised as the card declares (``len(channels) * (2 * context_slices + 1)``
patch channels, channel-major). It gives three probabilities per patch: a lesion is at the centre, its margin is
spiculated, its kinetics wash out. A component's suspicion is
``p_lesion * (1 - (1 - p_spiculated) * (1 - p_washout))`` (the generator's label rule), the case's reader score
the largest suspicion; :func:`umlcore.fusion.fuse_reader_opinion` merges it into the case opinion by the card's
``fusion`` rule and ``weight`` (rule ``"stacked"``: :func:`umlcore.fusion.stack_reader_opinion`, from the most
suspicious component's three probabilities and the card's ``stacking`` coefficients).

Trained by ``training/probe_roi.py``; shipped inside a bundle (``reader.*`` weights in ``model.safetensors``,
:class:`ReaderConfig` as the card's ``reader``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn

from .errors import BundleError
from .fusion import READER_FUSION_RULES, READER_WEIGHT_MAX, STACKING_TERMS, ReaderFusion

__all__ = ["OPINION_READS", "READER_TARGETS", "READER_TTA_MODES", "ReaderConfig", "LesionReader", "component_centres", "cut_patch",
           "dihedral_views", "largest_components", "most_suspicious", "read_patches", "suspicion"]

#: What the reader's three outputs mean, in order.
READER_TARGETS = ("lesion", "spiculated", "washout")

ReaderTTA = Literal["none", "dihedral"]
#: Test-time augmentation of the reader's patches: ``"none"``, or ``"dihedral"``: the mean probability over the
#: patch's 8 flips and transposes (the symmetries the reader was trained with).
READER_TTA_MODES: tuple[str, ...] = ("none", "dihedral")

OpinionReads = Literal["filtered", "checked"]
#: Which labelmap's components the reader reads for the case opinion: ``"filtered"``, the one the card's uncertainty
#: filter leaves; ``"checked"``, the one the reader's own check wrote (needs ``segmentation_min_lesion``).
OPINION_READS: tuple[str, ...] = ("filtered", "checked")


@dataclass(frozen=True)
class ReaderConfig:
    """The card's ``reader`` section: the reader's architecture, what it looks at, and how much it counts.

    Args:
        width: Channels of the first conv stage (then 2x and 4x).
        context_slices: Slices on either side of the component's widest slice in each patch.
        patch_size: Patch side in pixels (a multiple of 8, at least 16).
        pixel_mm: Patch pixel size in mm (in-plane; patches are resampled bilinearly to it).
        max_components: The largest connected components of the labelmap that are read.
        weight: How much the reader counts (``0``: not at all). With ``fusion="average"`` its share of the case
            opinion, in [0, 1] (``1``: the reader alone where it read a lesion); with ``"logit"`` or
            ``"evidence"`` the factor of its score's log-odds, in [0, 4]; with ``"stacked"`` 1 (the coefficients
            hold the weights).
        fusion: The rule of :func:`umlcore.fusion.fuse_reader_opinion`: ``"average"`` (the default, and the rule
            of cards written before the field existed), ``"logit"``, or ``"evidence"`` (log-odds pooling that may
            lower the case uncertainty; the predictor then calibrates with the network's strength as the least);
            or ``"stacked"`` (:func:`umlcore.fusion.stack_reader_opinion`: a fitted logistic model, whose card
            has an identity case calibration).
        test_time_augmentation: ``"none"`` (the default, and the rule of cards written before the field existed)
            or ``"dihedral"``: each patch is read in its 8 flips and transposes and the probabilities averaged
            (:func:`read_patches`). The weight and calibration are fitted for one setting; changing it needs a refit.
        stacking: With ``fusion="stacked"`` (and only then): one coefficient per term of
            :data:`umlcore.fusion.STACKING_TERMS` (``training/fit_reader_fusion.py --fusion stacked`` fits them).
        segmentation_min_lesion: ``None`` (the default, and the rule of cards written before the field existed):
            the labelmap is the one the card's uncertainty filter leaves. A probability in (0, 1): the reader also
            verifies the segmentation of a multi-phase case: of the ``segmentation_max_components`` largest
            components of the unfiltered labelmap, those whose ``lesion`` probability is at least this stay in the
            labelmap, the others (and any smaller ones) are removed. The case opinion still reads the
            ``max_components`` largest components after the uncertainty filter (what its fusion was fitted on).
            One volume, which the reader does not read, keeps the uncertainty filter.
        segmentation_max_components: How many of the largest components that verification reads.
        opinion_reads: Which components the case opinion reads (the ``max_components`` largest of them):
            ``"filtered"`` (the default, and the rule of cards written before the field existed): those the
            uncertainty filter leaves; ``"checked"``: those of the labelmap the check wrote (needs
            ``segmentation_min_lesion``; the fusion must be fitted on that reading). Either way the network's own
            opinion weighs its slices by the uncertainty-filtered labelmap.
        training: Provenance and validation figures (free form, kept in the card).
    """

    width: int = 16
    context_slices: int = 1
    patch_size: int = 80
    pixel_mm: float = 1.0
    max_components: int = 3
    weight: float = 0.5
    fusion: ReaderFusion = "average"
    test_time_augmentation: ReaderTTA = "none"
    stacking: Optional[dict[str, float]] = None
    segmentation_min_lesion: Optional[float] = None
    segmentation_max_components: int = 8
    opinion_reads: OpinionReads = "filtered"
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        problems = []
        if not is_int(self.width) or self.width < 1:
            problems.append(f"width must be a positive integer, got {self.width!r}")
        if not is_int(self.context_slices) or not 0 <= self.context_slices <= 8:
            problems.append(f"context_slices must be an integer from 0 to 8, got {self.context_slices!r}")
        if not is_int(self.patch_size) or self.patch_size < 16 or self.patch_size % 8:
            problems.append(f"patch_size must be a multiple of 8 of at least 16, got {self.patch_size!r}")
        if not isinstance(self.pixel_mm, (int, float)) or not 0 < self.pixel_mm <= 10:
            problems.append(f"pixel_mm must be a number in (0, 10], got {self.pixel_mm!r}")
        if not is_int(self.max_components) or self.max_components < 1:
            problems.append(f"max_components must be a positive integer, got {self.max_components!r}")
        if self.fusion not in READER_FUSION_RULES:
            problems.append(f"fusion must be one of {sorted(READER_FUSION_RULES)}, got {self.fusion!r}")
        if self.test_time_augmentation not in READER_TTA_MODES:
            problems.append(f"test_time_augmentation must be one of {list(READER_TTA_MODES)}, "
                            f"got {self.test_time_augmentation!r}")
        top = READER_WEIGHT_MAX.get(self.fusion, 1.0)
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0.0 <= self.weight <= top:
            problems.append(f"weight must be a number in [0, {top:g}] (fusion {self.fusion!r}), got {self.weight!r}")
        if self.fusion == "stacked":
            if self.weight != 1.0:
                problems.append(f"fusion 'stacked' keeps its weights in stacking: weight must be 1, got {self.weight!r}")
            c = self.stacking
            if not isinstance(c, dict) or set(c) != set(STACKING_TERMS) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in c.values()):
                problems.append(f"fusion 'stacked' needs stacking: one finite number for each of {list(STACKING_TERMS)} "
                                f"(training/fit_reader_fusion.py --fusion stacked fits them), got {c!r}")
        elif self.stacking is not None:
            problems.append(f"stacking coefficients belong to fusion 'stacked' only (fusion is {self.fusion!r}): "
                            "remove them or set the fusion")
        t = self.segmentation_min_lesion
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0):
            problems.append(f"segmentation_min_lesion must be null or a probability in (0, 1), got {t!r}")
        if not is_int(self.segmentation_max_components) or self.segmentation_max_components < 1:
            problems.append(f"segmentation_max_components must be a positive integer, got "
                            f"{self.segmentation_max_components!r}")
        if self.opinion_reads not in OPINION_READS:
            problems.append(f"opinion_reads must be one of {list(OPINION_READS)}, got {self.opinion_reads!r}")
        elif self.opinion_reads == "checked" and self.segmentation_min_lesion is None:
            problems.append("opinion_reads 'checked' reads the labelmap of the reader's check: set "
                            "segmentation_min_lesion too")
        if problems:
            raise BundleError("the card's reader section is invalid: " + "; ".join(problems))


class LesionReader(nn.Module):
    """``(B, C, P, P)`` patches -> ``(B, 3)`` logits of :data:`READER_TARGETS`.

    Three stages of two 3x3 conv + batch norm + ReLU (``width``, ``2 width``, ``4 width`` channels), each followed
    by 2x2 max pooling; global average and max pooling, concatenated; one linear layer.

    Args:
        in_channels: Patch channels: named input channels x ``(2 context_slices + 1)``.
        width: Channels of the first stage.
    """

    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for k in (1, 2, 4):
            layers += [nn.Conv2d(c, width * k, 3, padding=1, bias=False), nn.BatchNorm2d(width * k), nn.ReLU(True),
                       nn.Conv2d(width * k, width * k, 3, padding=1, bias=False), nn.BatchNorm2d(width * k),
                       nn.ReLU(True), nn.MaxPool2d(2)]
            c = width * k
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c, len(READER_TARGETS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))


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


def _bilinear(image: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``image (H, W)`` sampled bilinearly at ``(yy, xx)``; points outside ``[0, H-1] x [0, W-1]`` give 0."""
    h, w = image.shape
    inside = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
    y = np.clip(yy, 0, h - 1)
    x = np.clip(xx, 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    img = image.astype(np.float64, copy=False)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return np.where(inside, top * (1 - fy) + bottom * fy, 0.0)


def cut_patch(channels: np.ndarray, z: int, y: float, x: float, spacing_hw: tuple[float, float], size: int,
              context: int, pixel_mm: float = 1.0) -> np.ndarray:
    """An in-plane patch around ``(z, y, x)`` resampled bilinearly to ``pixel_mm`` mm pixels.

    Args:
        channels: ``(C, S, H, W)`` normalised volumes in slice order.
        z, y, x: Centre (slice index, fractional pixel row and column).
        spacing_hw: In-plane pixel spacing (mm) along H and W.
        size: Patch side in pixels.
        context: Slices on either side; slices beyond the volume repeat its end slices.
        pixel_mm: The patch's pixel size.

    Returns:
        ``(C * (2 context + 1), size, size)`` float32, channel-major (all slices of channel 0 first); pixels beyond
        the volume are 0.
    """
    offsets = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
    yy, xx = np.meshgrid(y + offsets / spacing_hw[0], x + offsets / spacing_hw[1], indexing="ij")
    zs = np.clip(np.arange(z - context, z + context + 1), 0, channels.shape[1] - 1)
    return np.stack([_bilinear(channels[c, s], yy, xx) for c in range(channels.shape[0]) for s in zs]).astype(np.float32)


@torch.inference_mode()
def read_patches(reader: nn.Module, patches: torch.Tensor, tta: ReaderTTA = "none") -> torch.Tensor:
    """The reader's probabilities of :data:`READER_TARGETS` for ``patches (N, C, P, P)``: ``(N, 3)`` float32.

    Args:
        reader: A :class:`LesionReader` in eval mode, on ``patches``' device.
        patches: Square patches as :func:`cut_patch` cuts them.
        tta: ``"none"``: one pass; ``"dihedral"``: the mean probability over the 8 flips and transposes of each
            patch (one batched pass of ``8 N`` patches).
    """
    if tta not in READER_TTA_MODES:
        raise ValueError(f"tta must be one of {list(READER_TTA_MODES)}, got {tta!r}")
    if tta == "none":
        return torch.sigmoid(reader(patches).float())
    p = torch.sigmoid(reader(dihedral_views(patches)).float())
    return p.view(8, patches.shape[0], -1).mean(dim=0)


def dihedral_views(patches: torch.Tensor) -> torch.Tensor:
    """The 8 flips and transposes of ``patches (N, C, P, P)``, view-major: ``(8 N, C, P, P)``, the patches themselves
    first (the batch the reader gets with test-time augmentation ``"dihedral"``)."""
    views = [patches, patches.flip(-1), patches.flip(-2), patches.flip(-2).flip(-1)]
    views += [v.transpose(-1, -2) for v in views]
    return torch.cat(views)


def suspicion(p: np.ndarray) -> np.ndarray:
    """A lesion's suspicion from the reader's ``(..., 3)`` probabilities: ``p_lesion (1 - (1 - p_spic)(1 - p_wash))``."""
    p = np.asarray(p)
    return p[..., 0] * (1 - (1 - p[..., 1]) * (1 - p[..., 2]))


def most_suspicious(p: np.ndarray) -> np.ndarray:
    """The ``(3,)`` probabilities of the most suspicious of the components read, ``p (N, 3)`` (the first on ties):
    the lesion whose suspicion is the case's reader score, and what the rule ``"stacked"`` reads."""
    p = np.asarray(p)
    return p[int(np.argmax(suspicion(p)))]
