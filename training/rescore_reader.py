"""Score another lesion reader on the cases of an ``evaluate.py`` run in minutes, without running the network again.

``evaluate.py --keep-reader-patches`` keeps, for every validation and test case its reader read, the reader's input
patches (``reader_patches.npz``). A bundle with the same network (so the same segmentation and the same patches)
and another reader, e.g. the output of ``add_reader.py --reader`` (step 1), gets here:

- its reader's score for every case, from those patches (what its predictor would compute), and the most suspicious
  lesion's three probabilities (``reader_probabilities``, what the rule ``"stacked"`` reads);
- each case's opinion as its predictor would give it: the network's opinion (kept in the rows) merged with that
  score by the card's rule and weight and calibrated by the card's calibration, or, with ``--reader-weight fit``,
  by a rule, weight and calibration fitted on the validation rows exactly as ``evaluate.py --reader-weight fit``
  fits them;
- an ``evaluate.py`` report (``report.json``, ``report.md``, ``reliability.png``) of that bundle with the case
  figures recomputed; the segmentation, pixel and single-volume figures are the first run's (a reader changes
  none of them), and the noise-robustness passes are left out (their patches are not kept).
  ``add_reader.py --report`` (step 2) writes it into the card like any evaluate report.

The cases stay the first run's: a test set used to compare several readers becomes a selection set; confirm the
chosen one on new seeds (``evaluate.py --test-seeds-from``).

Example:
    python training/evaluate.py --model Resources/Models/uml-breast-dce-small --out runs/sel/eval \\
        --calibrate-cases 400 --component-filter bundle --cases 400 --test-seeds-from 2002000 \\
        --robustness-cases 1 --mode-cases 1 --workers 2 --keep-reader-patches
    python training/add_reader.py --model Resources/Models/uml-breast-dce-small \\
        --reader runs/roi-hard/roinet.safetensors --reader-report runs/roi-hard/report.json --version 1.6.0 \\
        --out runs/v160
    python training/rescore_reader.py --report runs/sel/eval/report.json --model runs/v160 --out runs/v160/sel \\
        --reader-weight fit --reader-fusion evidence
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from umlcore import metrics
from umlcore.bundle import load_bundle
from umlcore.errors import BundleError
from umlcore.reader import dihedral_views, most_suspicious, read_patches, suspicion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import (READER_INPUT_FIELDS, READER_WEIGHTS, card_opinions, case_metrics, fit_calibration,  # noqa: E402
                      fit_reader, json_safe, network_sha256, suggest_review_uncertainty, write_markdown)

#: Figures of an evaluate.py summary that the reader does not change (segmentation and voxels), copied as they are.
SEGMENTATION_KEYS = ("cases", "cases_with_lesion", "dice_mean", "dice_median", "hd95_mm_median", "hd95_inf_cases",
                     "dice_by_lesion_size", "pixel_uncertainty_error_auroc", "pixel_error_rate", "pixel_ece")


def score_patches(reader: torch.nn.Module, patches: np.ndarray, tta: str = "none") -> tuple[float, list[float]]:
    """The case score the predictor gives from the reader's input ``patches (N, C, P, P)``: the most suspicious
    component's :func:`umlcore.reader.suspicion` (the same computation as ``Predictor._read_lesions``, on the CPU),
    with the card's test-time augmentation ``tta``, and that component's three probabilities (what rule
    ``"stacked"`` reads)."""
    p = read_patches(reader, torch.from_numpy(patches), tta).cpu().numpy().astype(np.float64)
    return float(suspicion(p).max()), [float(v) for v in most_suspicious(p)]


def original_patches(patches: np.ndarray) -> np.ndarray:
    """The patches themselves from kept patches: files written before ``evaluate.py`` kept only those hold, for a
    reader with test-time augmentation ``"dihedral"``, each patch's 8 views (:func:`umlcore.reader.dihedral_views`);
    an array that is exactly such views gives its first eighth (reading those in 8 views again gave the same scores,
    8 times slower), any other array is returned as it is."""
    n = patches.shape[0] // 8
    if n == 0 or patches.shape[0] % 8:
        return patches
    first = torch.from_numpy(np.ascontiguousarray(patches[:n]))
    return patches[:n] if np.array_equal(dihedral_views(first).numpy(), patches) else patches


def rescored_rows(rows: list[dict], kept, section: str, reader: torch.nn.Module, error, tta: str = "none") -> list[dict]:
    """Copies of ``rows`` whose ``reader_score`` and ``reader_probabilities`` are ``reader``'s (with test-time
    augmentation ``tta``), from the kept patches of ``section``."""
    out = []
    for r in rows:
        key = f"{section}-{r['seed']}"
        if (key in kept) != (r["reader_score"] is not None):
            error(f"the kept patches do not match the report's {section} rows (seed {r['seed']}): keep the "
                  "reader_patches.npz that evaluate.py wrote with this report.json")
        row = {k: v for k, v in r.items() if not k.startswith("compare_")}
        row["reader_score"], row["reader_probabilities"] = (
            score_patches(reader, original_patches(kept[key]), tta) if key in kept else (None, None))
        out.append(row)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", required=True, type=Path, help="report.json of evaluate.py --keep-reader-patches")
    p.add_argument("--model", required=True, type=Path, help="a bundle of the same network with the reader to score")
    p.add_argument("--out", required=True, type=Path, help="folder for the new report")
    p.add_argument("--reader-weight", default="bundle", choices=["bundle", "fit"],
                   help="'fit': the rule's weight and the case calibration fitted on the report's validation rows "
                        "(as evaluate.py --reader-weight fit); 'bundle': the card's weight and calibration")
    p.add_argument("--reader-fusion", default="bundle", choices=["bundle", *READER_WEIGHTS, "fit"],
                   help="with --reader-weight fit: the rule whose weight is fitted ('bundle': the card's; 'fit': all)")
    args = p.parse_args(argv)
    if args.reader_fusion != "bundle" and args.reader_weight != "fit":
        p.error("--reader-fusion chooses the rule whose weight is fitted: add --reader-weight fit")
    stacked_fit = args.reader_weight == "fit" and args.reader_fusion == "bundle"  # checked once the card is read
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as e:
        p.error(f"--report {args.report}: cannot read it as JSON ({e})")
    kept_info = report.get("reader_patches")
    if not kept_info:
        p.error(f"--report {args.report} kept no reader patches: run evaluate.py with --keep-reader-patches")
    kept_path = args.report.parent / kept_info["file"]
    if not kept_path.is_file():
        p.error(f"{kept_path}: no such file (evaluate.py writes it beside report.json)")
    try:
        bundle = load_bundle(args.model)
    except BundleError as err:
        p.error(str(err))
    card = bundle.card
    problems = []
    if bundle.reader is None or card.reader is None:
        problems.append("it has no lesion reader (training/add_reader.py --reader adds one)")
    else:
        theirs = kept_info["reader_input"]
        ours = {k: getattr(card.reader, k) for k in READER_INPUT_FIELDS}
        if ours != theirs:
            problems.append(f"its reader reads other patches ({ours}, the kept ones: {theirs})")
    if network_sha256(bundle.model) != kept_info["network_sha256"]:
        problems.append("its network is not the one that segmented the report's cases")
    if card.component_max_uncertainty != report.get("summary", {}).get("component_max_uncertainty"):
        problems.append("its component filter is not the report's")
    if problems:
        p.error(f"--model {args.model} cannot be scored on {args.report}: " + "; ".join(problems))
    if stacked_fit and card.reader.fusion == "stacked":
        p.error(f"--reader-weight fit: {args.model}'s rule 'stacked' has coefficients, not a weight: fit them with "
                "training/fit_reader_fusion.py --fusion stacked, or name another rule with --reader-fusion")
    # validation rows taken from an earlier report (--validation-from) have no kept patches
    validation = [] if "validation_cases_from" in report else report.get("validation_cases") or []
    if args.reader_weight == "fit" and not validation:
        p.error(f"--reader-weight fit needs validation rows with kept patches; {args.report} has none: run "
                "evaluate.py with --calibrate-cases N --keep-reader-patches (without --validation-from)")
    reader = bundle.reader.cpu().eval()
    with np.load(kept_path) as npz:
        kept = {k: npz[k] for k in npz.files}
    tta = card.reader.test_time_augmentation
    test = rescored_rows(report["cases"], kept, "test", reader, p.error, tta)
    val = rescored_rows(validation, kept, "validation", reader, p.error, tta) if validation else []
    pos = card.positive_class

    summary: dict = {k: report["summary"][k] for k in SEGMENTATION_KEYS if k in report.get("summary", {})}
    reader_fit = calibration = None
    if args.reader_weight == "fit":
        reader_fit, merged = fit_reader(val, card, args.reader_fusion)
        calibration = fit_calibration(merged[:, pos] / merged.sum(axis=1),
                                      np.array([r["label"] for r in val], dtype=int), val)
        card = dataclasses.replace(card, case_calibration=calibration, reader=dataclasses.replace(
            card.reader, weight=reader_fit["weight"], fusion=reader_fit["fusion"]))
        print(f"reader: fusion {reader_fit['fusion']!r}, weight {reader_fit['weight']}; case calibration: slope "
              f"{calibration['slope']:.3f}, intercept {calibration['intercept']:.3f}")
    test = card_opinions(test, card, calibrated=True)
    figures, (probs, labels, _, _) = case_metrics(test)
    summary.update(figures)
    if val:  # the review threshold is suggested from the calibrated validation opinions, as evaluate.py does
        final = card_opinions(val, card, calibrated=True)
        u = np.array([r["uncertainty"] for r in final])
        correct = np.array([(r["positive_probability"] >= 0.5) == bool(r["label"]) for r in final], dtype=int)
        summary["suggested_review_uncertainty"] = suggest_review_uncertainty(u, correct)
        summary["suggested_review_uncertainty_from"] = "validation"
    if calibration is not None:
        summary["case_calibration"] = calibration
    summary["component_max_uncertainty"] = card.component_max_uncertainty
    if reader_fit is not None:
        summary["reader_weight"] = reader_fit
    modes = {k: v for k, v in (report.get("input_modes") or {}).items() if k != "phases"}  # no reader in one volume
    command = "python training/rescore_reader.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = {
        "model": {"id": card.id, "version": card.version, "sha256": bundle.sha256},
        "command": command,
        "dataset": report.get("dataset"),
        "rescored_from": {"report": str(args.report), "command": report.get("command")},
        "summary": summary,
        "robustness": [{"sigma": 0.0, **{k: v for k, v in summary.items() if not isinstance(v, dict)}}],
        "input_modes": {**modes, "phases": {k: v for k, v in summary.items() if not isinstance(v, dict)}},
        "cases": test,
    }
    if val:  # uncalibrated, with the bundle's own rule and weight (as evaluate.py keeps them)
        out["validation_cases"] = card_opinions(val, bundle.card, calibrated=False)
        out["validation_cases_reader"] = {"fusion": bundle.card.reader.fusion, "weight": bundle.card.reader.weight}
    args.out.mkdir(parents=True, exist_ok=True)
    metrics.plot_reliability_diagram(probs, labels, path=str(args.out / "reliability.png"))
    (args.out / "report.json").write_text(json.dumps(json_safe(out), indent=2, allow_nan=False))
    write_markdown(out, args.out / "report.md")
    print(json.dumps(json_safe({k: v for k, v in summary.items() if not isinstance(v, dict)}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
