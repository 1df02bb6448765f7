"""A PNG a person looks at: the key axial slice with the mask outline, the uncertainty heat map, and the
case-level confidence. For a picture model, the picture itself (in colour when it has red, green and blue).

matplotlib is imported inside :func:`write_preview` (Agg canvas, no pyplot state), so ``umlcore`` does not
need it otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import UMLInputError

__all__ = ["key_slice", "write_preview"]


def _axial(image: sitk.Image) -> np.ndarray:
    """``(z, y, x)`` array in LPS orientation: axial slices, patient right on the viewer's left, anterior up."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def _outline(ax, labels: np.ndarray, segments: Sequence[dict]) -> None:
    """The lesion's outline in orange; with several segments (e.g. optic disc and cup), each in its card colour."""
    if len(segments) <= 1:
        if (labels > 0).any():
            ax.contour(labels > 0, levels=[0.5], colors=["#ff6a1a"], linewidths=1.4)
        return
    for seg in segments:
        if (labels == seg["label"]).any():
            ax.contour(labels == seg["label"], levels=[0.5], colors=[tuple(seg["color"])], linewidths=1.4)


def key_slice(labelmap: np.ndarray, uncertainty: np.ndarray) -> int:
    """The axial slice with the most lesion voxels; without a lesion, the most uncertain slice."""
    counts = (labelmap > 0).reshape(labelmap.shape[0], -1).sum(1)
    if counts.max() > 0:
        return int(np.argmax(counts))
    return int(np.argmax(uncertainty.reshape(uncertainty.shape[0], -1).mean(1)))


def _shown(volumes: Sequence[sitk.Image], z: int, picture: bool) -> tuple[np.ndarray, dict]:
    """The slice ``z`` shown under the outlines and its ``imshow`` options: a picture's colours as RGB in [0, 1]
    (one scale for all three, so the colours keep their balance), else the early phase (or the only volume) in grey
    between its 1 and 99.5 percentiles."""
    if picture and len(volumes) == 3:
        rgb = np.stack([_axial(v)[z].astype(np.float32) for v in volumes], axis=-1)
        lo, hi = float(rgb.min()), float(rgb.max())
        return (rgb - lo) / max(hi - lo, 1e-12), {}
    shown = volumes[1] if len(volumes) >= 2 and not picture else volumes[0]  # early post-contrast when phases are given
    img = _axial(shown)[z].astype(np.float32)
    lo, hi = np.percentile(img, (1, 99.5))
    return img, {"cmap": "gray", "vmin": lo, "vmax": hi}


def write_preview(volumes: Union[sitk.Image, Sequence[sitk.Image]], labelmap: sitk.Image, uncertainty: sitk.Image,
                  summary: dict, path: os.PathLike, picture: bool = False) -> Path:
    """Write a three-panel PNG: image + lesion outline, uncertainty heat map, case confidence.

    Args:
        volumes: The input volume(s) of the case (the last post-contrast phase given is shown, or the only one).
        labelmap: Predicted labels on the input grid.
        uncertainty: Per-voxel uncertainty in [0, 1] on the input grid.
        summary: The case summary (``summary.json`` content).
        path: ``.png`` file to write.
        picture: The case is a picture (a picture model's input): shown as the picture, in colour when ``volumes``
            are its red, green and blue.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UMLInputError(f"the preview is a PNG: give a path ending in .png, got {path}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UMLInputError("the PNG preview needs matplotlib: pip install matplotlib") from None
    vols = [volumes] if isinstance(volumes, sitk.Image) else list(volumes)
    lab, unc = _axial(labelmap), _axial(uncertainty)
    z = key_slice(lab, unc)
    img, shade = _shown(vols, z, picture)
    spacing = sitk.DICOMOrient(labelmap, "LPS").GetSpacing()
    aspect = spacing[1] / spacing[0]

    fig = Figure(figsize=(13, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.9]})
    ax = axes[0]
    ax.imshow(img, aspect=aspect, **shade)
    _outline(ax, lab[z], summary.get("segments", []))
    ax.set_title("the picture with the segment outlines" if picture else
                 f"axial slice {z + 1}/{lab.shape[0]} with lesion outline", fontsize=10)
    ax = axes[1]
    if img.ndim == 3:  # the heat map over the picture in grey
        ax.imshow(img.mean(axis=-1), cmap="gray", vmin=0, vmax=1, aspect=aspect)
    else:
        ax.imshow(img, aspect=aspect, **shade)
    heat = ax.imshow(np.ma.masked_less(unc[z], 0.05), cmap="inferno", vmin=0, vmax=1, alpha=0.75, aspect=aspect)
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02, label="uncertainty u = K/S")
    ax.set_title("per-voxel uncertainty", fontsize=10)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
        if not picture:
            ax.text(0.01, 0.5, "R", transform=ax.transAxes, color="w", fontsize=9, va="center")
            ax.text(0.97, 0.5, "L", transform=ax.transAxes, color="w", fontsize=9, va="center")

    ax = axes[2]
    c = summary["classification"]
    names = list(c["classes"])
    y = np.arange(len(names) + 1)[::-1]
    values = list(c["belief"]) + [c["uncertainty"]]
    colors = ["#4c8bd6"] * len(names) + ["#999999"]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, [f"belief: {n}" for n in names] + ["uncertainty"], fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("mass (beliefs + uncertainty = 1)", fontsize=9)
    verdict = c["verdict"]
    lesion = next(iter(summary.get("segments", [])), None)
    lines = [
        f"{c['predicted_class']}  (p = {max(c['probabilities']):.2f})",
        f"verdict: {verdict.upper()}",
    ]
    if lesion is not None and lesion.get("voxel_count"):
        size = f"{lesion['voxel_count']} pixels" if picture else f"{lesion['volume_ml']:.2f} ml"
        lines.append(f"{lesion['name']}: {size}, mean u {lesion['mean_uncertainty']:.2f}")
    elif lesion is not None:
        lines.append(f"no {lesion['name'].lower()} found")
    reader = c.get("reader")
    if reader and reader.get("applied") and summary.get("lesions"):
        top = max(summary["lesions"], key=lambda l: l["suspicion"])
        pr = top["probabilities"]
        lines += [f"lesion reader: {reader['score']:.2f}", f"  (spiculated {pr['spiculated']:.2f}, washout {pr['washout']:.2f})"]
    ax.set_title("\n".join(lines), fontsize=10, color="#1a7f37" if verdict == "reliable" else "#b35900", loc="left")
    model = summary.get("model", {})
    fig.suptitle(f"UML — {summary.get('case_id', '')}   model {model.get('id', '')} {model.get('version', '')}   "
                 "(research use only)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
