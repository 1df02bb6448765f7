"""Put a lesion reader trained by ``probe_roi.py`` into a model bundle (and, later, its measured calibration).

Two steps, because the case calibration must be refitted on opinions that include the reader:

1. ``--reader``: the reader's weights become the ``reader.*`` tensors of the new bundle's ``model.safetensors``
   and its :class:`~umlcore.reader.ReaderConfig` the card's ``reader`` (with the probe run's command and
   validation figures from ``--reader-report``, and ``--test-time-augmentation``); the network's weights and
   everything else are copied.
2. ``--report``: an ``evaluate.py --calibrate-cases N --component-filter bundle`` report of that bundle supplies
   the refitted ``case_calibration`` and the measured test metrics of the card (the single-volume calibration
   stays: the reader does not read single volumes), and, from ``--reader-weight fit``, the reader weight chosen on
   the validation cases, and its fusion rule (the table goes to the reader's ``training.weight_fit``). The card's
   ``review_uncertainty`` stays, also with the rule ``"evidence"`` (which may lower the case uncertainty): it is the
   threshold of the network's uncertainty, which single volumes and foreign images are judged by (the report's
   ``suggested_review_uncertainty`` is printed for comparison). A test-only report (no ``--calibrate-cases``) of a
   bundle whose reader weight and calibration ``training/fit_reader_fusion.py`` fitted together keeps that
   calibration. The card also takes the network's test-time augmentation rule the report was
   measured with (``evaluate.py --test-time-augmentation``), so its metrics and its rule come from one run.

``--segmentation-min-lesion T`` (alone) sets the card's ``reader.segmentation_min_lesion``: the reader then also
checks the segmentation of multi-phase cases (the labelmap keeps the largest components it reads as lesions with at
least that probability; ``--segmentation-max-components``, default 8, of them are read). The case opinion does not
change, so the calibration stands; measure the Dice with evaluate.py and put the report in with step 2. With
``--opinion-reads checked`` the case opinion reads the checked labelmap instead: refit its fusion
(``probe_lesion_check.py --fit-report``, then ``fit_reader_fusion.py``).

Example:
    python training/add_reader.py --model Resources/Models/uml-breast-dce-small \
        --reader docs/model-eval/roi/roinet.safetensors --reader-report docs/model-eval/roi/report.json \
        --version 1.3.0 --out runs/v130
    python training/evaluate.py --model runs/v130 --out runs/v130/eval --calibrate-cases 400 \
        --component-filter bundle --cases 400 --robustness-cases 1 --mode-cases 1
    python training/add_reader.py --model runs/v130 --report runs/v130/eval/report.json \
        --out Resources/Models/uml-breast-dce-small --overwrite
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file

from umlcore.bundle import MotionCorrection, load_bundle, save_bundle
from umlcore.errors import BundleError
from umlcore.reader import OPINION_READS, READER_TTA_MODES, LesionReader, ReaderConfig

PROBE_COMMAND = ("python training/probe_roi.py --model Resources/Models/uml-breast-dce-small --out runs/roi "
                 "--train-cases 1000 --val-cases 200 --test-cases 200 --steps 4000 --batch 32")

CHECK_SENTENCE = ("For multi-phase inputs the segmentation keeps only the regions the reader reads as lesions.")
READER_SENTENCE = ("A lesion reader (a second, small network) reads the margin and kinetics of the largest segmented "
                   "lesions from patches of all phases; its score is merged into the case opinion of multi-phase "
                   "inputs.")


def insert_sentence(description: str, sentence: str) -> str:
    """``description`` with ``sentence`` before its "Research use only" notice (or at its end)."""
    if " Research use only" in description:
        return description.replace(" Research use only", f" {sentence} Research use only", 1)
    return f"{description} {sentence}".strip()


def read_report(path: Path, bundle, model: Path, error) -> dict:
    """The ``evaluate.py`` report at ``path``; ``error(message)`` (argparse's) unless it evaluated ``bundle``."""
    report = json.loads(path.read_text())
    if report.get("model", {}).get("sha256") != bundle.sha256:
        error(f"{path} evaluated another bundle (sha256 {report.get('model', {}).get('sha256')!r}), not {model}: "
              "evaluate this one")
    return report


def with_measured_rule(card, summary: dict):
    """``card`` with the network's test-time augmentation rule and the motion correction its report was measured
    with (``evaluate.py --test-time-augmentation`` / ``--motion-correction``; reports before the fields: ``"none"``),
    popped from the report's ``summary``: the card's metrics and its rules come from the same run."""
    views = summary.pop("test_time_augmentation", "none")
    if views != card.test_time_augmentation:
        print(f"test_time_augmentation {card.test_time_augmentation!r} -> {views!r}: the rule the report was measured with")
    motion = MotionCorrection(**summary.pop("motion_correction", {}))
    if motion != card.input.motion_correction:
        print(f"motion_correction {card.input.motion_correction} -> {motion}: the rule the report was measured with")
    return dataclasses.replace(card, test_time_augmentation=views,
                               input=dataclasses.replace(card.input, motion_correction=motion))


def card_metrics(report: dict, summary: dict, card) -> dict:
    """The card's ``metrics`` from a report's ``summary`` (fields that are not metrics already removed), keeping the
    card's ``single_volume`` entry: measured without the reader and the refiner, which single volumes do not use."""
    metrics = {"test_set": report.get("dataset"), "command": report.get("command"), **summary}
    if "single_volume" in card.metrics:
        metrics["single_volume"] = card.metrics["single_volume"]
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the bundle to start from")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--reader", type=Path, help="roinet.safetensors written by probe_roi.py")
    p.add_argument("--reader-report", type=Path, help="that run's report.json (validation figures for the card)")
    p.add_argument("--reader-command", default=PROBE_COMMAND, help="the command that trained the reader")
    p.add_argument("--weight", type=float, default=0.5, help="the reader's share of the case opinion")
    p.add_argument("--test-time-augmentation", default="none", choices=READER_TTA_MODES,
                   help="step 1: 'dihedral' reads each patch in its 8 flips and transposes and averages (the weight "
                        "and calibration must then be fitted with it)")
    p.add_argument("--report", type=Path, help="evaluate.py report of --model: its case calibration and metrics")
    p.add_argument("--segmentation-min-lesion", type=float,
                   help="the reader keeps in the labelmap only the components it reads as lesions with at least this "
                        "probability, in (0, 1)")
    p.add_argument("--segmentation-max-components", type=int, default=8,
                   help="with --segmentation-min-lesion: how many of the largest components it reads (default 8)")
    p.add_argument("--opinion-reads", choices=OPINION_READS, default="filtered",
                   help="with --segmentation-min-lesion: the case opinion reads the components of the uncertainty-"
                        "filtered labelmap (default) or of the checked one (its fusion must then be refitted)")
    p.add_argument("--version", help="the new bundle's version (default: --model's)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.test_time_augmentation != "none" and args.reader is None:
        p.error("--test-time-augmentation belongs to step 1 (--reader): the report of step 2 was measured with the "
                "card's setting")
    if args.opinion_reads != "filtered" and args.segmentation_min_lesion is None:
        p.error("--opinion-reads belongs to the check of the segmentation: add --segmentation-min-lesion")
    if sum(a is not None for a in (args.reader, args.report, args.segmentation_min_lesion)) != 1:
        p.error("give --reader (step 1: add a reader), --report (step 2: its refitted calibration) or "
                "--segmentation-min-lesion (the reader checks the segmentation), one of them")
    for path in (args.reader, args.reader_report, args.report):
        if path is not None and not path.is_file():
            p.error(f"{path}: no such file")
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists: add --overwrite to replace it, or choose another --out folder")
    try:
        bundle = load_bundle(args.model)
    except BundleError as err:
        p.error(str(err))
    card, reader = bundle.card, bundle.reader
    if args.segmentation_min_lesion is not None:
        if reader is None:
            p.error(f"{args.model} has no reader: run step 1 (--reader) first")
        try:
            card = dataclasses.replace(card, reader=dataclasses.replace(
                card.reader, segmentation_min_lesion=args.segmentation_min_lesion,
                segmentation_max_components=args.segmentation_max_components, opinion_reads=args.opinion_reads))
        except BundleError as err:
            p.error(str(err))
        if CHECK_SENTENCE not in card.description:
            card = dataclasses.replace(card, description=insert_sentence(card.description, CHECK_SENTENCE))
    elif args.reader is not None:
        if card.architecture.num_classes != 2:
            p.error(f"{args.model} is not a binary model: the reader's score is one class's probability")
        training = {"command": args.reader_command, "weights": args.reader.name}
        if args.reader_report is not None:
            rep = json.loads(args.reader_report.read_text())
            training.update({k: rep[k] for k in ("train_patches", "val_patches", "val") if k in rep})
        config = ReaderConfig(weight=args.weight, test_time_augmentation=args.test_time_augmentation, training=training)
        reader = LesionReader(len(card.input.channels) * (2 * config.context_slices + 1), config.width)
        try:
            reader.load_state_dict(load_file(str(args.reader)))
        except Exception as err:  # another context or width, or not a reader at all
            p.error(f"{args.reader} does not fit a reader of {config}: {err}")
        description = card.description
        if READER_SENTENCE not in description:
            description = insert_sentence(description, READER_SENTENCE)
        card = dataclasses.replace(card, reader=config, description=description)
    else:
        if reader is None:
            p.error(f"{args.model} has no reader: run step 1 (--reader) first")
        report = read_report(args.report, bundle, args.model, p.error)
        summary = dict(report.get("summary", {}))
        calibration = summary.pop("case_calibration", None)
        if calibration is None:  # a test-only report: the card's calibration stands if it was fitted with the reader
            fit = card.reader.training.get("weight_fit") or {}
            calibration = card.case_calibration
            if calibration is None or calibration.get("fitted_on") != fit.get("fitted_on"):
                p.error(f"{args.report} has no case_calibration and the card's was not fitted together with its reader "
                        "weight (training/fit_reader_fusion.py does both): run evaluate.py with --calibrate-cases N")
        summary.pop("component_max_uncertainty", None)
        card = with_measured_rule(card, summary)
        measured_with = summary.pop("segmentation_min_lesion", None)
        if "segmentation_min_lesion" in report.get("summary", {}) and measured_with != card.reader.segmentation_min_lesion:
            p.error(f"{args.report} was measured with segmentation_min_lesion {measured_with!r}, the card has "
                    f"{card.reader.segmentation_min_lesion!r}: evaluate this bundle")
        weight_fit = summary.pop("reader_weight", None)  # evaluate.py --reader-weight fit
        if weight_fit is not None:
            training = {**card.reader.training, "weight_fit": {k: v for k, v in weight_fit.items()
                                                                         if k not in ("weight", "fusion")}}
            card = dataclasses.replace(card, reader=dataclasses.replace(
                card.reader, weight=weight_fit["weight"], fusion=weight_fit.get("fusion", "average"), training=training))
        card = dataclasses.replace(card, case_calibration=calibration, metrics=card_metrics(report, summary, card))
        if summary.get("suggested_review_uncertainty") is not None:
            print(f"review_uncertainty stays {card.review_uncertainty:g} (the report suggests "
                  f"{summary['suggested_review_uncertainty']:g} from its {summary.get('suggested_review_uncertainty_from')} "
                  "cases)")
    if args.version:
        card = dataclasses.replace(card, version=args.version)
    path = save_bundle(bundle.model, card, args.out, overwrite=args.overwrite, reader=reader)
    print(f"wrote {path} (version {card.version}, sha256 {load_bundle(path).sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
