"""A PNG a person looks at: the key axial slice with the mask outline, the uncertainty heat map, and the
case-level confidence.

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


def key_slice(labelmap: np.ndarray, uncertainty: np.ndarray) -> int:
    """The axial slice with the most lesion voxels; without a lesion, the most uncertain slice."""
    counts = (labelmap > 0).reshape(labelmap.shape[0], -1).sum(1)
    if counts.max() > 0:
        return int(np.argmax(counts))
    return int(np.argmax(uncertainty.reshape(uncertainty.shape[0], -1).mean(1)))


def write_preview(volumes: Union[sitk.Image, Sequence[sitk.Image]], labelmap: sitk.Image, uncertainty: sitk.Image,
                  summary: dict, path: os.PathLike) -> Path:
    """Write a three-panel PNG: image + lesion outline, uncertainty heat map, case confidence.

    Args:
        volumes: The input volume(s) of the case (the last post-contrast phase given is shown, or the only one).
        labelmap: Predicted labels on the input grid.
        uncertainty: Per-voxel uncertainty in [0, 1] on the input grid.
        summary: The case summary (``summary.json`` content).
        path: ``.png`` file to write.
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
    shown = vols[1] if len(vols) >= 2 else vols[0]  # early post-contrast when phases are given
    image, lab, unc = _axial(shown), _axial(labelmap), _axial(uncertainty)
    z = key_slice(lab, unc)
    img = image[z].astype(np.float32)
    lo, hi = np.percentile(img, (1, 99.5))
    spacing = sitk.DICOMOrient(shown, "LPS").GetSpacing()
    aspect = spacing[1] / spacing[0]

    fig = Figure(figsize=(13, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.9]})
    ax = axes[0]
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
    if (lab[z] > 0).any():
        ax.contour(lab[z] > 0, levels=[0.5], colors=["#ff6a1a"], linewidths=1.4)
    ax.set_title(f"axial slice {z + 1}/{lab.shape[0]} with lesion outline", fontsize=10)
    ax = axes[1]
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
    heat = ax.imshow(np.ma.masked_less(unc[z], 0.05), cmap="inferno", vmin=0, vmax=1, alpha=0.75, aspect=aspect)
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02, label="uncertainty u = K/S")
    ax.set_title("per-voxel uncertainty", fontsize=10)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
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
        lines.append(f"{lesion['name']}: {lesion['volume_ml']:.2f} ml, mean u {lesion['mean_uncertainty']:.2f}")
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
