"""Measure a model bundle end to end on held-out synthetic cases or a dataset's split, through ``umlcore``'s predictor.

Examples (from the repository root):
    python -m training.evaluate --model Resources/Models/uml-breast-dce-small --out runs/eval --cases 100
    python -m training.evaluate --model B --data refuge:/data/REFUGE --split-file RUN/split.json --noise 0.1 --out E

``--data KIND:PATH`` (``ispy1``, ``refuge``, ``isic2017``, ``folder``) evaluates the cases of one part of a split
file (``--split train|val|test``, ``--split-file``: the training run's ``split.json``) clean and under every
``--noise`` sigma and ``--salt-pepper`` amount: AUC, accuracy, kappa, sensitivity, specificity, F1, ECE, NLL,
Brier of the case class; per segment Dice, ASSD and HD95; the pixel uncertainty-error AUROC and the case
risk-coverage (:mod:`training.evaluate_dataset`). Its ``report.json`` has the noise-free figures under
``figures["clean"]``. What follows is the synthetic evaluation (``--data synthetic``, the default).

Each case is given as a user would give it (``--inputs``: the three phases, one phase, or the subtraction image),
optionally with Gaussian noise (``--noise``: sigmas as a fraction of each volume's 0.5-99.5 percentile range).
``OUT/report.json`` holds, per input and noise level, the figures (segmentation: Dice, HD95, lesion-free cases with
a false lesion; case opinion: accuracy, AUC, ECE, Brier, NLL, risk-coverage, against the reported and the clean
labels; pixels: ECE of the foreground probability and the uncertainty-error AUROC over every voxel) and one row
per case (:func:`case_row`): the rows are what ``python -m training.fit`` fits thresholds and calibrations on, and
``python -m training.export --report`` writes the ``phases`` figures into a card. ``OUT/report.md`` is the table
for people, ``OUT/reliability.png`` the reliability diagram of the case opinion (three phases, no noise).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import SimpleITK as sitk

from umlcore import metrics
from umlcore.bundle import load_bundle
from umlcore.components import label_components
from umlcore.errors import UMLInputError
from umlcore.predictor import Prediction, Predictor
from umlcore.preprocess import to_slices
from umlcore.reader import READER_TARGETS
from umlcore.synthetic import SyntheticCase

from .cases import INPUT_MODES, add_noise, input_volumes, synthetic_stream
from .config import check_shape, config_parser, parse_config, run_tool
from .data import DataSpec
from .fitting import suggest_review_uncertainty
from .splits import seeds

__all__ = ["EvaluateConfig", "case_row", "section_figures", "card_settings", "evaluate", "main"]


@dataclass
class EvaluateConfig:
    """The settings of an evaluation run."""

    model: str = ""  # the bundle folder / zip (required)
    out: str = "runs/eval"
    data: str = "synthetic"  # synthetic, or KIND:PATH (ispy1, refuge, isic2017, folder) of a dataset
    split: Literal["validation", "test", "val", "train"] = "test"  # synthetic: validation|test; dataset: train|val|test
    split_file: str = ""  # a dataset's split (required with --data KIND:PATH: the training run's split.json)
    first_seed: int = -1  # -1: the split's first seed (training.splits); a later one gives cases no report has seen
    cases: int = -1  # -1: 100 synthetic cases, or every case of the dataset's split; a dataset: 0 = every case
    inputs: tuple[str, ...] = ("phases",)  # each case given as: phases, pre, early, late, subtraction
    noise: tuple[float, ...] = (0.0,)  # each case also with this Gaussian noise (fraction of the intensity range)
    salt_pepper: tuple[float, ...] = ()  # a dataset's cases also with this fraction of pixels set to min / max
    shape: tuple[int, int, int] = (24, 256, 256)
    label_noise: float = 0.02
    workers: int = 1  # processes generating the cases ahead
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 16


# --------------------------------------------------------------------------------------------- one case

def _components(trace: dict, truth: np.ndarray) -> list[dict]:
    """Every component of the network's labelmap (before any post-processing), largest first: its voxels, its voxels
    inside the true mask, its mean uncertainty, and the reader's lesion probability where the reader's check read it."""
    network = trace["network"]
    components, sizes, mean_u = label_components(network.labels, network.uncertainty)
    inside = np.bincount(components.ravel(), weights=truth.ravel().astype(np.float64), minlength=len(sizes))
    read = {}
    if "reading" in trace:
        r = trace["reading"]
        read = {cid: float(p[0]) for (cid, *_), p in zip(r.checked_components, r.checked_probabilities)}
    order = sorted(range(1, len(sizes)), key=lambda c: (-sizes[c], c))
    return [{"voxels": int(sizes[c]), "inside": float(inside[c]), "mean_uncertainty": float(mean_u[c]),
             "p_lesion": read.get(c)} for c in order]


def case_row(case: SyntheticCase, pred: Prediction, trace: dict, mode: str, sigma: float) -> dict:
    """One case's row: the truth, the segmentation's Dice, the case opinion and its parts, and the network's
    components (what ``python -m training.fit`` chooses thresholds on)."""
    labels = sitk.GetArrayFromImage(pred.labelmap)
    dice = hd95 = None
    if case.mask.any():
        dice, hd95 = metrics.dice(labels, case.mask), metrics.hd95(labels, case.mask, spacing=case.spacing[::-1])
    s = pred.summary
    c = s["classification"]
    reader = c["reader"] or {}
    top = max(s["lesions"], key=lambda x: x["suspicion"], default=None)
    moved = [np.linalg.norm(ph["shift_mm"]) for ph in s["motion_correction"]["phases"] if ph["applied"]]
    truth = to_slices(case.mask, s["slicing"]["index_axis"]) > 0
    network = trace["opinion"].network
    positive = c["classes"].index(c["positive_class"])
    return {
        "seed": case.seed, "input": mode, "noise": sigma,
        "lesions": len(case.lesions), "lesion_voxels": int(case.mask.sum()),
        "kinetics": case.lesions[0]["kinetics"] if case.lesions else None,
        "margin": case.lesions[0]["margin"] if case.lesions else None,
        "label": int(case.label), "clean_label": int(case.clean_label),
        "dice": dice, "hd95_mm": hd95, "predicted_voxels": int((labels > 0).sum()),
        "components_removed": int(s["postprocessing"]["components_removed"]),
        "motion_shift_mm": float(max(moved)) if moved else None,
        "positive_probability": float(c["positive_probability"]), "uncertainty": float(c["uncertainty"]),
        "calibration": c["calibration"],
        "network_positive_probability": float(network[positive] / network.sum()),
        "network_uncertainty": float(len(network) / network.sum()),
        "reader_score": reader.get("score"),
        "reader_probabilities": None if top is None else [top["probabilities"][t] for t in READER_TARGETS],
        "components": _components(trace, truth),
    }


# --------------------------------------------------------------------------------------------- figures

LESION_SIZE_BINS = ((1, 100), (100, 1000), (1000, None))  # true lesion voxels per case


def _stat(fn, values: list) -> float:
    return float(fn(values)) if len(values) else float("nan")


def ece_sampling_floor(probs: np.ndarray, draws: int = 1000, seed: int = 0) -> float:
    """Median ECE of a *perfectly calibrated* model with these probabilities on this many cases (labels drawn as
    ``Bernoulli(p)``): an ECE measured on as many cases is only meaningful well above it."""
    rng = np.random.default_rng(seed)
    p = np.asarray(probs, dtype=float)
    return float(np.median([metrics.expected_calibration_error(p, (rng.random(p.size) < p).astype(int))
                            for _ in range(draws)]))


def _phenotype(row: dict) -> str:
    if not row["lesions"]:
        return "no lesion"
    if row["kinetics"] == "washout":
        return "washout"
    return "spiculated, no washout" if row["margin"] == "spiculated" else "smooth/lobulated, no washout"


def _segmentation_figures(rows: list[dict]) -> dict:
    dices = [r["dice"] for r in rows if r["dice"] is not None]
    hds = [r["hd95_mm"] for r in rows if r["dice"] is not None]
    by_size = {}
    for lo, hi in LESION_SIZE_BINS:
        sel = [r for r in rows if r["lesion_voxels"] >= lo and (hi is None or r["lesion_voxels"] < hi)]
        by_size[f"{lo}-{hi - 1}" if hi else f">={lo}"] = {
            "cases": len(sel), "dice_mean": _stat(np.mean, [r["dice"] for r in sel]),
            "nothing_predicted": sum(r["predicted_voxels"] == 0 for r in sel)}
    return {"cases_with_lesion": len(dices), "dice_mean": _stat(np.mean, dices), "dice_median": _stat(np.median, dices),
            "hd95_mm_median": _stat(np.median, [h for h in hds if np.isfinite(h)]),
            "hd95_inf_cases": int(sum(not np.isfinite(h) for h in hds)),
            "lesion_free_segmented": _stat(np.mean, [r["predicted_voxels"] > 0 for r in rows if r["dice"] is None]),
            "dice_by_lesion_size": by_size}


def _case_figures(rows: list[dict]) -> dict:
    p, y, clean, u = (np.array([r[k] for r in rows], dtype=float) for k in
                      ("positive_probability", "label", "clean_label", "uncertainty"))
    y, clean = y.astype(int), clean.astype(int)
    correct = (p >= 0.5) == y.astype(bool)
    rc = metrics.risk_coverage(u, correct, kind="uncertainty")
    out = {"accuracy": metrics.accuracy(p, y), "balanced_accuracy": metrics.balanced_accuracy(p, y),
           "auc": metrics.roc_auc(p, y), "ece": metrics.expected_calibration_error(p, y),
           "ece_sampling_floor": ece_sampling_floor(p), "brier": metrics.brier_score(p, y), "nll": metrics.nll(p, y),
           "auc_clean_labels": metrics.roc_auc(p, clean), "accuracy_clean_labels": metrics.accuracy(p, clean),
           "ece_clean_labels": metrics.expected_calibration_error(p, clean),
           "case_uncertainty_mean": float(u.mean()), "eaurc": float(rc["eaurc"]), "aurc": float(rc["aurc"]),
           "suggested_review_uncertainty": suggest_review_uncertainty(u, correct.astype(int))}
    groups = {}
    for g in ("no lesion", "smooth/lobulated, no washout", "spiculated, no washout", "washout"):
        sel = [r for r in rows if _phenotype(r) == g]
        scores = [r["reader_score"] for r in sel if r["reader_score"] is not None]
        groups[g] = {"cases": len(sel), "suspicious": sum(r["clean_label"] for r in sel),
                     "accuracy": _stat(np.mean, [(r["positive_probability"] >= 0.5) == bool(r["label"]) for r in sel]),
                     "mean_probability": _stat(np.mean, [r["positive_probability"] for r in sel]),
                     "reader_read": len(scores), "reader_score_median": _stat(np.median, scores)}
    out["errors_by_phenotype"] = groups
    read = np.array([r["reader_score"] is not None for r in rows])
    if read.any():
        network = np.array([r["network_positive_probability"] for r in rows])
        alone = np.where(read, [r["reader_score"] or 0.0 for r in rows], network)
        out["reader"] = {"cases_read": int(read.sum()), "auc_network_alone": metrics.roc_auc(network, y),
                         "auc_reader_alone": metrics.roc_auc(alone, y)}
    return out


def section_figures(rows: list[dict], pixels: Optional[dict] = None) -> dict:
    """The figures of the rows of one input and noise level (and their pixel counts, if any)."""
    out = {"cases": len(rows), **_segmentation_figures(rows), **_case_figures(rows)}
    if pixels is not None:
        out["pixel_uncertainty_error_auroc"] = metrics.histogram_auroc(*pixels["counts"])
        out["pixel_error_rate"] = float(pixels["counts"][0].sum() / pixels["counts"].sum())
        out["pixel_ece"] = metrics.expected_calibration_error(np.concatenate(pixels["p"]), np.concatenate(pixels["y"]))
    return out


def _section(mode: str, sigma: float) -> str:
    return mode if sigma == 0 else f"{mode}, noise {sigma:g}"


def _add_pixels(pixels: dict, case: SyntheticCase, pred: Prediction, seed: int) -> None:
    """Every voxel's uncertainty against its error (histogram) and a 5 % sample for the pixel ECE."""
    labels = sitk.GetArrayFromImage(pred.labelmap)
    unc = sitk.GetArrayFromImage(pred.uncertainty)
    pixels["counts"] += metrics.uncertainty_error_counts(unc, labels != case.mask)
    sel = np.random.default_rng(seed).random(labels.size) < 0.05
    pixels["p"].append(sitk.GetArrayFromImage(pred.probability).ravel()[sel])
    pixels["y"].append(case.mask.ravel()[sel])


