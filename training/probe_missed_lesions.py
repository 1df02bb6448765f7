"""Are the lesions the network never segments bright spots a candidate search could find? A CPU measurement.

A tenth of the test cases with a lesion get Dice 0 because nothing of any lesion is segmented, most of them lesions
under 100 voxels (docs/model.md), and the network misses them with confidence (foreground probability near 0).
A classical way back would be a candidate search on the subtraction image, each candidate then read by the lesion
reader. This probe measures whether the missed lesions stand out there:

1. The bundle's predictor runs end to end on synthetic cases (seeds from ``--seed-from``).
2. The early - pre subtraction of the normalised phases (as the predictor normalises them), smoothed (Gaussian,
   ``SMOOTH_VOXELS`` voxels).
3. For each true lesion (6-connected component of the true mask of at least ``MIN_VOXELS`` voxels): its size,
   whether the labelmap touches it, its peak smoothed subtraction, and the share of the case's voxels brighter
   than that peak (how deep a brightness-ranked candidate list would have to go to reach it).
4. Report: those shares for the missed and the segmented lesions (quartiles, and how many are within the brightest
   0.01 %, 0.1 % and 1 % of voxels).

Example:
    python training/probe_missed_lesions.py --model Resources/Models/uml-breast-dce-small --cases 200 \
        --seed-from 2007000 --out runs/missed/report.json      # about 3 s a case on a 2-core CPU, 2 workers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_refiner import predicted_slices  # noqa: E402  (a case through the predictor, in slice order)
from workers import ordered_map  # noqa: E402

SMOOTH_VOXELS = 1.0
MIN_VOXELS = 8
TOP_SHARES = (0.0001, 0.001, 0.01)


def components(mask: np.ndarray) -> np.ndarray:
    """6-connected component ids of ``mask`` (0 = background)."""
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False))


def probe_case(job: tuple[int, str]) -> dict:
    """One case: a row per true lesion (see the module docstring, step 3)."""
    seed, model = job
    a = predicted_slices(seed, model)
    stack, labels, truth = a["stack"], a["labels"] > 0, a["truth"] > 0
    sub = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(np.ascontiguousarray(stack[:, 1] - stack[:, 0])), SMOOTH_VOXELS))
    ranked = np.sort(sub.ravel())
    lesions = components(truth)
    rows = []
    for i in range(1, int(lesions.max()) + 1):
        lesion = lesions == i
        voxels = int(lesion.sum())
        if voxels < MIN_VOXELS:
            continue
        peak = float(sub[lesion].max())
        brighter = (ranked.size - np.searchsorted(ranked, peak, side="right")) / ranked.size
        rows.append({"seed": seed, "voxels": voxels, "segmented": bool(labels[lesion].any()), "peak": peak,
                     "share_brighter": float(brighter)})
    return {"seed": seed, "lesions": rows}


def summarise(rows: list[dict]) -> dict:
    """The figures of the module docstring's step 4."""
    lesions = [x for r in rows for x in r["lesions"]]
    out = {"cases": len(rows), "lesions": len(lesions)}
    for name, sel in (("missed", [x for x in lesions if not x["segmented"]]),
                      ("segmented", [x for x in lesions if x["segmented"]])):
        shares = np.array([x["share_brighter"] for x in sel])
        out[name] = {"lesions": len(sel),
                     "voxels_median": float(np.median([x["voxels"] for x in sel])) if sel else None,
                     "share_brighter_quartiles": [float(v) for v in np.percentile(shares, (25, 50, 75))] if sel else None,
                     "within_brightest": {f"{100 * t:g} %": int((shares <= t).sum()) for t in TOP_SHARES}}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, type=Path, help="report JSON (rows and summary)")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed-from", type=int, default=2_007_000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cases < 1 or args.workers < 1:
        ap.error("--cases and --workers must be at least 1")
    rows = []
    jobs = [(s, args.model) for s in range(args.seed_from, args.seed_from + args.cases)]
    for i, row in enumerate(ordered_map(probe_case, jobs, args.workers)):
        rows.append(row)
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(jobs)} cases", flush=True)
    summary = summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python training/probe_missed_lesions.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
