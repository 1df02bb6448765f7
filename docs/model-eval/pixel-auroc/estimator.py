"""How much the old pixel uncertainty-error AUROC estimator moved with its voxel sample, against the exact count.

Old (evaluate.py up to 1.10.0): a 5 % voxel subsample per case, pooled, then metrics.uncertainty_error_auroc's
own 2,000,000-voxel subsample. New: every voxel, counted in metrics.UNCERTAINTY_BINS uncertainty bins.
Run from the repository root (about 5 s a case on a 2-core CPU):
    python docs/model-eval/pixel-auroc/estimator.py --cases 100 --seed-from 2007000
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
import evaluate  # noqa: E402
from umlcore import metrics  # noqa: E402
from umlcore.bundle import load_bundle  # noqa: E402
from umlcore.predictor import Predictor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Resources/Models/uml-breast-dce-small")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed-from", type=int, default=2007000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    predictor = Predictor(load_bundle(args.model), device="cpu", batch_size=16)
    us, es = [], []
    counts = np.zeros((2, metrics.UNCERTAINTY_BINS), np.int64)
    per_case = []
    for case in evaluate.synthetic_stream(range(args.seed_from, args.seed_from + args.cases), (24, 256, 256), 0.02,
                                          args.workers):
        pred = predictor.predict(evaluate.input_views(case.to_sitk(), "phases"), case_id=str(case.seed))
        lab = sitk.GetArrayFromImage(pred.labelmap)
        u = sitk.GetArrayFromImage(pred.uncertainty).ravel()
        e = (lab != case.mask).ravel()
        counts += metrics.uncertainty_error_counts(u, e)
        us.append(u)
        es.append(e)
        per_case.append(int(e.sum()))
    exact = metrics.histogram_auroc(*counts)
    print(f"{args.cases} cases from seed {args.seed_from}: {int(counts[0].sum())} wrong voxels of {int(counts.sum())}; "
          f"the 5 cases with most hold {sum(sorted(per_case)[-5:])}")
    print(f"exact (every voxel, {metrics.UNCERTAINTY_BINS} bins): {exact:.4f}")
    old = []
    for seed in range(10):  # the old estimator with other draws of its two voxel samples
        rng = np.random.default_rng(12345 + seed)
        sel = [rng.random(u.size) < 0.05 for u in us]
        u = np.concatenate([u[s] for u, s in zip(us, sel)])
        e = np.concatenate([e[s] for e, s in zip(es, sel)])
        old.append(metrics.uncertainty_error_auroc(u, e, seed=seed))
        print(f"old estimator, draw {seed}: {old[-1]:.4f} ({int(e.sum())} wrong voxels in the 5 % sample, "
              f"{u.size} voxels before the 2,000,000 cap)")
    print(f"old estimator over 10 draws: median {np.median(old):.4f}, range {min(old):.4f} .. {max(old):.4f}")


if __name__ == "__main__":
    main()
