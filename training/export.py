"""Export trained weights as a model bundle (``model.safetensors`` + ``model.json``) with its model card.

Example:
    python training/export.py --run runs/small --report runs/small/eval/report.json \
        --out Resources/Models/uml-breast-dce-small --overwrite

The card takes the architecture from ``RUN/model_config.json``, the training settings and the exact training
command from ``RUN/train_config.json``, the git commit, and the measured metrics from an evaluation report
written by ``training/evaluate.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file

from umlcore.bundle import InputSpec, ModelCard, MotionCorrection, Segment, load_bundle, save_bundle
from umlcore.config import UMLConfig
from umlcore.network import UMLNet

# SNOMED CT codes as used by Slicer's terminology (DICOM CID 7150 / 7151 style entries)
LESION = Segment(
    label=1,
    name="Lesion",
    color=(0.90, 0.35, 0.10),
    terminology={
        "category": {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"},
        "type": {"scheme": "SCT", "code": "4147007", "meaning": "Mass"},
        "region": {"scheme": "SCT", "code": "76752008", "meaning": "Breast"},
    },
)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def training_record(run: Path, weights: str = "best.safetensors") -> dict:
    """The card's ``training`` entry for ``weights`` of the train.py output folder ``run``: the data, the settings,
    the exact command (and every invocation, resumes included), the epochs and the git commit."""
    train_cfg = json.loads((run / "train_config.json").read_text())
    state = json.loads((run / "last.json").read_text()) if (run / "last.json").exists() else {}
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in train_cfg.items())
    return {
        "data": "synthetic breast DCE-MRI (umlcore.synthetic), training seeds "
                f"[{train_cfg['seed_base']}, {train_cfg['seed_base'] + train_cfg['train_cases']}), "
                f"validation seeds from 1000000, label noise {train_cfg['label_noise']}",
        "seed": train_cfg["seed"],
        "epochs_planned": train_cfg["epochs"],
        "epochs_completed": state.get("epoch"),
        "weights": weights,  # best.safetensors = best validation epoch, last.safetensors = the final epoch
        "best_epoch": state.get("best_epoch"),
        "best_validation": state.get("best_metrics"),
        "commit": git_commit(),
        "command": f"python training/train.py {flags}",
        "invocations": (run / "commands.txt").read_text().splitlines() if (run / "commands.txt").exists() else [],
        "config": train_cfg,
    }


def build_card(run: Path, report: Optional[dict], model_id: str, version: str, review_uncertainty: float,
               weights: str = "best.safetensors", component_max_uncertainty: Optional[float] = None) -> ModelCard:
    arch = UMLConfig.from_json((run / "model_config.json").read_text())
    train_cfg = json.loads((run / "train_config.json").read_text())
    training = training_record(run, weights)
    preset, context = train_cfg.get("preset", "small"), int(train_cfg.get("context_slices", 0))
    metrics = {}
    calibration, component_threshold, views, motion = None, None, "none", MotionCorrection()
    if report is not None:
        metrics = {"test_set": report.get("dataset"), "command": report.get("command"), **report.get("summary", {})}
        calibration = metrics.pop("case_calibration", None)
        component_threshold = metrics.pop("component_max_uncertainty", None)
        views = metrics.pop("test_time_augmentation", "none")  # the rules the metrics were measured with
        motion = MotionCorrection(**metrics.pop("motion_correction", {}))
    if component_max_uncertainty is not None:
        component_threshold = component_max_uncertainty
    return ModelCard(
        id=model_id,
        version=version,
        name=f"UML breast DCE-MRI lesion segmentation + suspicion ({preset}{', 2.5D' if context else ''})",
        task="breast-dce-mri-lesion",
        description=(
            f"Uncertainty-informed Mutual Learning network ({preset} preset"
            + (f", 2.5D: {context} neighbouring slice(s) on each side as extra channels" if context else "")
            + ") trained on synthetic breast DCE-MRI. "
            "Input: one DCE-MRI volume (any phase or a subtraction image; replicated into the three channels) or "
            "the pre-contrast, early and late post-contrast phases. Output: lesion segmentation, per-voxel "
            "evidential uncertainty, and a case-level suspicion opinion (washout kinetics or spiculated margin). "
            "Research use only; not for diagnosis."
        ),
        classes=("low suspicion", "high suspicion"),
        segments=(LESION,),
        input=InputSpec(channels=("pre", "early", "late"), context_slices=context, motion_correction=motion),
        architecture=arch,
        positive_class=1,
        review_uncertainty=review_uncertainty,
        case_calibration=calibration,
        component_max_uncertainty=component_threshold,
        test_time_augmentation=views,
        training=training,
        metrics=metrics,
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="training output folder (holds best.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--report", type=Path, help="evaluation report.json to copy the measured metrics from")
    p.add_argument("--id", default="uml-breast-dce-small")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--weights", default="best.safetensors", help="file in --run to export")
    p.add_argument("--review-uncertainty", type=float, default=None,
                   help="case uncertainty above which the verdict is 'review' (default: from the report, else 0.3)")
    p.add_argument("--component-max-uncertainty", type=float, default=None,
                   help="the card's component filter (default: the report's choice, else none); e.g. 0.08 to compare "
                        "a run with the shipped model before a calibration run has chosen one")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for needed in (args.weights, "model_config.json", "train_config.json"):
        if not (args.run / needed).is_file():
            p.error(f"{args.run / needed} is missing: give the --run folder that training/train.py wrote")
    report = json.loads(args.report.read_text()) if args.report else None
    review = args.review_uncertainty
    if review is None:
        review = float((report or {}).get("summary", {}).get("suggested_review_uncertainty", 0.3))
    t = args.component_max_uncertainty
    if t is not None and not 0.0 < t <= 1.0:
        p.error(f"--component-max-uncertainty must be in (0, 1], got {t}")
    card = build_card(args.run, report, args.id, args.version, review, args.weights, t)
    model = UMLNet(card.architecture)
    model.load_state_dict(load_file(str(args.run / args.weights)))
    path = save_bundle(model, card, args.out, overwrite=args.overwrite)
    bundle = load_bundle(path)  # verify what we wrote
    size = (path / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {path} ({size:.2f} MB weights, sha256 {bundle.sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
