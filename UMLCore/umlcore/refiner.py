"""The lesion refiner: a small 3D network that redraws each segmented lesion on the input grid.

The UML network segments slice by slice (2D), so a lesion of a few slices is drawn without its neighbours and
small lesions come out under- or mis-segmented (docs/model.md: lesions under 300 voxels reach Dice 0.30-0.67
where those over 1,000 reach 0.87-0.93). The refiner looks at each connected component of the labelmap the
predictor would write, in 3D: a crop of ``crop`` ``(slices, rows, columns)`` voxels of the normalised volumes
in slice order, centred on the component's bounding box, with two more channels, the network's foreground
probability and the component's own mask. It gives a foreground logit per voxel, added to the logit of the
network's probability (so an untrained refiner returns the network's answer). Where the refined probability is
at least ``threshold``, the parts of it that touch the component replace the component in the labelmap.
Components too large for the crop (their bounding box plus a margin of ``margin`` voxels on each side) are kept
as they are: the network already draws those well.

Trained by ``training/train_refiner.py``; shipped inside a bundle (``refiner.*`` weights in
``model.safetensors``, :class:`RefinerConfig` as the card's ``refiner``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn

from .errors import BundleError

__all__ = ["RefinerConfig", "LesionRefiner", "component_boxes", "crop_box", "crop_inputs", "cut_crop", "refine_labels",
           "touching"]

#: The refiner's extra input channels after the named ones: the network's foreground probability, the component.
EXTRA_CHANNELS = 2
_EPS = 1e-4


@dataclass(frozen=True)
class RefinerConfig:
    """The card's ``refiner`` section.

    Args:
        width: Channels of the first conv stage (then 2x and 4x).
        crop: ``(slices, rows, columns)`` of each crop; slices a multiple of 2, rows and columns of 4.
        margin: ``(slices, rows, columns)`` voxels a component's bounding box must leave free on each side of the
            crop to be refined.
        max_components: The largest components of the labelmap that are refined (those that fit).
        threshold: Refined probability at which a voxel is foreground.
        training: Provenance and validation figures (free form, kept in the card).
    """

    width: int = 8
    crop: tuple[int, int, int] = (12, 48, 48)
    margin: tuple[int, int, int] = (1, 4, 4)
    max_components: int = 8
    threshold: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        object.__setattr__(self, "crop", tuple(self.crop) if isinstance(self.crop, (list, tuple)) else self.crop)
        object.__setattr__(self, "margin", tuple(self.margin) if isinstance(self.margin, (list, tuple)) else self.margin)
        problems = []
        if not is_int(self.width) or self.width < 1:
            problems.append(f"width must be a positive integer, got {self.width!r}")
        c = self.crop
        if not (isinstance(c, tuple) and len(c) == 3 and all(is_int(v) for v in c) and c[0] >= 2 and c[0] % 2 == 0
                and all(v >= 8 and v % 4 == 0 for v in c[1:])):
            problems.append(f"crop must be [slices, rows, columns] with slices an even number >= 2 and rows and "
                            f"columns multiples of 4 of at least 8, got {self.crop!r}")
        m = self.margin
        if not (isinstance(m, tuple) and len(m) == 3 and all(is_int(v) and v >= 0 for v in m)):
            problems.append(f"margin must be three non-negative integers [slices, rows, columns], got {self.margin!r}")
        elif isinstance(c, tuple) and len(c) == 3 and any(2 * mv >= cv for mv, cv in zip(m, c) if is_int(cv)):
            problems.append(f"margin {list(m)} leaves no room in the crop {list(c)}: make it smaller than half the crop")
        if not is_int(self.max_components) or self.max_components < 1:
            problems.append(f"max_components must be a positive integer, got {self.max_components!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            problems.append(f"threshold must be a probability in (0, 1), got {t!r}")
        if problems:
            raise BundleError("the card's refiner section is invalid: " + "; ".join(problems))


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(4, cout), cout), nn.ReLU(True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(min(4, cout), cout), nn.ReLU(True)]


class LesionRefiner(nn.Module):
    """``(B, C + 2, D, H, W)`` crops -> ``(B, 1, D, H, W)`` foreground logits.

    A 3-level 3D U-Net (two 3x3x3 conv + group norm + ReLU per level; ``width``, ``2 width``, ``4 width``
    channels; pooling ``1x2x2`` then ``2x2x2``, since slices are thicker than pixels). Its output is added to
    the logit of channel ``C`` (the network's foreground probability); the last conv starts at zero, so an
    untrained refiner returns the network's probability.

    Args:
        in_channels: Named input channels + 2 (foreground probability, component mask).
        width: Channels of the first level.
    """

    def __init__(self, in_channels: int, width: int = 8) -> None:
        super().__init__()
        if in_channels < EXTRA_CHANNELS + 1:
            raise ValueError(f"in_channels must be at least {EXTRA_CHANNELS + 1} (named channels + 2), got {in_channels}")
        self.prior_channel = in_channels - EXTRA_CHANNELS
        w = width
        self.enc0 = nn.Sequential(*_block(in_channels, w))
        self.enc1 = nn.Sequential(nn.MaxPool3d((1, 2, 2)), *_block(w, 2 * w))
        self.enc2 = nn.Sequential(nn.MaxPool3d(2), *_block(2 * w, 4 * w))
        self.up2 = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.dec1 = nn.Sequential(*_block(6 * w, 2 * w))
        self.up1 = nn.Upsample(scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)
        self.dec0 = nn.Sequential(*_block(3 * w, w))
        self.out = nn.Conv3d(w, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        d1 = self.dec1(torch.cat([e1, self.up2(e2)], dim=1))
        d0 = self.dec0(torch.cat([e0, self.up1(d1)], dim=1))
        prior = x[:, self.prior_channel:self.prior_channel + 1].clamp(_EPS, 1 - _EPS)
        return self.out(d0) + torch.log(prior) - torch.log1p(-prior)


def crop_box(centre: tuple[int, int, int], size: tuple[int, int, int]) -> tuple[slice, ...]:
    """The ``size`` box starting ``size // 2`` before ``centre`` on each axis (it may run past the volume)."""
    return tuple(slice(c - s // 2, c - s // 2 + s) for c, s in zip(centre, size))


def _inside(box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of ``box`` inside an array of ``shape``: as slices of the array, and of the box."""
    src = tuple(slice(max(b.start, 0), min(b.stop, n)) for b, n in zip(box, shape))
    return src, tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(src, box))


def cut_crop(array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """``array[..., box]`` over its last three axes, zero where the box runs past the array."""
    out = np.zeros(array.shape[:-3] + tuple(b.stop - b.start for b in box), dtype=array.dtype)
    src, dst = _inside(box, array.shape[-3:])
    if all(s.stop > s.start for s in src):
        out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def component_boxes(labels: np.ndarray, cfg: RefinerConfig) -> tuple[np.ndarray, list[tuple[int, tuple[slice, ...]]]]:
    """The 6-connected components of ``labels (S, H, W) > 0`` that the refiner redraws, and their crops.

    Returns:
        ``(components, boxes)``: the component ids (``(S, H, W)`` int, 0 = background) and, for the
        ``cfg.max_components`` largest components whose bounding box fits in ``cfg.crop`` with ``cfg.margin`` free
        on each side (largest first, ties in id order), ``(id, crop box)`` with the box centred on the bounding box.
    """
    mask = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
    cc = sitk.ConnectedComponent(mask, False)
    components = sitk.GetArrayFromImage(cc)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    found = []
    for cid in stats.GetLabels():
        x0, y0, z0, nx, ny, nz = stats.GetBoundingBox(cid)  # SimpleITK index order (x, y, z) = (W, H, S)
        lo, extent = (z0, y0, x0), (nz, ny, nx)
        if all(e + 2 * m <= s for e, m, s in zip(extent, cfg.margin, cfg.crop)):
            centre = tuple(lo_ + e // 2 for lo_, e in zip(lo, extent))
            found.append((-int(stats.GetNumberOfPixels(cid)), int(cid), crop_box(centre, cfg.crop)))
    found.sort(key=lambda f: (f[0], f[1]))
    return components, [(cid, box) for _, cid, box in found[:cfg.max_components]]


def crop_inputs(stack: np.ndarray, fg: np.ndarray, component: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The refiner's float32 ``(C + 2, D, H, W)`` input: ``stack (S, C, H, W)``'s channels, the foreground
    probability ``fg (S, H, W)`` and the boolean ``component (S, H, W)``, cut at ``box``."""
    channels = cut_crop(stack.transpose(1, 0, 2, 3), box)
    extra = cut_crop(np.stack([fg.astype(np.float32), component.astype(np.float32)]), box)
    return np.concatenate([channels.astype(np.float32), extra], axis=0)


def touching(drawn: np.ndarray, own: np.ndarray) -> np.ndarray:
    """The 6-connected parts of the boolean ``drawn`` that overlap the boolean ``own`` (same shape)."""
    parts = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(drawn.astype(np.uint8)), False))
    keep = np.setdiff1d(np.unique(parts[own]), [0])
    return np.isin(parts, keep) & (parts > 0)


def refine_labels(refiner: LesionRefiner, cfg: RefinerConfig, stack: np.ndarray, fg: np.ndarray,
                  labels: np.ndarray, device: Optional[torch.device] = None) -> tuple[np.ndarray, int]:
    """Redraw the components of ``labels`` that :func:`component_boxes` picks.

    Args:
        refiner: The trained refiner (eval mode).
        cfg: Its card section.
        stack: ``(S, C, H, W)`` normalised volumes in slice order.
        fg: ``(S, H, W)`` the network's foreground probability.
        labels: ``(S, H, W)`` uint8 labelmap (one segment label; not modified).
        device: Where the refiner runs (default: where its weights are).

    Returns:
        The refined labelmap (a copy) and how many components were redrawn. Each redrawn component is replaced by
        the 6-connected parts of the refined mask inside its crop that overlap it; a component the refiner erases
        entirely stays as it was (erasing is the reader's check's job, not the refiner's).
    """
    components, boxes = component_boxes(labels, cfg)
    out = labels.copy()
    if not boxes:
        return out, 0
    value = int(labels[components == boxes[0][0]].max())
    device = device or next(refiner.parameters()).device
    x = np.stack([crop_inputs(stack, fg, components == cid, box) for cid, box in boxes])
    with torch.inference_mode():
        p = torch.sigmoid(refiner(torch.from_numpy(x).to(device))).cpu().numpy()[:, 0]
    changed = 0
    for (cid, box), prob, crop in zip(boxes, p, x):
        own = crop[-1] > 0.5  # the component's channel of its crop
        new = touching(prob >= cfg.threshold, own)
        if not new.any():
            continue
        src, dst = _inside(box, labels.shape)
        region = out[src]
        region[own[dst]] = 0
        region[new[dst]] = value
        changed += 1
    return out, changed
