"""Fit one of a bundle's settings on evaluated cases and write the bundle with it (same weights).

Examples (from the repository root; the reports are ``python -m training.evaluate`` runs of the same bundle, usually
on the validation split):
    python -m training.fit component-filter --model B --reports runs/val/report.json --out B2
    python -m training.fit check            --model B --reports runs/val/report.json --out B2
    python -m training.fit opinion          --model B --reports runs/val1/report.json runs/val2/report.json --out B2
    python -m training.fit single-volume    --model B --reports runs/val-pre/report.json ... --out B2
    python -m training.fit review           --model B --reports runs/val/report.json --out B2

What each writes (``training.fitting`` has the maths):

- ``component-filter``: ``component_max_uncertainty``, the uncertainty filter with the best mean lesion Dice (or
  none) over the network's components of the rows' three-phase cases.
- ``check``: the lesion reader's ``segmentation_min_lesion``, the check threshold with the best mean lesion Dice.
- ``opinion``: with a reader, its ``stacking`` coefficients (a logistic regression on the network's opinion and the
  most suspicious lesion's reader outputs, rounded to 3 decimals); without one, the ``case_calibration`` (Platt).
- ``single-volume``: the ``single_volume_calibration`` (Platt) on the rows given as one volume.
- ``review``: ``review_uncertainty``, the smallest case uncertainty whose retained cases reach the error rate of the
  surest half, from the opinions the card gives the rows.

Rows must come from a bundle with the same weights; ``opinion`` and ``review`` also need the card settings the rows
depend on (the component filter, the reader's check, the motion correction) to be the bundle's. Rows of the test
split become fitting data: measure the result on fresh seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from umlcore import metrics
from umlcore.bundle import load_bundle
from umlcore.card import STACKING_TERMS, ModelCard
from umlcore.errors import UMLInputError
from umlcore.fusion import opinion_from_network

from .cases import SINGLE_VOLUME_INPUTS
from .config import Parser, read_json, run_tool
from .evaluate import card_settings
from .export import save_with_card, with_version
from .fitting import (choose_check_threshold, choose_component_threshold, fit_platt, fit_stacking,
                      suggest_review_uncertainty)

__all__ = ["FITS", "read_rows", "row_alpha", "main"]


def read_rows(paths: list[Path], bundle, same_settings: bool) -> tuple[list[dict], str, set[str]]:
    """The rows of the evaluation reports at ``paths``, how to name them (``"validation seeds a..b; ..."``) and
    their splits.

    Raises:
        UMLInputError: a file that is not an evaluation report, a report of other weights (or, with
            ``same_settings``, other card settings), or a case twice.
    """
    rows, seen, parts, splits = [], set(), [], set()
    for path in paths:
        report = read_json(path, "a report.json of python -m training.evaluate")
        if not isinstance(report, dict) or not isinstance(report.get("rows"), list) or "model" not in report:
            raise UMLInputError(f"{path} is not a report of python -m training.evaluate: give its report.json")
        model = report["model"]
        if model.get("sha256") != bundle.sha256:
            raise UMLInputError(f"{path} evaluated other weights (sha256 {str(model.get('sha256'))[:12]}..., this "
                                f"bundle {bundle.sha256[:12]}...): evaluate this bundle")
        if same_settings and model.get("settings") != card_settings(bundle.card):
            raise UMLInputError(f"{path} was made with the card settings {model.get('settings')}, this bundle has "
                                f"{card_settings(bundle.card)}: evaluate this bundle")
        for r in map(_synthetic_vocabulary, report["rows"]):
            key = (r["seed"], r["input"], r["noise"])
            if key in seen:
                raise UMLInputError(f"case {key} is in two of the reports: give each case once")
            seen.add(key)
            rows.append(r)
        parts.append(f"{report['split']} seeds {report['seeds'][0]}..{report['seeds'][1]}" if "seeds" in report
                     else f"{report['split']} cases of {report['data']['spec']} ({len(report['rows'])} rows)")
        splits.add(report["split"])
    return rows, "; ".join(parts), splits


def _synthetic_vocabulary(row: dict) -> dict:
    """A dataset report's row in the words the fits read: its case id as ``seed``, its clean section (every channel,
    no noise) as ``phases``, its true segment voxels as ``lesion_voxels``."""
    if "case_id" not in row:
        return row
    return {**row, "seed": row["case_id"], "lesion_voxels": row["true_voxels"],
            "input": "phases" if row["section"] == "clean" else row["section"]}


def row_alpha(row: dict, positive: int = 1) -> np.ndarray:
    """The network's pooled binary Dirichlet of a row: ``S p`` for the positive class, ``S (1 - p)`` for the other,
    ``S = 2 / u`` (each kept >= 1 against round-off)."""
    strength = 2.0 / row["network_uncertainty"]
    alpha = np.empty(2)
    alpha[positive] = strength * row["network_positive_probability"]
    alpha[1 - positive] = strength - alpha[positive]
    return np.maximum(alpha, 1.0)


def _opinions(card: ModelCard, rows: list[dict], single_volume: bool) -> list[np.ndarray]:
    """The final Dirichlets ``card`` gives ``rows`` (the predictor's, from each row's network opinion and reading)."""
    return [opinion_from_network(card, row_alpha(r, card.positive_class), None if r["reader_probabilities"] is None
                                 else np.asarray(r["reader_probabilities"]), single_volume).alpha for r in rows]


def _phases(rows: list[dict], lesions: bool = False) -> list[dict]:
    """The rows of cases given as all phases without noise (``lesions``: those with a lesion), at least one."""
    out = [r for r in rows if r["input"] == "phases" and r["noise"] == 0 and (r["lesion_voxels"] or not lesions)]
    if not out:
        raise UMLInputError("the reports hold no case given as all phases without noise" + (" with a lesion" if lesions
                            else "") + ": evaluate with --inputs phases --noise 0 on more cases")
    return out


def _record(described: str, command: str, **figures) -> dict:
    return {"fitted_on": described, "command": command, **figures}


def fit_component_filter(card: ModelCard, rows: list[dict], described: str, command: str) -> tuple[ModelCard, dict]:
    threshold, table = choose_component_threshold(_phases(rows, lesions=True))
    record = _record(described, command, chosen=threshold, validation_dice=table)
    training = {**card.training, "fits": {**card.training.get("fits", {}), "component_max_uncertainty": record}}
    return dataclasses.replace(card, component_max_uncertainty=threshold, training=training), record


def fit_check(card: ModelCard, rows: list[dict], described: str, command: str) -> tuple[ModelCard, dict]:
    if card.reader is None:
        raise UMLInputError("this bundle has no lesion reader to check the segmentation: add one with "
                            "python -m training.export --reader")
    threshold, table = choose_check_threshold(_phases(rows, lesions=True))
    record = _record(described, command, chosen=threshold, validation_dice=table)
    reader = dataclasses.replace(card.reader, segmentation_min_lesion=threshold,
                                 training={**card.reader.training, "check_fit": record})
    return dataclasses.replace(card, reader=reader), record


def _opinion_figures(card: ModelCard, rows: list[dict], single_volume: bool) -> dict:
    """NLL, ECE and AUC of the opinions ``card`` gives ``rows``."""
    p = [a[card.positive_class] / a.sum() for a in _opinions(card, rows, single_volume)]
    y = [r["label"] for r in rows]
    return {"cases": len(rows), "nll": metrics.nll(p, y), "ece": metrics.expected_calibration_error(p, y),
            "auc": metrics.roc_auc(p, y)}


def fit_opinion(card: ModelCard, rows: list[dict], described: str, command: str) -> tuple[ModelCard, dict]:
    rows = _phases(rows)
    labels = [r["label"] for r in rows]
    network_p = [r["network_positive_probability"] for r in rows]
    if card.reader is None:
        slope, intercept = fit_platt(np.array(network_p), np.array(labels))
        before = metrics.expected_calibration_error(network_p, labels)
        fitted = dataclasses.replace(card, case_calibration={"slope": slope, "intercept": intercept})
        record = _record(described, command, validation_ece_before=before,
                         validation_ece_after=_opinion_figures(fitted, rows, False)["ece"])
        return dataclasses.replace(card, case_calibration={"slope": slope, "intercept": intercept, **record}), record
    w = fit_stacking(network_p, [r["reader_probabilities"] for r in rows], labels)
    stacking = {t: round(float(v), 3) for t, v in zip(STACKING_TERMS, w)}
    fitted = dataclasses.replace(card, case_calibration=None, reader=dataclasses.replace(card.reader, stacking=stacking))
    record = _record(described, command, criterion="logistic regression (L2 0.001 on all but the intercept) of the "
                     "network's log-odds and the most suspicious lesion's suspicion and three reader outputs; "
                     "coefficients rounded to 3 decimals", validation=_opinion_figures(fitted, rows, False))
    reader = dataclasses.replace(fitted.reader, training={**card.reader.training, "stacking_fit": record})
    return dataclasses.replace(fitted, reader=reader), record


def fit_single_volume(card: ModelCard, rows: list[dict], described: str, command: str) -> tuple[ModelCard, dict]:
    rows = [r for r in rows if r["input"] in SINGLE_VOLUME_INPUTS and r["noise"] == 0]
    if not rows:
        raise UMLInputError("the reports hold no case given as one volume: evaluate with --inputs pre early late "
                            "subtraction")
    network_p, labels = [r["network_positive_probability"] for r in rows], [r["label"] for r in rows]
    slope, intercept = fit_platt(np.array(network_p), np.array(labels))
    fitted = dataclasses.replace(card, single_volume_calibration={"slope": slope, "intercept": intercept})
    inputs = sorted({r["input"] for r in rows})
    record = _record(f"{described} ({', '.join(inputs)}, one volume each)", command,
                     validation_ece_before=metrics.expected_calibration_error(network_p, labels),
                     validation_ece_after=_opinion_figures(fitted, rows, True)["ece"])
    return dataclasses.replace(card, single_volume_calibration={"slope": slope, "intercept": intercept, **record}), record


def fit_review(card: ModelCard, rows: list[dict], described: str, command: str) -> tuple[ModelCard, dict]:
    rows = _phases(rows)
    opinions = _opinions(card, rows, False)
    u = np.array([len(a) / a.sum() for a in opinions])
    correct = np.array([(a[card.positive_class] / a.sum() >= 0.5) == bool(r["label"]) for a, r in zip(opinions, rows)])
    threshold = suggest_review_uncertainty(u, correct.astype(int))
    record = _record(described, command, chosen=threshold, review_share=float((u > threshold).mean()))
    training = {**card.training, "fits": {**card.training.get("fits", {}), "review_uncertainty": record}}
    return dataclasses.replace(card, review_uncertainty=threshold, training=training), record


FITS: dict[str, Callable[[ModelCard, list, str, str], tuple[ModelCard, dict]]] = {
    "component-filter": fit_component_filter, "check": fit_check, "opinion": fit_opinion,
    "single-volume": fit_single_volume, "review": fit_review}


#: What a fit of the segmentation leaves to refit: the card fields fitted on the segmentation it changes.
_FITTED_ON_SEGMENTATION = ("case_calibration", "reader.stacking", "review_uncertainty")


def build_parser() -> Parser:
    p = Parser(prog="python -m training.fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=list(FITS), help="the setting to fit")
    p.add_argument("--model", required=True, help="the bundle (folder or .zip) whose evaluated cases the reports hold")
    p.add_argument("--reports", required=True, nargs="+", type=Path, help="report.json files of python -m training.evaluate")
    p.add_argument("--out", required=True, type=Path, help="the bundle to write (the same weights, the fitted card)")
    p.add_argument("--version", help="the new bundle's version (default: the model's)")
    p.add_argument("--changelog", help="one line for the card's changelog under that version")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m training.fit " + " ".join(sys.argv[1:] if argv is None else argv)
    bundle = load_bundle(args.model)
    rows, described, splits = read_rows(args.reports, bundle, same_settings=args.what not in ("component-filter", "check"))
    try:
        card, record = FITS[args.what](bundle.card, rows, described, command)
    except ValueError as exc:  # e.g. cases of one class only
        raise UMLInputError(f"cannot fit {args.what} on these cases ({exc}): evaluate more cases") from None
    path = save_with_card(bundle, with_version(card, args.version, args.changelog), args.out, args.overwrite)
    shown = {k: v for k, v in record.items() if k not in ("fitted_on", "command")}
    print(f"{args.what}: {json.dumps(shown)}")
    if args.what in ("component-filter", "check"):
        print("note: the case opinion reads what the segmentation keeps: evaluate the new bundle on validation cases "
              "and refit what it has of " + ", ".join(_FITTED_ON_SEGMENTATION))
    if "test" in splits:
        print("note: test-split cases are fitting data from now on: measure the result on cases no fit has seen "
              "(fresh seeds, or cases of the dataset outside this split)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "python -m training.fit"))
