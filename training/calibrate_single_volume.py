"""Fit a bundle's case calibration for single-volume inputs, measure it, and write the bundle again.

A case given as **one** volume (a single DCE phase or a subtraction image, replicated into the three channels: what
most users have loaded) gets weaker and differently biased case opinions than the three phases, so the card's
``case_calibration`` (fitted on three-phase cases) does not fit them. This script fits the card's
``single_volume_calibration``, which the predictor applies instead whenever one volume is given:

1. Run the bundle with no calibration on ``--fit-cases`` validation cases per input mode (``pre``, ``early``,
   ``late``, ``subtraction``; each mode on its own validation seeds, from 1,000,000) and fit one Platt calibration
   (:func:`umlcore.fusion.fit_platt`) on all of them: the predictor cannot tell which phase it was given.
2. Run it on ``--test-cases`` test cases per mode (the same seeds, from 2,000,000, for every mode) and measure each
   mode with the card's three-phase calibration (what a bundle without a single-volume calibration does), with the
   card's single-volume calibration where it has one (*kept*), and with the new one (*refit*). A Platt calibration
   keeps the opinion's strength, so all come from one pass (the raw opinion is recorded per case).
3. Write ``OUT/report.json`` (per-case rows) and ``OUT/report.md``, and with ``--export`` the bundle with the
   chosen calibration (``--export-calibration refit``, the default, or ``kept``: the card's own, re-measured, e.g.
   after its network was replaced) and its measured figures in the card's ``metrics.single_volume`` (same weights,
   reader and refiner).

Example (CPU, 2 cores: about 4.5 s per case and mode):
    python training/calibrate_single_volume.py --model Resources/Models/uml-breast-dce-small --out runs/sv \
        --fit-cases 80 --test-cases 100 --export runs/sv/bundle --version 1.2.2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Literal, Optional, get_args

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import SINGLE_VOLUME_MODES, TEST_SEED_BASE, VAL_SEED_BASE, ece_sampling_floor, evaluate_cases, json_safe  # noqa: E402
from umlcore import metrics  # noqa: E402
from umlcore.bundle import load_bundle, save_bundle  # noqa: E402
from umlcore.fusion import calibrate_case_alpha, fit_platt  # noqa: E402
from umlcore.predictor import Predictor  # noqa: E402

ExportCalibration = Literal["refit", "kept"]


def recalibrate(rows: list[dict], calibration: Optional[dict], positive: int = 1) -> np.ndarray:
    """Positive probabilities of raw binary case opinions ``(raw_positive_probability, uncertainty)`` after
    ``calibration`` (``None``: unchanged), exactly as the predictor applies it (strength ``S = 2 / u`` kept)."""
    out = []
    for r in rows:
        p, strength = r["raw_positive_probability"], 2.0 / r["uncertainty"]
        alpha = np.empty(2)
        alpha[positive], alpha[1 - positive] = strength * p, strength * (1.0 - p)
        if calibration is not None:
            alpha = calibrate_case_alpha(alpha, calibration["slope"], calibration["intercept"], positive)
        out.append(alpha[positive] / alpha.sum())
    return np.array(out)


def case_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    return {"cases": int(len(probs)), "auc": metrics.roc_auc(probs, labels),
            "ece": metrics.expected_calibration_error(probs, labels), "ece_sampling_floor": ece_sampling_floor(probs),
            "accuracy": metrics.accuracy(probs, labels), "brier": metrics.brier_score(probs, labels),
            "nll": metrics.nll(probs, labels), "mean_positive_probability": float(np.mean(probs))}


def run_modes(predictor: Predictor, cases: int, seed_base: int, per_mode_seeds: bool, args) -> list[dict]:
    """Raw opinions of ``cases`` cases per single-volume mode; with ``per_mode_seeds`` each mode gets its own seeds."""
    rows = []
    for i, mode in enumerate(args.modes):
        base = seed_base + (i * cases if per_mode_seeds else 0)
        res = evaluate_cases(predictor, cases, args.shape, args.label_noise, 0.0, mode, False, seed_base=base,
                             workers=args.workers)
        for r in res["_rows"]:
            r["mode"] = mode
            r["raw_positive_probability"] = r.pop("positive_probability")
        rows += res["_rows"]
        print(f"{mode}: {cases} cases from seed {base}, {time.strftime('%H:%M:%S')}", flush=True)
    return rows


def write_markdown(report: dict, path: Path) -> None:
    c = report["single_volume_calibration"]
    lines = [f"# Single-volume case calibration of `{report['model']['id']}` {report['model']['version']}", "",
             f"Command: `{report['command']}`", "",
             f"Platt fit on {c['fitted_on']}: slope {c['slope']:.3f}, intercept {c['intercept']:.3f} "
             f"(ECE of those cases with the three-phase calibration {c['validation_ece_before']:.3f}, "
             f"with the new one {c['validation_ece_after']:.3f}).", "",
             f"Test: {report['test_set']}.", "",
             "| input | cases | AUC | ECE before | ECE kept | ECE after | floor | Brier before / kept / after | "
             "NLL before / kept / after | accuracy before / after | mean p after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r: Optional[dict], key: str) -> str:
        return "-" if r is None else f"{r[key]:.3f}"

    for mode, r in report["test"].items():
        b, k, a = r["before"], r.get("kept"), r["after"]
        lines.append(f"| {mode} | {a['cases']} | {a['auc']:.3f} | {b['ece']:.3f} | {cell(k, 'ece')} | {a['ece']:.3f} | "
                     f"{a['ece_sampling_floor']:.3f} | {b['brier']:.3f} / {cell(k, 'brier')} / {a['brier']:.3f} | "
                     f"{b['nll']:.3f} / {cell(k, 'nll')} / {a['nll']:.3f} | {b['accuracy']:.3f} / {a['accuracy']:.3f} | "
                     f"{a['mean_positive_probability']:.2f} |")
    lines += ["", "*before*: the card's three-phase `case_calibration` applied to the single volume (what a "
              "bundle without a single-volume calibration does); *kept*: the card's own single-volume calibration "
              "(- where it has none); *after*: the one fitted here; *floor*: median ECE of a perfectly calibrated "
              "model with these opinions on this many cases."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle folder / zip")
    p.add_argument("--out", required=True, type=Path, help="folder for report.json and report.md")
    p.add_argument("--fit-cases", type=int, default=80, help="validation cases per mode to fit the calibration on")
    p.add_argument("--test-cases", type=int, default=100, help="test cases per mode to measure it on")
    p.add_argument("--modes", nargs="+", default=list(SINGLE_VOLUME_MODES), choices=SINGLE_VOLUME_MODES)
    p.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256))
    p.add_argument("--label-noise", type=float, default=0.02)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=1, help="processes generating the synthetic cases ahead")
    p.add_argument("--export", type=Path, help="write the bundle with the new calibration here")
    p.add_argument("--version", help="with --export: the new bundle's version (required: the card changes)")
    p.add_argument("--export-calibration", default="refit", choices=get_args(ExportCalibration),
                   help="with --export: write the calibration fitted here (refit) or keep the card's own single-volume "
                        "calibration and write its re-measured figures (kept)")
    p.add_argument("--overwrite", action="store_true", help="with --export: replace an existing bundle folder")
    args = p.parse_args(argv)
    if args.fit_cases < 2 or args.test_cases < 1:
        p.error("--fit-cases must be >= 2 and --test-cases >= 1")
    if args.export is None and args.export_calibration != "refit":
        p.error("--export-calibration chooses what --export writes: give --export FOLDER too (the report shows both "
                "calibrations without it)")
    if args.export is not None and not args.version:
        p.error("--export needs --version: the card changes, so the bundle needs a new version")
    bundle = load_bundle(args.model)
    if args.export_calibration == "kept" and bundle.card.single_volume_calibration is None:
        p.error(f"--export-calibration kept: {args.model}'s card has no single_volume_calibration to keep; "
                "export the refitted one (--export-calibration refit)")
    if bundle.card.architecture.num_classes != 2 or len(bundle.card.input.channels) < 2:
        p.error(f"{args.model}: a single-volume calibration needs a binary model that takes several channels")
    if args.export is not None and args.export.exists() and not args.overwrite:
        p.error(f"{args.export} exists: add --overwrite to replace it, or choose another --export folder")
    t0 = time.time()
    raw = dataclasses.replace(bundle.card, case_calibration=None, single_volume_calibration=None)
    predictor = Predictor(dataclasses.replace(bundle, card=raw), device=args.device, batch_size=16)
    fit_rows = run_modes(predictor, args.fit_cases, VAL_SEED_BASE, True, args)
    test_rows = run_modes(predictor, args.test_cases, TEST_SEED_BASE, False, args)

    fit_labels = np.array([r["label"] for r in fit_rows])
    if len(np.unique(fit_labels)) < 2:
        p.error("the fitting cases hold one class only: give more --fit-cases")
    slope, intercept = fit_platt(np.array([r["raw_positive_probability"] for r in fit_rows]), fit_labels)
    if slope <= 0:
        p.error(f"the fitted slope is {slope:.3f} (<= 0): on these cases the opinions do not separate the classes; "
                "give more --fit-cases")
    old, kept = bundle.card.case_calibration, bundle.card.single_volume_calibration
    new = {"slope": slope, "intercept": intercept,
           "fitted_on": f"{args.fit_cases} validation cases per input mode ({', '.join(args.modes)}), seeds "
                        f"{VAL_SEED_BASE}..{VAL_SEED_BASE + args.fit_cases * len(args.modes) - 1}, one volume each"}
    print(f"single-volume calibration: slope {slope:.3f}, intercept {intercept:.3f}", flush=True)
    rows = fit_rows + test_rows
    measured = {"before": old, "after": dict(new), **({"kept": kept} if kept is not None else {})}
    for when, calibration in measured.items():
        for r, q in zip(rows, recalibrate(rows, calibration)):
            r[f"positive_probability_{when}"] = float(q)
        if when != "kept":
            new[f"validation_ece_{when}"] = metrics.expected_calibration_error(
                np.array([r[f"positive_probability_{when}"] for r in fit_rows]), fit_labels)
    test = {}
    for mode in args.modes:
        rows = [r for r in test_rows if r["mode"] == mode]
        labels = np.array([r["label"] for r in rows])
        test[mode] = {when: case_metrics(np.array([r[f"positive_probability_{when}"] for r in rows]), labels)
                      for when in measured}
    report = {
        "model": {"id": bundle.card.id, "version": bundle.card.version, "sha256": bundle.sha256},
        "command": "python training/calibrate_single_volume.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "single_volume_calibration": new,
        "kept_single_volume_calibration": kept,
        "test_set": f"{args.test_cases} synthetic cases per mode, seeds {TEST_SEED_BASE}.."
                    f"{TEST_SEED_BASE + args.test_cases - 1}, shape {tuple(args.shape)}, label noise {args.label_noise}",
        "test": test,
        "seconds": round(time.time() - t0, 1),
        "fit_cases": fit_rows,
        "test_cases": test_rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    write_markdown(report, args.out / "report.md")
    print((args.out / "report.md").read_text())
    if args.export is not None:
        when = "after" if args.export_calibration == "refit" else "kept"
        card_metrics = dict(bundle.card.metrics)
        card_metrics["single_volume"] = json_safe({"test_set": report["test_set"], "command": report["command"],
                                                   **{m: r[when] for m, r in test.items()}})
        card = dataclasses.replace(bundle.card, version=args.version, metrics=card_metrics,
                                   single_volume_calibration=new if when == "after" else kept)
        path = save_bundle(bundle.model, card, args.export, overwrite=args.overwrite, reader=bundle.reader,
                           refiner=bundle.refiner)
        print(f"wrote {path} (sha256 {load_bundle(path).sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