# --------------------------------------------------------------------------------------------- the run

def evaluate(cfg: EvaluateConfig, predictor: Predictor, log=print) -> dict:
    """Every case of the run through ``predictor`` in every input and noise level: the report's figures and rows."""
    cases = seeds(cfg.split, cfg.cases, None if cfg.first_seed < 0 else cfg.first_seed)
    sections = [(m, s) for m in cfg.inputs for s in cfg.noise]
    rows: dict[str, list] = {_section(m, s): [] for m, s in sections}
    pixels = {_section(m, s): {"counts": np.zeros((2, metrics.UNCERTAINTY_BINS), np.int64), "p": [], "y": []}
              for m, s in sections}
    t0 = time.time()
    for n, case in enumerate(synthetic_stream(cases, cfg.shape, cfg.label_noise, cfg.workers)):
        for mode, sigma in sections:
            volumes = add_noise(input_volumes(case, mode), sigma, np.random.default_rng([case.seed, int(sigma * 1e6)]))
            trace: dict = {}  # the predictor's intermediate results of the case
            pred = predictor.predict(volumes, case_id=f"synthetic-{case.seed}", trace=trace.__setitem__)
            rows[_section(mode, sigma)].append(case_row(case, pred, trace, mode, sigma))
            _add_pixels(pixels[_section(mode, sigma)], case, pred, case.seed)
        if (n + 1) % 20 == 0 or n + 1 == len(cases):
            log(f"{n + 1}/{len(cases)} cases, {time.time() - t0:.0f} s")
    return {"figures": {k: section_figures(v, pixels[k]) for k, v in rows.items()},
            "rows": [r for v in rows.values() for r in v], "seconds": round(time.time() - t0, 1),
            "dataset": f"{len(cases)} synthetic cases of the {cfg.split} split, seeds {cases.start}..{cases.stop - 1}, "
                       f"shape {tuple(cfg.shape)}, label noise {cfg.label_noise} (metrics vs reported labels unless "
                       "named *_clean_labels)"}


