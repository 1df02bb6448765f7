"""The lesion reader: a second, small network that checks the segmentation and reads each lesion's margin and
kinetics from a patch around it.

The UML network's classifier pools features of whole slices; on the synthetic breast DCE-MRI it encodes washout
kinetics but not spiculated margins. The reader looks where the segmentation found lesions instead: around a
connected component of the labelmap it cuts an in-plane patch of ``patch_size`` x ``patch_size`` pixels of
``pixel_mm`` mm, in the component's widest slice, centred on the component's centroid there, with ``context_slices``
slices on either side, from every normalised channel (``len(channels) * (2 * context_slices + 1)`` patch channels,
channel-major). It gives three probabilities per patch, averaged over the patch's 8 flips and transposes: a lesion is
at the centre, its margin is spiculated, its kinetics wash out. A lesion's suspicion is
``p_lesion * (1 - (1 - p_spiculated) * (1 - p_washout))`` (the generator's label rule).

:func:`check_and_read` is what the predictor does with it (card section ``reader``, :class:`umlcore.card.ReaderConfig`).
Trained by ``python -m training.train_reader``; stored in a bundle as the ``reader.*`` tensors of ``model.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .card import ReaderConfig
from .components import largest_components

__all__ = ["READER_TARGETS", "LesionReader", "Reading", "check_and_read", "cut_patch", "dihedral_views",
           "most_suspicious", "read_patches", "suspicion"]

#: What the reader's three outputs mean, in order.
READER_TARGETS = ("lesion", "spiculated", "washout")


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
def read_patches(reader: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """The reader's probabilities of :data:`READER_TARGETS` for ``patches (N, C, P, P)``: ``(N, 3)`` float32, the
    mean over each patch's 8 flips and transposes (the symmetries the reader was trained with; one batched pass of
    ``8 N`` patches).

    Args:
        reader: A :class:`LesionReader` in eval mode, on ``patches``' device.
        patches: Square patches as :func:`cut_patch` cuts them.
    """
    p = torch.sigmoid(reader(dihedral_views(patches)).float())
    return p.view(8, patches.shape[0], -1).mean(dim=0)


def dihedral_views(patches: torch.Tensor) -> torch.Tensor:
    """The 8 flips and transposes of ``patches (N, C, P, P)``, view-major: ``(8 N, C, P, P)``, the patches themselves
    first (the batch :func:`read_patches` gives the reader)."""
    views = [patches, patches.flip(-1), patches.flip(-2), patches.flip(-2).flip(-1)]
    views += [v.transpose(-1, -2) for v in views]
    return torch.cat(views)


def suspicion(p: np.ndarray) -> np.ndarray:
    """A lesion's suspicion from the reader's ``(..., 3)`` probabilities: ``p_lesion (1 - (1 - p_spic)(1 - p_wash))``."""
    p = np.asarray(p)
    return p[..., 0] * (1 - (1 - p[..., 1]) * (1 - p[..., 2]))


def most_suspicious(p: np.ndarray) -> np.ndarray:
    """The ``(3,)`` probabilities of the most suspicious of the components read, ``p (N, 3)`` (the first on ties):
    the lesion whose suspicion is the case's reader score, and what the stacked case opinion reads."""
    p = np.asarray(p)
    return p[int(np.argmax(suspicion(p)))]


@dataclass
class Reading:
    """What the reader found in one case.

    Attributes:
        checked: The labelmap ``(S, H, W)`` after the check (the components read as lesions kept).
        removed: How many components the check removed.
        components: ``(voxels, slice, y, x)`` of the lesions read for the case opinion, largest first.
        probabilities: ``(N, 3)`` float64 reader probabilities of those lesions (:data:`READER_TARGETS`).
        checked_components: ``(id, voxels, slice, y, x)`` of every component the check read (largest first, ids in
            the labelmap's 6-connected components) and ``checked_probabilities`` ``(M, 3)`` theirs.
    """

    checked: np.ndarray
    removed: int
    components: list[tuple[int, int, float, float]] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, len(READER_TARGETS))))
    checked_components: list[tuple[int, int, int, float, float]] = field(default_factory=list)
    checked_probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, len(READER_TARGETS))))

    @property
    def score(self) -> Optional[float]:
        """The case's reader score: the largest suspicion of the lesions read (``None`` where none was read)."""
        return float(suspicion(self.probabilities).max()) if len(self.probabilities) else None

    @property
    def top(self) -> Optional[np.ndarray]:
        """The most suspicious lesion's ``(3,)`` probabilities (``None`` where none was read)."""
        return most_suspicious(self.probabilities) if len(self.probabilities) else None


def check_and_read(reader: nn.Module, cfg: ReaderConfig, stack: np.ndarray, labels: np.ndarray,
                   spacing_hw: tuple[float, float], device: torch.device) -> Reading:
    """The reader's check of a labelmap and its reading of the lesions kept.

    The ``cfg.segmentation_max_components`` largest 6-connected components of ``labels`` are read; those whose
    ``lesion`` probability is at least ``cfg.segmentation_min_lesion`` stay (every smaller component goes), and the
    ``cfg.max_components`` largest of them are the lesions read for the case opinion (removing whole components
    neither merges nor splits the others, so they are the largest components of the checked labelmap).

    Args:
        reader: A :class:`LesionReader` in eval mode on ``device``.
        cfg: The card's reader section.
        stack: ``(S, C, H, W)`` normalised channels in slice order (what the network read).
        labels: ``(S, H, W)`` the network's labelmap.
        spacing_hw: In-plane pixel spacing (mm) along H and W.
        device: Where the reader runs.
    """
    components, found = largest_components(labels, cfg.segmentation_max_components)
    if not found:
        return Reading(checked=labels, removed=0)
    channels = stack.transpose(1, 0, 2, 3)  # (C, S, H, W)
    patches = np.stack([cut_patch(channels, z, y, x, spacing_hw, cfg.patch_size, cfg.context_slices, cfg.pixel_mm)
                        for *_, z, y, x in found])
    p = read_patches(reader, torch.from_numpy(patches).to(device)).cpu().numpy().astype(np.float64)
    kept = [i for i in range(len(found)) if p[i, 0] >= cfg.segmentation_min_lesion]
    checked = np.where(np.isin(components, [found[i][0] for i in kept]), labels, 0).astype(labels.dtype)
    read = kept[:cfg.max_components]
    return Reading(checked=checked, removed=int(components.max()) - len(kept),
                   components=[tuple(found[i][1:]) for i in read], probabilities=p[read],
                   checked_components=list(found), checked_probabilities=p)
