"""Is the case classifier limited by the segmentation (the fusion weights) or by the slice classifier itself?

Compares, on validation cases (seeds from 1,000,100; disjoint from training and test), the case AUC of
- ``shipped``: the predictor's case opinion (slices weighted by the *predicted* lesion voxels, card post-processing
  and calibration applied);
- ``oracle``: the same slice opinions fused with the *true* lesion voxels per slice as weights;
- ``best_slice``: the slice opinion of the slice with the most true lesion voxels alone.
If ``oracle`` is not much better than ``shipped``, better segmentation will not fix the classification.

Example:
    python training/diagnose_classifier.py --model Resources/Models/uml-breast-dce-small --cases 60
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import numpy as np

from umlcore import metrics
from umlcore.bundle import load_bundle
from umlcore.fusion import fuse_slice_opinions
from umlcore.predictor import Predictor
from umlcore.synthetic import generate_case

SEED_BASE = 1_000_100


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle folder / zip")
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256))
    p.add_argument("--label-noise", type=float, default=0.02)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    predictor = Predictor(load_bundle(args.model), device=args.device, batch_size=16)
    scores: dict[str, list[float]] = {"shipped": [], "oracle": [], "best_slice": []}
    labels, has_lesion = [], []
    for i in range(args.cases):
        case = generate_case(SEED_BASE + i, shape=tuple(args.shape), label_noise=args.label_noise)
        summary = predictor.predict(case.to_sitk()).summary
        k = len(summary["classification"]["classes"])
        alpha = np.array([np.array(s["probabilities"]) * k / s["uncertainty"] for s in summary["slices"]])
        array_axis = 2 - summary["slicing"]["index_axis"]  # numpy (z, y, x) vs SimpleITK (i, j, k)
        truth = np.moveaxis(case.mask > 0, array_axis, 0)
        weights = truth.reshape(truth.shape[0], -1).sum(axis=1)
        slice_p = alpha[:, 1] / alpha.sum(axis=1)
        oracle = fuse_slice_opinions(alpha, weights)
        scores["shipped"].append(summary["classification"]["probabilities"][1])
        scores["oracle"].append(float(oracle[1] / oracle.sum()))
        scores["best_slice"].append(float(slice_p[np.argmax(weights)] if weights.any() else slice_p.mean()))
        labels.append(case.label)
        has_lesion.append(bool(weights.any()))
    y, lesion = np.array(labels), np.array(has_lesion)
    print(f"{args.cases} validation cases (seeds {SEED_BASE}..{SEED_BASE + args.cases - 1}), {lesion.sum()} with a "
          f"lesion, {y.sum()} positive")
    for name, values in scores.items():
        v = np.array(values)
        print(f"{name:11s} case AUC {metrics.roc_auc(v, y):.3f}   on cases with a lesion {metrics.roc_auc(v[lesion], y[lesion]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
