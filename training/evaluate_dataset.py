"""``python -m training.evaluate --data KIND:PATH``: a bundle measured on a real dataset's split, as a user runs it.

Every case of one part of the split file (``--split test|val|train``, ``--split-file RUN/split.json``) is read by
its dataset adapter (:mod:`training.datasets`), given to ``umlcore``'s :class:`~umlcore.predictor.Predictor` as a
user's file would reach it (:func:`case_images`: a volume on its own grid, a picture as single-slice volumes of
``(W, H, 1)`` pixels, one per colour), and its labelmap compared with the case's mask on the input grid. Each case
runs clean and under every ``--noise`` sigma (Gaussian) and ``--salt-pepper`` amount (:mod:`training.noise`); each
of those is a section of the report.

The figures follow the official UML code's evaluation (KarryRen/UML ``predict_functions.py``): AUC, accuracy,
Cohen's kappa, sensitivity, F1 (there ``average='weighted'``: ``f1_weighted`` here; ``f1`` is the positive class's)
of the case-level class, and per segment Dice and ASSD (medpy's convention, :func:`umlcore.metrics.assd`), with
specificity, HD95, ECE, NLL, Brier, the reliability diagram, the pixel uncertainty-error AUROC and the case-level
risk-coverage (E-AURC) added. Tasks of more than two classes report accuracy, macro and weighted F1, kappa, ECE,
NLL and Brier (AUC, sensitivity and specificity are binary figures). ``OUT/report.json`` holds them per section
(``figures["clean"]`` is the noise-free one) with one row per case and section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from umlcore import metrics
from umlcore.bundle import ModelBundle, load_bundle
from umlcore.card import ModelCard, Segment
from umlcore.errors import UMLInputError
from umlcore.predictor import Prediction, Predictor
from umlcore.preprocess import to_slices
from umlcore.reader import READER_TARGETS

from .data import DataSpec, adapter
from .datasets import Case, read_split
from .evaluate import _components, _fmt, _stat, card_settings, ece_sampling_floor, json_safe
from .fitting import suggest_review_uncertainty
from .noise import apply_noise
from .workers import ordered_map

__all__ = ["CLEAN", "Section", "sections", "select_cases", "case_images", "check_case", "dataset_row",
           "classification_figures", "segmentation_figures", "section_figures", "evaluate_dataset", "dataset_report",
           "write_markdown", "run"]

#: The noise-free section: the figures ``python -m training.export --report`` writes into a card.
CLEAN = "clean"
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Section:
    """One way every case is given: clean, or with one kind and level of noise."""

    kind: str = "none"  # training.noise.NOISE_KINDS
    level: float = 0.0  # the Gaussian sigma (fraction of the intensity range) or the salt-and-pepper amount

    @property
    def name(self) -> str:
        if self.kind == "none":
            return CLEAN
        return f"{'gaussian' if self.kind == 'gaussian' else 'salt-and-pepper'} {self.level:g}"


def sections(noise: Sequence[float], salt_pepper: Sequence[float]) -> list[Section]:
    """The clean section, then one per Gaussian sigma and per salt-and-pepper amount above 0 (each once, in order)."""
    out = [Section()]
    for kind, levels in (("gaussian", noise), ("salt_and_pepper", salt_pepper)):
        for level in levels:
            if level > 0 and Section(kind, float(level)) not in out:
                out.append(Section(kind, float(level)))
    return out


# ------------------------------------------------------------------------------------------------ cases

def select_cases(spec: DataSpec, split_file: str, part: str, count: int) -> tuple[list[str], dict]:
    """The cases of ``part`` (``train``, ``val``, ``test``) of the split file, the first ``count`` of them (0: all),
    and the file's path and SHA-256.

    Raises:
        UMLInputError: a split file that is missing or unreadable, that names cases the dataset does not hold, or
            whose ``part`` is empty.
    """
    path = Path(split_file)
    split = read_split(path)  # DatasetLayoutError (a UMLInputError) naming what is wrong
    known = set(adapter(spec).case_ids())
    unknown = sorted({c for ids in split.values() for c in ids} - known)
    if unknown:
        raise UMLInputError(f"--split-file {path} names {len(unknown)} case(s) that {spec} does not hold (e.g. "
                            f"{unknown[0]!r}): give the split of this dataset (the training run's split.json)")
    ids = split[part]
    if not ids:
        raise UMLInputError(f"the {part} part of {path} holds no case: choose another --split")
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return ids[:count] if count > 0 else ids, {"path": str(path), "sha256": sha256}


def _load(job: tuple[DataSpec, str]) -> Case:
    """Worker entry: ``(spec, case_id)`` -> the case as its adapter reads it."""
    spec, case_id = job
    return adapter(spec).load(case_id)


def case_images(case: Case, channels: Optional[Sequence[np.ndarray]] = None) -> list[sitk.Image]:
    """The case's channels (or ``channels``, e.g. with noise) as the SimpleITK images a user's files give the
    predictor: a volume with the case's spacing, origin and direction (origin 0 and identity where the adapter has
    none); a picture (2D channels) as single-slice volumes of ``(W, H, 1)`` pixels, spacing ``(sx, sy, 1)``, origin
    0 and identity direction, which is what ``umlcore.io.read_case`` makes of a PNG."""
    arrays = case.images if channels is None else channels
    picture = case.mask.ndim == 2
    images = []
    for a in arrays:
        image = sitk.GetImageFromArray(np.ascontiguousarray(a[None] if picture else a, dtype=np.float32))
        if picture:
            image.SetSpacing((float(case.spacing[0]), float(case.spacing[1]), 1.0))
        else:
            image.SetSpacing(tuple(float(v) for v in case.spacing))
            image.SetOrigin(tuple(float(v) for v in (case.meta.get("origin") or (0.0, 0.0, 0.0))))
            image.SetDirection(tuple(float(v) for v in (case.meta.get("direction") or _IDENTITY)))
        images.append(image)
    return images


def check_case(case: Case, card: ModelCard) -> None:
    """Refuse a case whose class or mask labels the model does not predict (the dataset is not the model's)."""
    top = int(case.mask.max()) if case.mask.size else 0
    labels = max((s.label for s in card.segments), default=0)
    if top > labels or not 0 <= int(case.label) < len(card.classes):
        raise UMLInputError(f"case {case.case_id} has class {case.label} and mask labels up to {top}, but model "
                            f"{card.id!r} predicts classes 0..{len(card.classes) - 1} ({', '.join(card.classes)}) and "
                            f"segments 1..{labels}: evaluate it on the data it was trained for")


# ------------------------------------------------------------------------------------------------ one case

def _segment_measures(labels: np.ndarray, mask: np.ndarray, spacing: Sequence[float], segment: Segment) -> dict:
    """One segment of one case: its voxels in the truth and the prediction, and (where the truth holds it) Dice,
    ASSD and HD95 in mm (infinite where nothing was predicted)."""
    k = segment.label
    truth, predicted = int((mask == k).sum()), int((labels == k).sum())
    out = {"label": k, "true_voxels": truth, "predicted_voxels": predicted, "dice": None, "assd_mm": None,
           "hd95_mm": None}
    if truth:
        out.update(dice=metrics.dice(labels, mask, label=k), assd_mm=metrics.assd(labels, mask, spacing, label=k),
                   hd95_mm=metrics.hd95(labels, mask, spacing, label=k))
    return out


def dataset_row(case: Case, pred: Prediction, trace: dict, card: ModelCard, section: Section) -> dict:
    """One case in one section: its class, the case opinion and its parts, per segment Dice / ASSD / HD95, and the
    network's components (as the synthetic rows hold them, for the threshold fits)."""
    labels = sitk.GetArrayFromImage(pred.labelmap).reshape(case.mask.shape)
    s = pred.summary
    c = s["classification"]
    reader = c["reader"] or {}
    top = max(s["lesions"], key=lambda x: x["suspicion"], default=None)
    network = trace["opinion"].network
    truth = to_slices(case.mask if case.mask.ndim == 3 else case.mask[None], s["slicing"]["index_axis"]) > 0
    positive = card.positive_class
    return {
        "case_id": case.case_id, "section": section.name, "noise_kind": section.kind, "noise": section.level,
        "label": int(case.label), "probabilities": [float(v) for v in c["probabilities"]],
        "predicted_index": int(c["predicted_index"]), "positive_probability": float(c["positive_probability"]),
        "uncertainty": float(c["uncertainty"]), "verdict": c["verdict"], "calibration": c["calibration"],
        "network_positive_probability": float(network[positive] / network.sum()),
        "network_uncertainty": float(len(network) / network.sum()),
        "reader_score": reader.get("score"),
        "reader_probabilities": None if top is None else [top["probabilities"][t] for t in READER_TARGETS],
        "true_voxels": int((case.mask > 0).sum()), "predicted_voxels": int((labels > 0).sum()),
        "components_removed": int(s["postprocessing"]["components_removed"]),
        "segments": {seg.name: _segment_measures(labels, case.mask, case.spacing, seg) for seg in card.segments},
        "components": _components(trace, truth),
    }


def _add_pixels(pixels: dict, case: Case, pred: Prediction) -> None:
    """Every voxel's uncertainty against its error (histogram) and a 5 % sample of the foreground probability."""
    labels = sitk.GetArrayFromImage(pred.labelmap).reshape(case.mask.shape)
    unc = sitk.GetArrayFromImage(pred.uncertainty).reshape(case.mask.shape)
    pixels["counts"] += metrics.uncertainty_error_counts(unc, labels != case.mask)
    sel = np.random.default_rng(zlib.crc32(case.case_id.encode("utf-8"))).random(labels.size) < 0.05
    pixels["p"].append(sitk.GetArrayFromImage(pred.probability).ravel()[sel])
    pixels["y"].append((case.mask.ravel() > 0)[sel].astype(np.int64))


# ------------------------------------------------------------------------------------------------ figures

def classification_figures(rows: list[dict], classes: Sequence[str], positive: int) -> dict:
    """The case-level figures of ``rows``: binary tasks (``positive`` the positive class) AUC, accuracy, balanced
    accuracy, kappa, sensitivity, specificity, F1 (positive class) and weighted F1, ECE, NLL, Brier; more classes
    accuracy, balanced accuracy, kappa, macro and weighted F1, ECE (top label), NLL, Brier. Both: the mean case
    uncertainty and its risk-coverage (AURC, E-AURC, the suggested review threshold)."""
    probs = np.array([r["probabilities"] for r in rows], dtype=np.float64)
    y = np.array([r["label"] for r in rows], dtype=np.int64)
    u = np.array([r["uncertainty"] for r in rows], dtype=np.float64)
    out: dict = {"classes": list(classes)}
    if len(classes) == 2:
        p, yb = probs[:, positive], (y == positive).astype(np.int64)
        correct = (p >= 0.5) == yb.astype(bool)
        out.update(positive_class=classes[positive], auc=metrics.roc_auc(p, yb), accuracy=metrics.accuracy(p, yb),
                   balanced_accuracy=metrics.balanced_accuracy(p, yb), kappa=metrics.cohen_kappa(p, yb),
                   sensitivity=metrics.sensitivity(p, yb), specificity=metrics.specificity(p, yb),
                   f1=metrics.f1_score(p, yb), f1_weighted=metrics.f1_score(p, yb, average="weighted"),
                   ece=metrics.expected_calibration_error(p, yb), ece_sampling_floor=ece_sampling_floor(p),
                   nll=metrics.nll(p, yb), brier=metrics.brier_score(p, yb))
    else:
        probs = probs / probs.sum(axis=1, keepdims=True)
        correct = probs.argmax(axis=1) == y
        out.update(accuracy=metrics.accuracy(probs, y), balanced_accuracy=metrics.balanced_accuracy(probs, y),
                   kappa=metrics.cohen_kappa(probs, y), f1_macro=metrics.f1_score(probs, y, average="macro"),
                   f1_weighted=metrics.f1_score(probs, y, average="weighted"),
                   ece=metrics.expected_calibration_error(probs, y), nll=metrics.nll(probs, y),
                   brier=metrics.brier_score(probs, y),
                   not_reported=f"AUC, sensitivity, specificity and binary F1 are figures of two classes; this task "
                                f"has {len(classes)} (see accuracy, f1_macro, kappa)")
    rc = metrics.risk_coverage(u, correct, kind="uncertainty")
    out.update(case_uncertainty_mean=float(u.mean()), aurc=float(rc["aurc"]), eaurc=float(rc["eaurc"]),
               suggested_review_uncertainty=suggest_review_uncertainty(u, correct.astype(int)))
    return out


def segmentation_figures(rows: list[dict], segments: Sequence[Segment]) -> dict:
    """Per segment (by the card's name): over the cases whose mask holds it, the mean and median Dice, and of ASSD
    and HD95 (mm) over those where something was predicted; how many such cases had nothing predicted
    (``missed_cases``, Dice 0, no distance), and how many cases without it had it predicted. ``dice_mean`` is the
    mean of the segments' mean Dice."""
    out = {}
    for seg in segments:
        measures = [r["segments"][seg.name] for r in rows]
        held = [m for m in measures if m["true_voxels"]]
        found = [m for m in held if m["predicted_voxels"]]
        dice = [m["dice"] for m in held]
        assd, hd95 = [m["assd_mm"] for m in found], [m["hd95_mm"] for m in found]
        out[seg.name] = {
            "label": seg.label, "cases_with_segment": len(held), "dice_mean": _stat(np.mean, dice),
            "dice_median": _stat(np.median, dice), "assd_mm_mean": _stat(np.mean, assd),
            "assd_mm_median": _stat(np.median, assd), "hd95_mm_mean": _stat(np.mean, hd95),
            "hd95_mm_median": _stat(np.median, hd95), "missed_cases": len(held) - len(found),
            "cases_without_segment": len(measures) - len(held),
            "predicted_where_absent": sum(1 for m in measures if not m["true_voxels"] and m["predicted_voxels"])}
    means = [f["dice_mean"] for f in out.values() if np.isfinite(f["dice_mean"])]
    return {"dice_mean": _stat(np.mean, means), "segments": out}


def section_figures(rows: list[dict], card: ModelCard, pixels: Optional[dict] = None) -> dict:
    """The figures of one section's rows (and its pixel counts, if any)."""
    out = {"cases": len(rows), **classification_figures(rows, card.classes, card.positive_class),
           **segmentation_figures(rows, card.segments)}
    if pixels is not None:
        counts = pixels["counts"]
        out["pixel_uncertainty_error_auroc"] = metrics.histogram_auroc(*counts)
        out["pixel_error_rate"] = float(counts[0].sum() / max(counts.sum(), 1))
        p, y = (np.concatenate(pixels[k]) if pixels[k] else np.zeros(0) for k in ("p", "y"))
        out["pixel_foreground_ece"] = (metrics.expected_calibration_error(np.clip(p, 0.0, 1.0), y.astype(np.int64))
                                       if p.size else float("nan"))
    return out


# ------------------------------------------------------------------------------------------------ the run

def evaluate_dataset(spec: DataSpec, case_ids: list[str], parts: list[Section], predictor: Predictor, workers: int = 1,
                     log=print) -> dict:
    """Every case through ``predictor`` in every section: ``{"figures": {section: ...}, "rows": [...], "seconds"}``
    (cases loaded ahead in ``workers`` processes)."""
    card = predictor.card
    rows: dict[str, list] = {s.name: [] for s in parts}
    pixels = {s.name: {"counts": np.zeros((2, metrics.UNCERTAINTY_BINS), np.int64), "p": [], "y": []} for s in parts}
    t0 = time.time()
    with contextlib.closing(ordered_map(_load, [(spec, c) for c in case_ids], workers)) as cases:  # workers end here
        for n, case in enumerate(cases):
            check_case(case, card)
            for section in parts:
                channels = apply_noise(case.images, section.kind, section.level, case.case_id)
                trace: dict = {}  # the predictor's intermediate results of the case
                pred = predictor.predict(case_images(case, channels), case_id=case.case_id, trace=trace.__setitem__)
                rows[section.name].append(dataset_row(case, pred, trace, card, section))
                _add_pixels(pixels[section.name], case, pred)
            if (n + 1) % 20 == 0 or n + 1 == len(case_ids):
                log(f"{n + 1}/{len(case_ids)} cases, {time.time() - t0:.0f} s")
    return {"figures": {k: section_figures(v, card, pixels[k]) for k, v in rows.items()},
            "rows": [r for v in rows.values() for r in v], "seconds": round(time.time() - t0, 1)}


def dataset_report(bundle: ModelBundle, spec: DataSpec, part: str, split_file: dict, case_ids: list[str],
                   parts: list[Section], result: dict, command: str, config: dict) -> dict:
    """The report of a dataset evaluation (``OUT/report.json``)."""
    card = bundle.card
    data = adapter(spec)
    trained = str(card.training.get("split_sha256") or "") if isinstance(card.training, dict) else ""
    split_file = {**split_file, "card_split_sha256": trained or None,
                  "matches_card": (split_file["sha256"] == trained) if trained else None}
    note = ("" if trained == split_file["sha256"] else
            "; the model card records no split" if not trained else
            "; NOT the split the model was trained with (its cases may overlap the training cases)")
    return {
        "model": {"id": card.id, "version": card.version, "sha256": bundle.sha256, "settings": card_settings(card)},
        "command": command, "config": config,
        "data": {"spec": str(spec), "kind": spec.kind, "path": spec.path, "name": data.name,
                 "classes": list(data.class_names), "segments": list(data.segment_names)},
        "split": part, "split_file": split_file, "cases": list(case_ids),
        "sections": [{"name": s.name, "noise": s.kind, "level": s.level} for s in parts],
        "dataset": f"{len(case_ids)} cases of the {part} split of {data.name} ({spec}), split file "
                   f"{split_file['path']} (sha256 {split_file['sha256'][:12]}...{note})",
        **result,
    }


_KEYS = ("auc", "accuracy", "kappa", "sensitivity", "specificity", "f1", "f1_macro", "ece", "nll", "brier", "eaurc",
         "dice_mean", "pixel_uncertainty_error_auroc")


def write_markdown(report: dict, path: Path, reliability: bool) -> None:
    """The report's figures as tables for people: one line per section, then per segment."""
    sf = report["split_file"]
    match = {True: "the split the model was trained with", False: "**not** the split the model was trained with",
             None: "the model card records no split"}[sf["matches_card"]]
    keys = [k for k in _KEYS if any(k in f for f in report["figures"].values())]
    lines = [f"# Evaluation of `{report['model']['id']}` {report['model']['version']}", "",
             f"Command: `{report['command']}`", "", f"Data: {report['dataset']}", "",
             f"Split file: `{sf['path']}` (sha256 `{sf['sha256']}`): {match}.", "",
             "| section | cases | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, f in report["figures"].items():
        lines.append(f"| {name} | {f['cases']} | " + " | ".join(_fmt(f.get(k)) for k in keys) + " |")
    notes = {f["not_reported"] for f in report["figures"].values() if "not_reported" in f}
    if notes:
        lines += ["", *sorted(f"{n}." for n in notes)]
    for name, f in report["figures"].items():
        lines += ["", f"Segments ({name}; ASSD and HD95 in mm over the cases where the segment was predicted):", "",
                  "| segment | cases | Dice mean | Dice median | ASSD mean | ASSD median | HD95 mean | HD95 median | "
                  "missed | predicted where absent |", "|---" * 10 + "|"]
        lines += [f"| {seg} | {s['cases_with_segment']} | {_fmt(s['dice_mean'])} | {_fmt(s['dice_median'])} | "
                  f"{_fmt(s['assd_mm_mean'])} | {_fmt(s['assd_mm_median'])} | {_fmt(s['hd95_mm_mean'])} | "
                  f"{_fmt(s['hd95_mm_median'])} | {s['missed_cases']} | {s['predicted_where_absent']} "
                  f"of {s['cases_without_segment']} |" for seg, s in f["segments"].items()]
    if reliability:
        lines += ["", f"![reliability diagram ({CLEAN})](reliability.png)"]
    path.write_text("\n".join(lines) + "\n")


def reliability_inputs(rows: list[dict], card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """The clean rows' probabilities and labels for the reliability diagram: the positive class's probability of a
    binary task, every class's otherwise."""
    probs = np.array([r["probabilities"] for r in rows], dtype=np.float64)
    y = np.array([r["label"] for r in rows], dtype=np.int64)
    if len(card.classes) == 2:
        return probs[:, card.positive_class], (y == card.positive_class).astype(np.int64)
    return probs / probs.sum(axis=1, keepdims=True), y


def config_record(cfg) -> dict:
    """The settings of a dataset evaluation, without the synthetic generator's."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("first_seed", "inputs", "shape", "label_noise")}


def run(cfg, spec: DataSpec, command: str, log=print) -> int:
    """``python -m training.evaluate --data KIND:PATH``: evaluate, then write ``OUT/report.json``, ``OUT/report.md``
    and ``OUT/reliability.png`` (nothing is written when a case or the model is refused)."""
    bundle = load_bundle(cfg.model)  # a bundle that cannot be used: one line, exit 2 (run_tool)
    case_ids, split_file = select_cases(spec, cfg.split_file, cfg.split, max(cfg.cases, 0))
    parts = sections(cfg.noise, cfg.salt_pepper)
    predictor = Predictor(bundle, device=cfg.device, batch_size=cfg.batch_size)
    result = evaluate_dataset(spec, case_ids, parts, predictor, cfg.workers, log)
    report = dataset_report(bundle, spec, cfg.split, split_file, case_ids, parts, result, command, config_record(cfg))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))
    clean = [r for r in result["rows"] if r["section"] == CLEAN]
    probs, labels = reliability_inputs(clean, bundle.card)
    metrics.plot_reliability_diagram(probs, labels, path=str(out / "reliability.png"))
    write_markdown(report, out / "report.md", reliability=True)
    for name, f in report["figures"].items():
        log(f"{name}: " + ", ".join(f"{k} {_fmt(f.get(k))}" for k in ("dice_mean", "auc", "accuracy", "kappa", "ece")
                                    if k in f))
    if report["split_file"]["matches_card"] is False:
        log(f"note: {split_file['path']} is not the split the model was trained with (card training.split_sha256)")
    log(f"wrote {out / 'report.json'} ({result['seconds']:.0f} s)")
    return 0
