"""Compare two models on the same synthetic test cases, paired by seed, from ``evaluate.py`` reports.

Each side takes one or more ``report.json`` files (e.g. the 100-case chunks of a device run); their case rows are
pooled, and only the seeds present on both sides are compared. Prints, per side, the lesion Dice (mean, median, by
lesion size), the lesion cases with nothing segmented, the lesion-free cases with a component, and the case
opinion's AUC, NLL, ECE and Brier score; then the paired Dice difference (B - A over the lesion cases) and the
paired differences of the case opinion's NLL and AUC (over all cases), each with a seeded bootstrap 95 % interval,
so a difference can be told from the spread of the cases.

Example::

    python training/compare_reports.py --a runs/ev19/report.json \\
        --b runs/ev25/c0/report.json runs/ev25/c1/report.json runs/ev25/c2/report.json \\
        --names 1.9.0 2.5D --out runs/ev25/compare.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from evaluate import dice_by_lesion_size
from umlcore import metrics

__all__ = ["VOXEL_TOLERANCE", "load_rows", "side_summary", "paired_dice", "paired_opinion", "compare", "main"]

# The generator's masks can differ by a few boundary voxels between numpy / scipy versions (an H100 image with numpy
# 2.5 against 2.4 here: 1 case of 300, 9,368 vs 9,440 voxels); a larger difference means another case.
VOXEL_TOLERANCE = 0.02


def load_rows(paths: Sequence[Path]) -> dict[int, dict]:
    """Case rows of one or more evaluate.py reports, keyed by seed (a seed in two reports is an error)."""
    rows: dict[int, dict] = {}
    for path in paths:
        try:
            cases = json.loads(Path(path).read_text())["cases"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"compare_reports.py: error: {path} is not an evaluate.py report.json "
                             f"({type(exc).__name__}: {exc}); pass the report.json that evaluate.py --out wrote")
        for row in cases:
            if row["seed"] in rows:
                raise SystemExit(f"compare_reports.py: error: seed {row['seed']} is in two of the reports given "
                                 f"for one side ({path}); give each case once")
            rows[row["seed"]] = row
    return rows


def side_summary(rows: Sequence[dict]) -> dict:
    """Segmentation and case-opinion figures of one model's rows (rows without a lesion have ``dice`` None)."""
    lesion = [r for r in rows if r["dice"] is not None]
    free = [r for r in rows if r["dice"] is None]
    dice = np.array([r["dice"] for r in lesion], dtype=float)
    p = np.array([r["positive_probability"] for r in rows], dtype=float)
    y = np.array([r["label"] for r in rows], dtype=int)
    return {
        "cases": len(rows),
        "lesion_cases": len(lesion),
        "dice_mean": float(dice.mean()) if len(dice) else None,
        "dice_median": float(np.median(dice)) if len(dice) else None,
        "dice_by_lesion_size": dice_by_lesion_size(lesion),
        "lesion_cases_nothing_segmented": int(sum(r["predicted_voxels"] == 0 for r in lesion)),
        "lesion_free_cases": len(free),
        "lesion_free_segmented": int(sum(r["predicted_voxels"] > 0 for r in free)),
        "auc": metrics.roc_auc(p, y) if 0 < y.sum() < len(y) else None,
        "nll": metrics.nll(p, y),
        "ece": metrics.expected_calibration_error(p, y),
        "brier": metrics.brier_score(p, y),
    }


