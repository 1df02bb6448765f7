"""Experiment (outside CI): does the shipped model find enhancing lesions drawn into *real* MR texture?

A development set that is not the generator (issue 39, item 2): axial slabs of a real T1-weighted MR volume (the
MNI152 2009a template that nilearn ships: no download at run time) become three DCE phases -- pre = the real
volume, early / late = pre with a mild background enhancement and one synthetic ellipsoidal lesion that enhances
strongly and washes out (or keeps rising) -- plus noise. The shipped model reads them as it reads a case; the
script prints per-case and median lesion Dice (``--inputs``: the three phases, the early phase alone or the
subtraction image), the detection rate and the false-positive volume.

    pip download nilearn --no-deps -d /tmp/nl && unzip -o /tmp/nl/nilearn-*.whl \\
        nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz -d /tmp/mni
    python experiments/real_texture.py /tmp/mni/nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz --cases 20

The template is a brain, not a breast: this measures transfer to real MR texture, not to breast anatomy.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from umlcore.bundle import load_bundle
from umlcore.predictor import Predictor

MODEL = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "uml-breast-dce-small"


def make_case(t1: np.ndarray, spacing, rng: np.random.Generator, slices: int = 32, size: int = 160):
    """(pre, early, late) images of one slab with one lesion, and the lesion mask."""
    z0 = int(rng.integers(t1.shape[0] // 3, 2 * t1.shape[0] // 3 - slices))
    y0, x0 = (t1.shape[1] - size) // 2, (t1.shape[2] - size) // 2
    pre = t1[z0:z0 + slices, y0:y0 + size, x0:x0 + size].astype(np.float32)
    pre = 1000.0 * pre / max(float(np.percentile(t1, 99.5)), 1e-6)
    tissue = np.argwhere(pre > 0.3 * pre.max())
    centre = tissue[rng.integers(len(tissue))]
    radii = rng.uniform(3.0, 7.0, 3) / np.asarray(spacing[::-1])
    zz, yy, xx = np.ogrid[:slices, :size, :size]
    mask = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2 <= 1
    rise = rng.uniform(1.0, 2.0)
    late_factor = rng.choice([0.75, 1.1])  # washout or persistent
    early = pre * 1.1 + mask * pre.clip(200, None) * rise
    late = pre * 1.15 + mask * pre.clip(200, None) * rise * late_factor
    noise = 0.02 * 1000.0
    phases = []
    for a in (pre, early, late):
        image = sitk.GetImageFromArray((a + rng.normal(0, noise, a.shape)).astype(np.float32))
        image.SetSpacing(spacing)
        phases.append(image)
    return phases, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("background", type=Path, help="a real T1-weighted MR volume (NIfTI)")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inputs", choices=("phases", "early", "subtraction"), default="phases",
                   help="what the model is given: the three phases, the early phase alone, or early minus pre")
    args = p.parse_args()
    image = sitk.ReadImage(str(args.background), sitk.sitkFloat32)
    t1, spacing = sitk.GetArrayFromImage(image), image.GetSpacing()
    predictor = Predictor(load_bundle(MODEL), device="cpu")
    rng = np.random.default_rng(args.seed)
    dices, found, false_ml = [], 0, []
    for n in range(args.cases):
        phases, mask = make_case(t1, spacing, rng)
        given = {"phases": phases, "early": phases[1], "subtraction": phases[1] - phases[0]}[args.inputs]
        prediction = predictor.predict(given)
        labels = sitk.GetArrayFromImage(prediction.labelmap) > 0
        dice = 2 * (labels & mask).sum() / max(labels.sum() + mask.sum(), 1)
        dices.append(float(dice))
        found += bool((labels & mask).any())
        false_ml.append(float((labels & ~mask).sum() * np.prod(spacing) / 1000))
        print(f"case {n}: lesion {mask.sum() * np.prod(spacing) / 1000:.2f} ml, Dice {dice:.3f}, false positive "
              f"{false_ml[-1]:.2f} ml, verdict {prediction.summary['classification']['verdict']}")
    print(f"{args.inputs}, {args.cases} cases: median Dice {statistics.median(dices):.3f} (mean {statistics.mean(dices):.3f}), "
          f"lesions touched {found}/{args.cases}, median false-positive volume {statistics.median(false_ml):.2f} ml")


if __name__ == "__main__":
    main()
