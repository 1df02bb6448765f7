"""The case opinions another card of the same network and reader gives the rows of an ``evaluate.py`` report.

The stacked rule reads only what each row keeps (the network's opinion, the most suspicious component's reader
outputs), so a card that changes only ``reader.stacking`` (and the review threshold) gives, on the same cases, the
opinions that ``evaluate.card_opinions`` computes from the rows: no network or reader has to run again. Writes a
report.json whose ``cases`` carry those opinions (for ``compare_reports.py``) and prints the case metrics and the
review split at the card's ``review_uncertainty``.

    python docs/model-eval/v1130-stacking/rescore.py --report runs/r13/ev-test-112/report.json \
        --model runs/r13/cand --out runs/r13/cand-test-rescored.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
from evaluate import card_opinions, case_metrics  # noqa: E402
from umlcore.bundle import load_bundle  # noqa: E402


def review_split(u: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """Error rates of the cases flagged 'review' (case uncertainty ``u`` above ``threshold``, as the predictor
    flags them) and of the 'reliable' ones (``correct``: 1 where the opinion is right)."""
    review = u > threshold
    rate = (lambda m: float(1 - correct[m].mean()) if m.any() else None)
    return {"threshold": threshold, "review_cases": int(review.sum()), "review_error": rate(review),
            "reliable_cases": int((~review).sum()), "reliable_error": rate(~review)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, required=True, help="evaluate.py report.json of the same weights")
    ap.add_argument("--model", type=Path, required=True, help="the bundle whose card gives the opinions")
    ap.add_argument("--section", default="cases", choices=["cases", "validation_cases"])
    ap.add_argument("--out", type=Path, help="write the report with the re-opined rows here")
    args = ap.parse_args()
    report = json.loads(args.report.read_text())
    bundle = load_bundle(args.model)
    if report["model"]["sha256"] != bundle.sha256:
        raise SystemExit(f"rescore.py: error: {args.report} evaluated other weights than {args.model}; "
                         "rows can be re-opined only by a card of the same network and reader")
    rows = card_opinions(report[args.section], bundle.card)
    figures, (_, _, u, correct) = case_metrics(rows)
    figures = {"cases": len(rows), **{k: figures[k] for k in ("auc", "nll", "ece", "brier", "accuracy")},
               "review": review_split(u, correct, bundle.card.review_uncertainty)}
    print(json.dumps({"model": f"{bundle.card.id} {bundle.card.version}", **figures}, indent=1))
    if args.out:
        out = {**report, "cases": rows, "rescored_by": {"model": str(args.model), "version": bundle.card.version}}
        out.pop("validation_cases", None)
        args.out.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