def card_settings(card) -> dict:
    """The card settings a case row depends on besides the weights (what the network's opinion is weighted by,
    which lesions the reader reads, how the phases are aligned): a fit on rows needs a card with the same."""
    reader = card.reader
    return {"component_max_uncertainty": card.component_max_uncertainty,
            "motion_correction": dataclasses.asdict(card.input.motion_correction),
            "reader": None if reader is None else {k: getattr(reader, k) for k in (
                "segmentation_min_lesion", "segmentation_max_components", "max_components")}}


def json_safe(obj):
    """``obj`` with every NaN / infinite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def write_markdown(report: dict, path: Path) -> None:
    """The report's figures as tables for people."""
    keys = ("dice_mean", "dice_median", "lesion_free_segmented", "auc", "ece", "nll", "accuracy",
            "case_uncertainty_mean", "pixel_uncertainty_error_auroc")
    lines = [f"# Evaluation of `{report['model']['id']}` {report['model']['version']}", "",
             f"Command: `{report['command']}`", "", f"Data: {report['dataset']}", "",
             "| input | cases | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, f in report["figures"].items():
        lines.append(f"| {name} | {f['cases']} | " + " | ".join(_fmt(f.get(k)) for k in keys) + " |")
    for name, f in report["figures"].items():
        lines += ["", f"Lesion Dice by the case's true lesion size ({name}):", "",
                  "| lesion voxels | cases | mean Dice | nothing predicted |", "|---|---|---|---|"]
        lines += [f"| {k} | {b['cases']} | {_fmt(b['dice_mean'])} | {b['nothing_predicted']} |"
                  for k, b in f["dice_by_lesion_size"].items()]
    if "phases" in report["figures"]:
        lines += ["", "![reliability diagram (phases)](reliability.png)"]
    path.write_text("\n".join(lines) + "\n")


def build_parser():
    return config_parser(EvaluateConfig, "python -m training.evaluate", __doc__)


#: Settings only the synthetic generator has, and only a dataset has.
SYNTHETIC_SETTINGS = ("first_seed", "inputs", "shape", "label_noise")
DATASET_SETTINGS = ("data", "split_file", "salt_pepper")


def parse_args(argv: Optional[list[str]] = None) -> tuple[EvaluateConfig, Optional[range]]:
    """The run's settings, checked, and its synthetic cases' seeds (``None`` for a dataset)."""
    p = build_parser()
    cfg, _ = parse_config(EvaluateConfig, argv, p)
    if not cfg.model:
        p.error("--model is required: give a bundle folder or .zip")
    try:
        spec = DataSpec.parse(cfg.data)
    except UMLInputError as exc:
        p.error(str(exc))
    if not all(0.0 <= s < 1.0 for s in cfg.noise):
        p.error(f"--noise must be sigmas in [0, 1) (fractions of the intensity range), got {cfg.noise}")
    if min(cfg.workers, cfg.batch_size) < 1:
        p.error("--workers and --batch-size must be at least 1")
    if spec.kind != "synthetic":
        return _dataset_args(p, cfg), None
    defaults = EvaluateConfig()
    if given := [f"--{k.replace('_', '-')}" for k in DATASET_SETTINGS[1:] if getattr(cfg, k) != getattr(defaults, k)]:
        p.error(f"{' and '.join(given)} are settings of a dataset (--data KIND:PATH), not of synthetic data")
    if cfg.split in ("val", "train"):
        if cfg.split == "train":
            p.error("argument --split: invalid choice: 'train' (synthetic data: validation or test; train, val and "
                    "test are the parts of a dataset's --split-file)")
        cfg = dataclasses.replace(cfg, split="validation")
    cfg = dataclasses.replace(cfg, cases=100 if cfg.cases == -1 else cfg.cases)
    if unknown := sorted(set(cfg.inputs) - set(INPUT_MODES)):
        p.error(f"--inputs {unknown}: choose among {', '.join(INPUT_MODES)}")
    if cfg.cases < 1:
        p.error("--cases, --workers and --batch-size must be at least 1")
    check_shape(p, "--shape", cfg.shape)
    try:
        return cfg, seeds(cfg.split, cfg.cases, None if cfg.first_seed < 0 else cfg.first_seed)
    except ValueError as exc:
        p.error(str(exc))


def _dataset_args(p, cfg: EvaluateConfig) -> EvaluateConfig:
    """The settings of a dataset evaluation, checked (``validation`` read as the split file's ``val``)."""
    defaults = EvaluateConfig()
    if given := [f"--{k.replace('_', '-')}" for k in SYNTHETIC_SETTINGS if getattr(cfg, k) != getattr(defaults, k)]:
        p.error(f"{', '.join(given)}: settings of the synthetic generator, not of --data {cfg.data}")
    if not cfg.split_file:
        p.error(f"--split-file is required with --data {cfg.data}: give the split the model was trained with "
                "(the training run's RUN/split.json), so that --split names cases it did not train on")
    if not all(0.0 <= a < 1.0 for a in cfg.salt_pepper):
        p.error(f"--salt-pepper must be fractions of the pixels in [0, 1), got {cfg.salt_pepper}")
    if cfg.cases < -1:
        p.error(f"--cases must be 0 (every case of the split) or more, got {cfg.cases}")
    return dataclasses.replace(cfg, split="val" if cfg.split == "validation" else cfg.split)


def main(argv: Optional[list[str]] = None) -> int:
    cfg, cases = parse_args(argv)
    command = "python -m training.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    if cases is None:
        from .evaluate_dataset import run  # a dataset's evaluation (it imports this module)

        return run(cfg, DataSpec.parse(cfg.data), command)
    bundle = load_bundle(cfg.model)  # a bundle that cannot be used: one line, exit 2 (run_tool)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(cfg, Predictor(bundle, device=cfg.device, batch_size=cfg.batch_size))
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in DATASET_SETTINGS}
    report = {"model": {"id": bundle.card.id, "version": bundle.card.version, "sha256": bundle.sha256,
                        "settings": card_settings(bundle.card)},
              "command": command, "config": config, "split": cfg.split, "seeds": [cases.start, cases.stop - 1],
              **result}
    (out / "report.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))
    write_markdown(report, out / "report.md")
    phases = [r for r in result["rows"] if r["input"] == "phases" and r["noise"] == 0]
    if phases:
        metrics.plot_reliability_diagram(np.array([r["positive_probability"] for r in phases]),
                                         np.array([r["label"] for r in phases]), path=str(out / "reliability.png"))
    for name, f in report["figures"].items():
        print(f"{name}: " + ", ".join(f"{k} {_fmt(f.get(k))}" for k in ("dice_mean", "auc", "ece", "nll")))
    print(f"wrote {out / 'report.json'} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "python -m training.evaluate"))
