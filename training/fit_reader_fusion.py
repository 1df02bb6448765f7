"""Fit a bundle's reader weight and case calibration on the case rows of several ``evaluate.py`` reports.

``evaluate.py --reader-weight fit`` chooses the reader's weight and fits the case calibration on one validation pass
(400 cases take about 40 CPU minutes). Each report also keeps, per case, what the fit needs (the network's opinion
and strength, the reader's score, the label), so the rows of reports already made with the same weights can be
pooled into a larger fitting set at no cost. The pooled cases are fitting data from then on: test on new seeds.

Rows are taken from each report's ``validation_cases`` and ``cases`` (a seed that appears twice must have the same
row), grouped by report section (every report's ``cases`` is a group; all ``validation_cases`` one more). The weight
of ``--fusion`` (one of :data:`evaluate.READER_WEIGHTS`) is the one with the lowest pooled NLL after a Platt fit on
the pool among those whose calibrated ECE is at most ``--ece-max`` on the pool and on every group; the case
calibration is that Platt fit. Nothing is written when no weight qualifies.

``--fusion stacked`` fits instead the coefficients of :func:`umlcore.fusion.stack_reader_opinion`: a logistic
regression of the labels on :func:`umlcore.fusion.stacking_features` of every pooled row (the network's log-odds and
the log-odds of the most suspicious component's suspicion and reader outputs, kept in the rows as
``reader_probabilities``; rows of reports written before that field existed: rescore them with
``rescore_reader.py``), with an L2 penalty of ``--l2`` on the coefficients other than the intercept. The card's case
calibration is then the identity. It is written only if its ECE is at most ``--ece-max`` on the pool and on every
group.

The card's review threshold (``review_uncertainty``) stays unless ``--review-uncertainty fit``: then it is the one
``evaluate.suggest_review_uncertainty`` gives on the opinions the written card gives the pooled rows (the smallest
case uncertainty whose retained cases reach the error rate of the surest half). The suggestion is printed either way.

Example (1.8.0's stacking: its in-sample group gate failed, decision7.txt, and was replaced by an 800-case fresh
test, decision8.txt in docs/model-eval/v180-stacked/, hence ``--ece-max 1``):
    python training/rescore_reader.py --report runs/v150h/eval/report.json \
        --model Resources/Models/uml-breast-dce-small --out runs/v180s/r1     # and the other kept-patch reports
    python training/fit_reader_fusion.py --model Resources/Models/uml-breast-dce-small --fusion stacked \
        --reports runs/v180s/r1/report.json runs/v180s/r4/report.json runs/v180s/r5/report.json \
        runs/v180s/r6/report.json --version 1.8.0 --ece-max 1 --out runs/v180x

Example (the second fit of 1.4.0; docs/model-eval/v140/decision.txt):
    python training/fit_reader_fusion.py --model Resources/Models/uml-breast-dce-small \
        --reports runs/v131/evalL/report.json runs/v131/eval-fresh/report.json runs/v140/eval/report.json \
        --fusion evidence --version 1.4.0 --out runs/v140b
    python training/evaluate.py --model runs/v140b --out runs/v140b/eval --cases 400 --test-seeds-from 2001200 \
        --robustness-cases 20 --mode-cases 1 --workers 2
    python training/add_reader.py --model runs/v140b --report runs/v140b/eval/report.json \
        --out Resources/Models/uml-breast-dce-small --overwrite
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from umlcore import metrics
from umlcore.bundle import load_bundle, save_bundle
from umlcore.fusion import READER_FUSION_RULES, STACKING_TERMS, fit_logistic, fit_platt, stacking_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import (READER_WEIGHTS, calibrated_alphas, card_opinions, reader_merged_alphas,  # noqa: E402
                      suggest_review_uncertainty)


def pooled_rows(paths: list[Path], bundle, error) -> tuple[list[dict], dict[str, list[int]]]:
    """The distinct case rows of the reports (checked against ``bundle``) and the row indices of each group."""
    rows: list[dict] = []
    by_seed: dict[int, int] = {}
    groups: dict[str, list[int]] = {}
    dataset = None
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            error(f"--reports {path}: cannot read it as JSON ({e})")
        problems = []
        if report.get("model", {}).get("sha256") != bundle.sha256:
            problems.append(f"it evaluated other weights (sha256 {report.get('model', {}).get('sha256')!r})")
        if report.get("summary", {}).get("component_max_uncertainty") != bundle.card.component_max_uncertainty:
            problems.append("its component filter is not the bundle's")
        shape = str(report.get("dataset", "")).partition("shape ")[2]
        if dataset is not None and shape != dataset:
            problems.append(f"its cases differ in shape or label noise from the first report's ({shape!r})")
        dataset = shape if dataset is None else dataset
        for section in ("validation_cases", "cases"):
            for r in report.get(section) or []:
                if r.get("network_positive_probability") is None:
                    problems.append(f"its {section} lack the network's opinion (a bundle without a reader?)")
                    break
        if problems:
            error(f"--reports {path}: " + "; ".join(problems))
        for section, group in (("validation_cases", "validation"), ("cases", f"{path}: test cases")):
            for r in report.get(section) or []:
                if r["seed"] in by_seed:
                    old = rows[by_seed[r["seed"]]]
                    if (old["network_positive_probability"], old["reader_score"], old["label"]) != \
                            (r["network_positive_probability"], r["reader_score"], r["label"]):
                        error(f"--reports {path}: seed {r['seed']} has another row in an earlier report")
                    continue
                by_seed[r["seed"]] = len(rows)
                groups.setdefault(group, []).append(len(rows))
                rows.append(r)
    return rows, groups


def choose(rows: list[dict], groups: dict[str, list[int]], fusion: str, ece_max: float, positive: int = 1):
    """``(weight or None, slope, intercept, table)``: see the module docstring."""
    labels = np.array([r["label"] for r in rows], dtype=int)
    table, best = {}, None
    for w in READER_WEIGHTS[fusion]:
        alphas = reader_merged_alphas(rows, w, positive, fusion)
        slope, intercept = fit_platt(alphas[:, positive] / alphas.sum(axis=1), labels)
        final = calibrated_alphas(alphas, rows, slope, intercept, positive, fusion)
        q = final[:, positive] / final.sum(axis=1)
        row = {"nll": metrics.nll(q, labels), "ece": metrics.expected_calibration_error(q, labels),
               "auc": metrics.roc_auc(q, labels), "slope": slope, "intercept": intercept,
               "group_ece": {g: metrics.expected_calibration_error(q[i], labels[i]) for g, i in groups.items()}}
        table[str(w)] = row
        ok = row["ece"] <= ece_max and all(e <= ece_max for e in row["group_ece"].values())
        if ok and (best is None or row["nll"] < table[str(best)]["nll"]):
            best = w
    if best is None:
        return None, None, None, table
    return best, table[str(best)]["slope"], table[str(best)]["intercept"], table


def fit_stacking(rows: list[dict], l2: float = 1e-3, iterations: int = 100) -> dict[str, float]:
    """The coefficients of :data:`umlcore.fusion.STACKING_TERMS` minimising the summed NLL of the rows' labels under
    :func:`umlcore.fusion.stack_reader_opinion`, plus ``l2 / 2`` times the squared coefficients other than the
    intercept (:func:`umlcore.fusion.fit_logistic`).

    Args:
        rows: Rows with ``network_positive_probability``, ``reader_score``, ``reader_probabilities`` (where the
            reader read) and ``label`` (1: positive), both classes present.
        l2: The penalty (>= 0).
    """
    x = np.array([stacking_features(r["network_positive_probability"],
                                    None if r["reader_score"] is None else r["reader_probabilities"]) for r in rows])
    y = np.array([r["label"] for r in rows], dtype=np.float64)  # 1: the positive class, as in every report row
    penalty = np.full(x.shape[1], float(l2))
    penalty[0] = 0.0  # not on the intercept
    w = fit_logistic(x, y, penalty=penalty, iterations=iterations)
    return {term: float(v) for term, v in zip(STACKING_TERMS, w)}


def stacked_figures(rows: list[dict], groups: dict[str, list[int]], coefficients: dict[str, float],
                    positive: int = 1) -> dict:
    """NLL, ECE and AUC of the stacked opinions of ``rows`` under ``coefficients``, and the ECE of each group."""
    labels = np.array([r["label"] for r in rows], dtype=int)
    alphas = reader_merged_alphas(rows, 1.0, positive, "stacked", coefficients)
    q = alphas[:, positive] / alphas.sum(axis=1)
    return {"nll": metrics.nll(q, labels), "ece": metrics.expected_calibration_error(q, labels),
            "auc": metrics.roc_auc(q, labels),
            "group_ece": {g: metrics.expected_calibration_error(q[i], labels[i]) for g, i in groups.items()}}


def suggested_review(rows: list[dict], card) -> float:
    """:func:`evaluate.suggest_review_uncertainty` of the case opinions ``card``'s predictor gives ``rows``
    (:func:`evaluate.card_opinions`: its reader rule and case calibration on each row)."""
    opinions = card_opinions(rows, card)
    u = np.array([r["uncertainty"] for r in opinions])
    correct = np.array([(r["positive_probability"] >= 0.5) == bool(r["label"]) for r in opinions], dtype=int)
    return suggest_review_uncertainty(u, correct)


def with_review_threshold(args: argparse.Namespace, card, rows: list[dict]):
    """``card`` with the review threshold ``--review-uncertainty`` gives it, printed beside the suggestion."""
    suggested = suggested_review(rows, card)
    keep = args.review_uncertainty == "keep"
    print(f"review_uncertainty: the fitted opinions suggest {suggested:g}; "
          + (f"the card keeps {card.review_uncertainty:g} (--review-uncertainty fit takes the suggestion)" if keep
             else f"written (was {card.review_uncertainty:g})"))
    return card if keep else dataclasses.replace(card, review_uncertainty=suggested)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the bundle whose weights the reports evaluated")
    p.add_argument("--reports", required=True, type=Path, nargs="+", help="evaluate.py report.json files")
    p.add_argument("--fusion", default="evidence", choices=sorted(READER_FUSION_RULES))
    p.add_argument("--ece-max", type=float, default=0.05)
    p.add_argument("--l2", type=float, default=1e-3,
                   help="--fusion stacked: the L2 penalty on the coefficients other than the intercept")
    p.add_argument("--review-uncertainty", default="keep", choices=["keep", "fit"],
                   help="the card's review threshold: 'keep' it, or 'fit' it on the pooled rows' fitted opinions "
                        "(evaluate.py's rule); the suggestion is printed either way")
    p.add_argument("--version", help="the new bundle's version (default: --model's)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    bundle = load_bundle(args.model)
    if bundle.card.reader is None:
        p.error(f"{args.model} has no lesion reader (training/add_reader.py adds one)")
    rows, groups = pooled_rows(args.reports, bundle, p.error)
    labels = np.array([r["label"] for r in rows])
    if len(np.unique(labels)) < 2:
        p.error("the pooled rows hold one class only: a calibration needs both")
    if args.fusion == "stacked":
        return write_stacked(args, bundle, rows, groups, argv, p.error)
    weight, slope, intercept, table = choose(rows, groups, args.fusion, args.ece_max, bundle.card.positive_class)
    for w, row in table.items():
        print(f"{args.fusion} {w}: NLL {row['nll']:.4f}  ECE {row['ece']:.3f}  AUC {row['auc']:.4f}  group ECE "
              f"{[round(e, 3) for e in row['group_ece'].values()]}")
    if weight is None:
        print(f"no weight has a calibrated ECE <= {args.ece_max} on the pool and on every group: nothing written")
        return 1
    fitted_on = describe_pool(rows, groups, len(args.reports))
    print(f"{args.fusion} weight {weight}: case calibration slope {slope:.3f}, intercept {intercept:.3f}; {fitted_on}")
    card = bundle.card
    fit = {"fitted_on": fitted_on, "criterion": f"lowest pooled NLL after the Platt fit among ECE <= {args.ece_max} "
                                                "on the pool and on every group",
           "command": "python training/fit_reader_fusion.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "validation": {args.fusion: {w: {k: v for k, v in row.items() if k in ("nll", "ece", "auc")}
                                        for w, row in table.items()}}}
    reader = dataclasses.replace(card.reader, fusion=args.fusion, weight=weight,
                                 training={**card.reader.training, "weight_fit": fit})
    calibration = {"slope": slope, "intercept": intercept, "fitted_on": fitted_on}
    card = with_review_threshold(args, dataclasses.replace(card, reader=reader, case_calibration=calibration,
                                                           version=args.version or card.version), rows)
    path = save_bundle(bundle.model, card, args.out, overwrite=args.overwrite, reader=bundle.reader)
    print(f"wrote {path} (version {card.version}); test it on new seeds: evaluate.py --test-seeds-from ...")
    return 0


def describe_pool(rows: list[dict], groups: dict[str, list[int]], reports: int) -> str:
    """How a pooled fit names its data (the card's ``fitted_on``)."""
    seeds = sorted(r["seed"] for r in rows)
    return (f"{len(rows)} cases pooled from {reports} evaluate.py reports (seeds {seeds[0]}..{seeds[-1]}, groups: "
            + ", ".join(f"{g} ({len(i)})" for g, i in groups.items()) + ")")


def write_stacked(args: argparse.Namespace, bundle, rows: list[dict], groups: dict[str, list[int]],
                  argv: Optional[list[str]], error) -> int:
    """``--fusion stacked``: fit the coefficients on the pool and write the bundle if they are calibrated enough
    (``error``: argparse's, called on unusable arguments or rows)."""
    missing = [r["seed"] for r in rows if r["reader_score"] is not None and r.get("reader_probabilities") is None]
    if missing:
        error(f"--fusion stacked needs the reader's three probabilities of each read case; {len(missing)} rows "
              f"(seeds {missing[:3]}...) lack them: rescore those reports with training/rescore_reader.py --model "
              f"{args.model} and pool the rescored reports instead")
    if not args.l2 >= 0:
        error(f"--l2 must be >= 0, got {args.l2}")
    pos = bundle.card.positive_class
    coefficients = fit_stacking(rows, args.l2)
    figures = stacked_figures(rows, groups, coefficients, pos)
    print("stacked: " + ", ".join(f"{t} {v:+.3f}" for t, v in coefficients.items()))
    print(f"stacked: NLL {figures['nll']:.4f}  ECE {figures['ece']:.3f}  AUC {figures['auc']:.4f}  group ECE "
          f"{[round(e, 3) for e in figures['group_ece'].values()]}")
    if figures["ece"] > args.ece_max or any(e > args.ece_max for e in figures["group_ece"].values()):
        print(f"the stacked opinions' ECE exceeds {args.ece_max} on the pool or on a group: nothing written")
        return 1
    fitted_on = describe_pool(rows, groups, len(args.reports))
    card = bundle.card
    fit = {"fitted_on": fitted_on,
           "criterion": f"logistic regression (L2 {args.l2} on all but the intercept), written if the ECE is <= "
                        f"{args.ece_max} on the pool and on every group",
           "command": "python training/fit_reader_fusion.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "validation": {"stacked": {k: v for k, v in figures.items()}}}
    reader = dataclasses.replace(card.reader, fusion="stacked", weight=1.0, stacking=coefficients,
                                 training={**card.reader.training, "weight_fit": fit})
    calibration = {"slope": 1.0, "intercept": 0.0, "fitted_on": fitted_on,
                   "note": "the identity: the stacked reader rule is a logistic model fitted on these cases"}
    card = with_review_threshold(args, dataclasses.replace(card, reader=reader, case_calibration=calibration,
                                                           version=args.version or card.version), rows)
    path = save_bundle(bundle.model, card, args.out, overwrite=args.overwrite, reader=bundle.reader)
    print(f"wrote {path} (version {card.version}); test it on new seeds: evaluate.py --test-seeds-from ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