def paired_dice(a: Sequence[dict], b: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of B's Dice minus A's over the same lesion cases, with a bootstrap 95 % interval (cases resampled)."""
    diff = np.array([rb["dice"] - ra["dice"] for ra, rb in zip(a, b) if ra["dice"] is not None], dtype=float)
    if len(diff) == 0:
        return {"cases": 0, "mean": None, "ci95": None, "b_better": 0, "a_better": 0}
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"cases": len(diff), "mean": float(diff.mean()), "ci95": [float(lo), float(hi)],
            "b_better": int((diff > 0.01).sum()), "a_better": int((diff < -0.01).sum())}


def paired_opinion(a: Sequence[dict], b: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """B's case-opinion NLL and AUC minus A's on the same cases, each with a bootstrap 95 % interval.

    The cases are resampled together for both sides (resamples holding one class only are skipped for the AUC).
    """
    y = np.array([r["label"] for r in a], dtype=int)
    pa = np.array([r["positive_probability"] for r in a], dtype=float)
    pb = np.array([r["positive_probability"] for r in b], dtype=float)
    # per-case NLL with the clipping of metrics.nll, so the mean difference equals the difference of the two NLLs
    loss = [-np.log(np.clip(np.where(y == 1, p, 1 - p), 1e-12, 1.0)) for p in (pa, pb)]
    dnll = loss[1] - loss[0]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(y), size=(n_boot, len(y)))
    boot_nll = dnll[draws].mean(axis=1)
    boot_auc = [metrics.roc_auc(pb[i], y[i]) - metrics.roc_auc(pa[i], y[i]) for i in draws if 0 < y[i].sum() < len(i)]
    both = 0 < y.sum() < len(y)
    return {"cases": len(y), "nll": float(dnll.mean()),
            "nll_ci95": [float(v) for v in np.percentile(boot_nll, [2.5, 97.5])],
            "auc": metrics.roc_auc(pb, y) - metrics.roc_auc(pa, y) if both else None,
            "auc_ci95": [float(v) for v in np.percentile(boot_auc, [2.5, 97.5])] if both and boot_auc else None}


def compare(rows_a: dict[int, dict], rows_b: dict[int, dict]) -> dict:
    """Both sides' summaries and the paired Dice and case-opinion differences on the seeds they share."""
    seeds = sorted(set(rows_a) & set(rows_b))
    if not seeds:
        raise SystemExit("compare_reports.py: error: the two sides share no seed; evaluate both models with the same "
                         "--test-seeds-from and --cases")
    inexact = 0
    for s in seeds:
        ra, rb = rows_a[s], rows_b[s]
        va, vb = ra["lesion_voxels"], rb["lesion_voxels"]
        if (ra["label"] != rb["label"] or ra.get("lesions") != rb.get("lesions")
                or abs(va - vb) > VOXEL_TOLERANCE * max(va, vb)):
            raise SystemExit(f"compare_reports.py: error: seed {s} is a different case in the two reports (label, "
                             f"lesion count or size differ: {va} vs {vb} voxels): were they generated with the same "
                             "--shape and --label-noise?")
        inexact += va != vb
    a = [rows_a[s] for s in seeds]
    b = [rows_b[s] for s in seeds]
    return {"seeds": [seeds[0], seeds[-1]], "cases": len(seeds), "cases_size_inexact": int(inexact),
            "a": side_summary(a), "b": side_summary(b),
            "paired_dice_b_minus_a": paired_dice(a, b), "paired_opinion_b_minus_a": paired_opinion(a, b)}


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, nargs="+", required=True, help="report.json file(s) of model A")
    ap.add_argument("--b", type=Path, nargs="+", required=True, help="report.json file(s) of model B")
    ap.add_argument("--names", nargs=2, default=("A", "B"), help="labels for the table")
    ap.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    args = ap.parse_args(argv)
    result = compare(load_rows(args.a), load_rows(args.b))
    result["names"] = list(args.names)
    sa, sb = result["a"], result["b"]
    print(f"{result['cases']} cases paired by seed ({result['seeds'][0]}..{result['seeds'][1]}), "
          f"{sa['lesion_cases']} with a lesion, {sa['lesion_free_cases']} without"
          + (f"; {result['cases_size_inexact']} with a lesion size differing by <= {VOXEL_TOLERANCE:.0%} "
             "(library versions)"
             if result["cases_size_inexact"] else ""))
    print(f"| model | Dice | median | 1-99 vox | 100-999 | >=1000 | nothing segmented | lesion-free with a component "
          f"| AUC | NLL | ECE | Brier |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in zip(args.names, (sa, sb)):
        sizes = " | ".join(_fmt(b["dice_mean"]) for b in s["dice_by_lesion_size"].values())
        print(f"| {name} | {_fmt(s['dice_mean'])} | {_fmt(s['dice_median'])} | {sizes} | "
              f"{s['lesion_cases_nothing_segmented']} | {s['lesion_free_segmented']} of {s['lesion_free_cases']} | "
              f"{_fmt(s['auc'])} | {_fmt(s['nll'])} | {_fmt(s['ece'])} | {_fmt(s['brier'])} |")
    d = result["paired_dice_b_minus_a"]
    if d["mean"] is not None:
        print(f"paired Dice {args.names[1]} - {args.names[0]}: {d['mean']:+.3f} (bootstrap 95 % "
              f"{d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f}) over {d['cases']} lesion cases; "
              f"{args.names[1]} higher by > 0.01 in {d['b_better']}, lower in {d['a_better']}")
    o = result["paired_opinion_b_minus_a"]
    print(f"paired case opinion {args.names[1]} - {args.names[0]} over {o['cases']} cases: NLL {o['nll']:+.4f} "
          f"(bootstrap 95 % {o['nll_ci95'][0]:+.4f} .. {o['nll_ci95'][1]:+.4f})"
          + ("" if o["auc_ci95"] is None else
             f", AUC {o['auc']:+.4f} ({o['auc_ci95'][0]:+.4f} .. {o['auc_ci95'][1]:+.4f})"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
