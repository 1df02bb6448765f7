"""Evaluate a model bundle on held-out synthetic cases, end to end through ``umlcore``'s predictor.

Example:
    python training/evaluate.py --model Resources/Models/uml-breast-dce-small --cases 100 --out runs/small/eval

Test seeds start at 2,000,000 (training uses 0.., validation 1,000,000..), so they never overlap.
Reports (``report.json`` + ``report.md`` + ``reliability.png`` in ``--out``):
- segmentation: Dice and HD95 (mm) per segment, on cases with a lesion;
- case classification from the fused opinion: accuracy, balanced accuracy, AUC, ECE, Brier, NLL, against the
  reported (noisy) labels and against the clean labels; risk-coverage of the case uncertainty;
- pixel level: ECE of the foreground probability, uncertainty-error AUROC (does high u flag wrong voxels?);
- robustness: the same under Gaussian noise of sigma = 0, 0.05, 0.1, 0.2 of each phase's 0.5-99.5 percentile range;
- input modes: all three phases vs. a single volume (early phase, subtraction) replicated;
- with ``--compare-model``: another bundle of the same network with another lesion reader (e.g. the shipped one),
  whose reader reads the same lesions of every test case; its calibrated case opinion on the same cases
  (``summary.compare``), so two readers are compared without running the network twice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import SimpleITK as sitk
import torch

from umlcore import metrics
from umlcore.bundle import NETWORK_TTA_MODES, MotionCorrection, load_bundle
from umlcore.errors import BundleError
from umlcore.fusion import calibrate_case_alpha, fit_platt, fuse_reader_opinion, stack_reader_opinion
from umlcore.predictor import Predictor, label_components
from umlcore.preprocess import slice_axis_index, to_slices
from umlcore.reader import READER_TARGETS, most_suspicious
from umlcore.synthetic import generate_case
from workers import ordered_map

TEST_SEED_BASE = 2_000_000
VAL_SEED_BASE = 1_000_000  # validation seeds (as in train.py): used only to fit the case calibration
SIGMAS = (0.0, 0.05, 0.1, 0.2)
#: ``--keep-reader-patches`` writes this into ``--out``: per case the reader read, ``"validation-<seed>"`` /
#: ``"test-<seed>"`` -> its input patches ``(N, C, P, P)`` float32.
READER_PATCHES_FILE = "reader_patches.npz"
#: The reader settings that make its patches: another reader can score kept patches only if these are equal.
READER_INPUT_FIELDS = ("patch_size", "context_slices", "pixel_mm", "max_components")


def _generate(args: tuple[int, tuple[int, int, int], float]):
    seed, shape, label_noise = args
    return generate_case(seed, shape=shape, label_noise=label_noise)


def synthetic_stream(seeds: range, shape, label_noise: float, workers: int = 1) -> Iterator:
    """The synthetic cases of ``seeds`` in order; ``workers > 1`` generates up to ``2 * workers`` of them ahead
    in that many processes (bounded, so a slow predictor does not pile finished cases up in memory)."""
    return ordered_map(_generate, [(s, tuple(shape), label_noise) for s in seeds], workers)


def add_noise(images: list[sitk.Image], sigma: float, rng: np.random.Generator) -> list[sitk.Image]:
    """Gaussian noise with sigma as a fraction of each volume's 0.5-99.5 percentile range."""
    if sigma == 0:
        return images
    noisy = []
    for img in images:
        a = sitk.GetArrayFromImage(img).astype(np.float32)
        lo, hi = np.percentile(a, (0.5, 99.5))
        b = sitk.GetImageFromArray(a + rng.normal(0, sigma * (hi - lo), a.shape).astype(np.float32))
        b.CopyInformation(img)
        noisy.append(b)
    return noisy


SINGLE_VOLUME_MODES = ("pre", "early", "late", "subtraction")


def input_views(images: list[sitk.Image], mode: str) -> list[sitk.Image]:
    """What a user would load: ``phases`` (pre, early, late), one phase alone, or ``subtraction`` (early - pre)."""
    if mode == "phases":
        return images
    if mode in ("pre", "early", "late"):
        return [images[("pre", "early", "late").index(mode)]]
    if mode == "subtraction":
        sub = sitk.Cast(images[1], sitk.sitkFloat32) - sitk.Cast(images[0], sitk.sitkFloat32)
        return [sub]
    raise ValueError(mode)


def component_stats(labelmap: np.ndarray, uncertainty: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``(N, 3)``: voxels, mean uncertainty and voxels inside ``truth`` of each component that
    :func:`umlcore.predictor.remove_uncertain_components` judges."""
    components, sizes, mean_u = label_components(labelmap, uncertainty)
    inside = np.bincount(components.ravel(), weights=(truth.ravel() > 0).astype(np.float64), minlength=len(sizes))
    return np.stack([sizes, mean_u, inside], axis=1)[1:]


COMPONENT_THRESHOLDS = (0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3)


def choose_component_threshold(cases: list[tuple[np.ndarray, int]]) -> tuple[Optional[float], dict[str, float]]:
    """The ``component_max_uncertainty`` that maximises the mean Dice of validation cases with a lesion.

    Args:
        cases: Per case ``(component_stats, lesion voxels in the truth)``.

    Returns:
        The threshold (``None`` when no threshold beats keeping every component) and the mean Dice per candidate.
    """
    def mean_dice(t: Optional[float]) -> float:
        dices = []
        for comps, truth in cases:
            if truth == 0:
                continue
            keep = comps[:, 1] <= t if t is not None else np.ones(len(comps), bool)
            dices.append(2 * comps[keep, 2].sum() / (comps[keep, 0].sum() + truth))
        return float(np.mean(dices)) if dices else float("nan")

    table = {"none": mean_dice(None), **{str(t): mean_dice(t) for t in COMPONENT_THRESHOLDS}}
    best = max(COMPONENT_THRESHOLDS, key=lambda t: table[str(t)])
    return (best if table[str(best)] > table["none"] else None), table


def _stat(fn, values: list) -> float:
    """``fn(values)`` as a float; NaN (without numpy's empty-slice warning) when there are no values."""
    return float(fn(values)) if len(values) else float("nan")


def ece_sampling_floor(probs: np.ndarray, draws: int = 1000, seed: int = 0) -> float:
    """Median ECE of a *perfectly calibrated* model with these positive probabilities on this many cases.

    Labels are drawn as ``Bernoulli(p)`` for each case, so every difference between confidence and accuracy is
    sampling noise: an ECE measured on the same number of cases is only meaningful well above this floor.
    """
    rng = np.random.default_rng(seed)
    p = np.asarray(probs, dtype=float)
    return float(np.median([metrics.expected_calibration_error(p, (rng.random(p.size) < p).astype(int))
                            for _ in range(draws)]))


def json_safe(obj):
    """``obj`` with every NaN / infinite float replaced by ``None``: JSON has no NaN, and ``null`` parses anywhere."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


LESION_SIZE_BINS = ((1, 100), (100, 1000), (1000, None))  # true lesion voxels per case


def dice_by_lesion_size(rows: list[dict]) -> dict[str, dict]:
    """Mean Dice and the share of cases with nothing predicted, by the case's true lesion voxels."""
    out = {}
    for lo, hi in LESION_SIZE_BINS:
        sel = [r for r in rows if r["lesion_voxels"] >= lo and (hi is None or r["lesion_voxels"] < hi)]
        out[f"{lo}-{hi - 1}" if hi else f">={lo}"] = {
            "cases": len(sel), "dice_mean": _stat(np.mean, [r["dice"] for r in sel]),
            "nothing_predicted": sum(r["predicted_voxels"] == 0 for r in sel)}
    return out


def phenotype_group(row: dict) -> str:
    """The case's group by its (first) lesion's phenotype, in the terms of the label rule."""
    if not row["lesions"]:
        return "no lesion"
    if row["kinetics"] == "washout":
        return "washout"
    return "spiculated, no washout" if row["margin"] == "spiculated" else "smooth/lobulated, no washout"


def errors_by_phenotype(rows: list[dict]) -> dict[str, dict]:
    """Per :func:`phenotype_group`: the cases, how many have a suspicious clean label, the accuracy (reported labels,
    threshold 0.5), the mean positive probability, and how many the lesion reader read with its median score."""
    out = {}
    for group in ("no lesion", "smooth/lobulated, no washout", "spiculated, no washout", "washout"):
        sel = [r for r in rows if phenotype_group(r) == group]
        scores = [r["reader_score"] for r in sel if r.get("reader_score") is not None]
        out[group] = {"cases": len(sel), "suspicious": sum(r["clean_label"] for r in sel),
                      "accuracy": _stat(np.mean, [(r["positive_probability"] >= 0.5) == bool(r["label"]) for r in sel]),
                      "mean_probability": _stat(np.mean, [r["positive_probability"] for r in sel]),
                      "reader_read": len(scores), "reader_score_median": _stat(np.median, scores)}
    return out


@contextlib.contextmanager
def second_reader(predictor: Predictor, other: Optional[Predictor]) -> Iterator[list]:
    """While open, ``other``'s lesion reader also reads the lesions ``predictor``'s reader reads (the same volumes,
    segmentation and components; ``other``'s own patch settings); yields the list each reading is appended to.

    ``other`` must share ``predictor``'s network (see :func:`check_comparable`); ``None`` yields an empty list."""
    readings: list = []
    if other is None:
        yield readings
        return
    before = vars(predictor).get("_read_lesions")  # an instance's own wrapper, if it had one
    own = predictor._read_lesions

    def read(stack, labels, spacing_hw, single_volume):
        readings.append(other._read_lesions(stack, labels, spacing_hw, single_volume))
        return own(stack, labels, spacing_hw, single_volume)

    predictor._read_lesions = read
    try:
        yield readings
    finally:
        if before is None:
            del predictor._read_lesions  # the class's method again
        else:
            predictor._read_lesions = before


@contextlib.contextmanager
def refiner_inputs(predictor: Predictor) -> Iterator[list]:
    """While open, the labelmap (slice order) each of ``predictor``'s calls of its refiner step was given is
    appended to the yielded list where the refiner redrew it (``Predictor._refine`` applied): the labelmap the
    predictor would have written without a refiner, for a paired Dice on the same run."""
    captured: list = []
    own = predictor._refine

    def refine(stack, fg, labels, single_volume):
        out = own(stack, fg, labels, single_volume)
        if out[1] is not None:
            captured.append(labels.copy())
        return out

    predictor._refine = refine
    try:
        yield captured
    finally:
        del predictor._refine  # the class's method again


def refiner_effect(rows: list[dict], draws: int = 1000, seed: int = 0) -> Optional[dict]:
    """Lesion Dice with and without the refiner on the same cases (rows with ``dice_unrefined``): means, medians,
    the mean difference with a 95 % bootstrap interval over cases, and the Dice by lesion size without it."""
    sel = [r for r in rows if r.get("dice_unrefined") is not None]
    if not sel:
        return None
    after = np.array([r["dice"] for r in sel])
    before = np.array([r["dice_unrefined"] for r in sel])
    diff = after - before
    boot = np.random.default_rng(seed).integers(0, len(diff), (draws, len(diff)))
    means = diff[boot].mean(axis=1)
    unrefined = [{**r, "dice": r["dice_unrefined"], "predicted_voxels": r["predicted_voxels_unrefined"]} for r in sel]
    return {"cases": len(sel), "dice_mean_without": float(before.mean()), "dice_mean_with": float(after.mean()),
            "dice_median_without": float(np.median(before)), "dice_median_with": float(np.median(after)),
            "dice_difference": float(diff.mean()),
            "dice_difference_95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "cases_better": int((diff > 1e-9).sum()), "cases_worse": int((diff < -1e-9).sum()),
            "components_refined": int(sum(r.get("components_refined") or 0 for r in rows)),
            "dice_by_lesion_size_without": dice_by_lesion_size(unrefined)}


@contextlib.contextmanager
def reader_inputs(predictor: Predictor, enabled: bool = True) -> Iterator[list]:
    """While open, every input batch of ``predictor``'s lesion reader (``(N, C, P, P)`` float32 patches, one per
    component read) is appended, as a numpy copy, to the yielded list (a forward pre-hook; nothing when
    ``enabled`` is false or the bundle has no reader). With the card's test-time augmentation ``"dihedral"`` the
    reader's batch holds each patch's 8 views (:func:`umlcore.reader.dihedral_views`): only the patches themselves,
    its first eighth, are kept."""
    captured: list = []
    reader = predictor.bundle.reader
    hook = None
    if enabled and reader is not None:
        views = 8 if predictor.card.reader.test_time_augmentation == "dihedral" else 1
        hook = reader.register_forward_pre_hook(lambda module, args: captured.append(
            args[0][: args[0].shape[0] // views].detach().cpu().numpy().copy()))
    try:
        yield captured
    finally:
        if hook is not None:
            hook.remove()


def network_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a network's tensors (names and bytes in name order): equal for bundles that share the network
    whatever their readers."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_comparable(bundle, other) -> list[str]:
    """Why ``other`` cannot be compared with ``bundle`` by :func:`second_reader` (empty if it can): it needs a
    reader and the same network weights, labels and component filter, so both read the same segmentation."""
    problems = []
    if bundle.reader is None or bundle.card.reader is None:
        problems.append("the evaluated model has no lesion reader (its rows would lack the network's own opinion)")
    if other.reader is None or other.card.reader is None:
        problems.append("it has no lesion reader")
    if other.card.positive_class != bundle.card.positive_class or other.card.classes != bundle.card.classes:
        problems.append("its classes differ")
    if other.card.input != bundle.card.input:
        problems.append("its input (channels, normalisation, slices) differs")
    if other.card.component_max_uncertainty != bundle.card.component_max_uncertainty:
        problems.append(f"its component filter {other.card.component_max_uncertainty} differs from "
                        f"{bundle.card.component_max_uncertainty}")
    ours, theirs = bundle.model.state_dict(), other.model.state_dict()
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
        problems.append("its network weights differ")
    return problems


def case_metrics(rows: list[dict]) -> tuple[dict, tuple[np.ndarray, ...]]:
    """The case-level figures of :func:`evaluate_cases` rows (their ``positive_probability`` and ``uncertainty``):
    accuracy, balanced accuracy, AUC, ECE (and its sampling floor), Brier, NLL, the same against the clean labels,
    the mean case uncertainty, :func:`errors_by_phenotype`, the reader's own AUCs (rows of a bundle with a reader)
    and risk-coverage of the uncertainty.

    Returns:
        The figures and ``(probabilities, labels, uncertainties, correct)`` arrays ``(N,)``.
    """
    probs_a, labels_a, clean_a, u_case = (np.array([r[k] for r in rows], dtype=dt) for k, dt in
                                          (("positive_probability", float), ("label", int), ("clean_label", int),
                                           ("uncertainty", float)))
    correct = ((probs_a >= 0.5) == labels_a.astype(bool)).astype(int)
    res = {
        "accuracy": metrics.accuracy(probs_a, labels_a),
        "balanced_accuracy": metrics.balanced_accuracy(probs_a, labels_a),
        "auc": metrics.roc_auc(probs_a, labels_a),
        "ece": metrics.expected_calibration_error(probs_a, labels_a),
        "ece_sampling_floor": ece_sampling_floor(probs_a) if len(probs_a) else float("nan"),
        "brier": metrics.brier_score(probs_a, labels_a),
        "nll": metrics.nll(probs_a, labels_a),
        "auc_clean_labels": metrics.roc_auc(probs_a, clean_a),
        "accuracy_clean_labels": metrics.accuracy(probs_a, clean_a),
        "ece_clean_labels": metrics.expected_calibration_error(probs_a, clean_a),
        "case_uncertainty_mean": float(np.mean(u_case)),
        "errors_by_phenotype": errors_by_phenotype(rows),
    }
    if any(r["network_positive_probability"] is not None for r in rows):  # a bundle with a lesion reader
        network = np.array([r["network_positive_probability"] for r in rows], dtype=float)
        read = np.array([r["reader_score"] is not None for r in rows])
        alone = np.where(read, [r["reader_score"] or 0.0 for r in rows], network)
        res["reader"] = {"cases_read": int(read.sum()),
                         "auc_network_alone": metrics.roc_auc(network, labels_a),
                         "auc_reader_alone": metrics.roc_auc(alone, labels_a)}
    rc = metrics.risk_coverage(u_case, correct.astype(bool), kind="uncertainty")
    res["eaurc"] = float(rc["eaurc"])
    res["aurc"] = float(rc["aurc"])
    return res, (probs_a, labels_a, u_case, correct)


def evaluate_cases(predictor: Predictor, n_cases: int, shape, label_noise: float, sigma: float, mode: str,
                   pixel_stats: bool, seed_base: int = TEST_SEED_BASE, components: bool = False,
                   workers: int = 1, compare: Optional[Predictor] = None, patches: Optional[dict] = None) -> dict:
    """``predictor`` end to end on ``n_cases`` synthetic cases from ``seed_base``: one row per case (Dice, HD95,
    the case opinion, the network's and the reader's parts of it, the labels) and the figures over them.

    ``compare``: another bundle's predictor whose reader reads the same lesions (:func:`second_reader`; rows get
    ``compare_reader_score``). ``patches``: a dict that receives, per seed of a case the reader read, its input
    patches ``(N, C, P, P)`` (:func:`reader_inputs`; ``training/rescore_reader.py`` scores them with another reader).
    """
    rng = np.random.default_rng(12345)
    comps, rows = [], []
    pix_counts = np.zeros((2, metrics.UNCERTAINTY_BINS), dtype=np.int64)  # every voxel: wrong, right
    pix_p, pix_y = [], []
    for case in synthetic_stream(range(seed_base, seed_base + n_cases), shape, label_noise, workers):
        images = input_views(add_noise(case.to_sitk(), sigma, rng), mode)
        with second_reader(predictor, compare) as readings, \
                reader_inputs(predictor, patches is not None) as captured, refiner_inputs(predictor) as drawn:
            pred = predictor.predict(images, case_id=f"synthetic-{case.seed}")
        if captured and pred.summary.get("lesions"):  # the opinion's reading is the last (a check of the
            patches[case.seed] = captured[-1]       # segmentation, card field segmentation_min_lesion, reads first)
        lab = sitk.GetArrayFromImage(pred.labelmap)
        unc = sitk.GetArrayFromImage(pred.uncertainty)
        if components:
            comps.append((component_stats(lab, unc, case.mask), int(case.mask.sum())))
        d = h = None
        if case.mask.any():
            d, h = metrics.dice(lab, case.mask), metrics.hd95(lab, case.mask, spacing=case.spacing[::-1])
        unrefined = None
        if drawn:  # the refiner redrew this case: the labelmap it was given, in the predictor's slice order
            axis = slice_axis_index(images[0].GetDirection(), predictor.card.input.slicing_axis)
            unrefined = drawn[-1]
            truth = to_slices(case.mask, axis)
        c = pred.summary["classification"]
        p = float(c["positive_probability"])
        reader = c.get("reader") or {}
        network_p = reader.get("network_probabilities", [None, None])[predictor.card.positive_class]
        top = max(pred.summary.get("lesions") or [], key=lambda x: x["suspicion"], default=None)
        moved = [np.linalg.norm(ph["shift_mm"]) for ph in pred.summary["motion_correction"]["phases"] if ph["applied"]]
        rows.append({"seed": case.seed, "lesions": len(case.lesions), "lesion_voxels": int(case.mask.sum()),
                     "kinetics": case.lesions[0]["kinetics"] if case.lesions else None,
                     "margin": case.lesions[0]["margin"] if case.lesions else None,
                     "dice": d, "hd95_mm": h, "predicted_voxels": int((lab > 0).sum()),
                     "components_removed": int(pred.summary.get("postprocessing", {}).get("components_removed", 0)),
                     "components_refined": pred.summary.get("postprocessing", {}).get("components_refined"),
                     "motion_shift_mm": float(max(moved)) if moved else None,  # the longest shift applied
                     "dice_unrefined": None if unrefined is None or d is None else metrics.dice(unrefined, truth),
                     "predicted_voxels_unrefined": None if unrefined is None else int((unrefined > 0).sum()),
                     "positive_probability": p, "uncertainty": float(c["uncertainty"]),
                     "reader_score": reader.get("score"),
                     "reader_probabilities": None if top is None else [top["probabilities"][t] for t in READER_TARGETS],
                     "network_positive_probability": network_p,
                     "network_uncertainty": reader.get("network_uncertainty"),
                     "label": int(case.label), "clean_label": int(case.clean_label)})
        if compare is not None:
            theirs = readings[0] if readings and readings[0] and readings[0]["score"] is not None else None
            rows[-1]["compare_reader_score"] = None if theirs is None else theirs["score"]
            rows[-1]["compare_reader_probabilities"] = (None if theirs is None else [
                float(v) for v in most_suspicious(theirs["p"])])
        if pixel_stats:
            pix_counts += metrics.uncertainty_error_counts(unc, lab != case.mask)
            sel = rng.random(lab.size) < 0.05  # deterministic 5% voxel subsample for the pixel ECE
            fg = sitk.GetArrayFromImage(pred.probability).ravel()[sel] if pred.probability is not None else None
            if fg is not None:
                pix_p.append(fg)
                pix_y.append(case.mask.ravel()[sel])
    dices = [r["dice"] for r in rows if r["dice"] is not None]
    hds = [r["hd95_mm"] for r in rows if r["dice"] is not None]
    res = {
        "cases": n_cases,
        "cases_with_lesion": len(dices),
        "dice_mean": _stat(np.mean, dices),
        "dice_median": _stat(np.median, dices),
        "hd95_mm_median": _stat(np.median, [h for h in hds if np.isfinite(h)]),
        "hd95_inf_cases": int(sum(not np.isfinite(h) for h in hds)),
        # false lesions a reader of the labelmap would see: the share of lesion-free cases with anything segmented
        "lesion_free_segmented": _stat(np.mean, [r["predicted_voxels"] > 0 for r in rows if r["dice"] is None]),
    }
    case, arrays = case_metrics(rows)
    res.update(case)
    res["dice_by_lesion_size"] = dice_by_lesion_size(rows)
    refiner = refiner_effect(rows)
    if refiner is not None:
        res["refiner"] = refiner
    if pixel_stats:
        res["pixel_uncertainty_error_auroc"] = metrics.histogram_auroc(*pix_counts)
        res["pixel_error_rate"] = float(pix_counts[0].sum() / pix_counts.sum())
        if pix_p:
            res["pixel_ece"] = metrics.expected_calibration_error(np.concatenate(pix_p), np.concatenate(pix_y))
    res["_probs"], res["_labels"], res["_u"], res["_correct"] = arrays
    res["_rows"] = rows
    res["_components"] = comps
    return res


#: The reader weights ``--reader-weight fit`` tries, per fusion rule (``"logit"`` and ``"evidence"``: a log-odds
#: factor, not a share).
READER_WEIGHTS = {"average": tuple(round(0.05 * i, 2) for i in range(21)),
                  "logit": tuple(round(0.05 * i, 2) for i in range(41)),
                  "evidence": tuple(round(0.05 * i, 2) for i in range(41))}
#: ``--reader-weight fit`` keeps the lowest validation NLL among the weights whose calibrated validation ECE is at
#: most this (the model's calibration target), or the lowest NLL if none is.
READER_WEIGHT_ECE_MAX = 0.05
READER_WEIGHT_CRITERION = f"lowest NLL after the Platt calibration among ECE <= {READER_WEIGHT_ECE_MAX}"


def network_strengths(rows: list[dict]) -> np.ndarray:
    """``(N,)`` the network's case strength ``S = 2 / u`` of each row, before the reader.

    Rows of a model whose reader may add evidence carry ``network_uncertainty``; rows written before that field
    existed came from rules that keep ``S``, so their ``uncertainty`` is the network's."""
    return np.array([2.0 / (r.get("network_uncertainty") or r["uncertainty"]) for r in rows], dtype=float)


def calibrated_alphas(alphas: np.ndarray, rows: list[dict], slope: float, intercept: float, positive: int,
                      fusion: Optional[str]) -> np.ndarray:
    """``(N, 2)`` the predictor's calibrated case opinions from the uncalibrated ``alphas`` of ``rows``
    (:func:`umlcore.fusion.calibrate_case_alpha`; with rules ``"evidence"`` and ``"stacked"``, the network's strength
    as the least)."""
    floors = network_strengths(rows) if fusion in ("evidence", "stacked") else [None] * len(rows)
    return np.array([calibrate_case_alpha(a, slope, intercept, positive, f) for a, f in zip(alphas, floors)])


def _alphas(p: np.ndarray, strength: np.ndarray, positive: int) -> np.ndarray:
    """``(N, 2)`` Dirichlets ``strength * (1 - p, p)``, kept >= 1 (float round-off around the prior)."""
    out = np.empty((len(p), 2))
    out[:, positive] = strength * p
    out[:, 1 - positive] = strength - out[:, positive]
    return np.maximum(out, 1.0)


def row_alphas(rows: list[dict], positive: int = 1) -> np.ndarray:
    """``(N, 2)`` each row's case Dirichlet as the predictor gave it (``positive_probability``, ``S = 2 / u``)."""
    return _alphas(np.array([r["positive_probability"] for r in rows], dtype=float),
                   np.array([2.0 / r["uncertainty"] for r in rows], dtype=float), positive)


def reader_merged_alphas(rows: list[dict], weight: float, positive: int = 1, fusion: str = "average",
                         stacking: Optional[dict] = None) -> np.ndarray:
    """Each row's uncalibrated case Dirichlet had the reader had ``weight`` and rule ``fusion``, as the predictor
    fuses it.

    A row keeps the network's opinion (its ``network_positive_probability`` with the strength of
    :func:`network_strengths`) and, where the reader read a lesion (``reader_score`` not ``None``), merges the
    reader's score by :func:`umlcore.fusion.fuse_reader_opinion`. With rule ``"stacked"`` every row's opinion is
    :func:`umlcore.fusion.stack_reader_opinion` of the network's and the row's ``reader_probabilities`` (the most
    suspicious component's) with the coefficients ``stacking``.

    Returns:
        ``(N, 2)`` Dirichlet parameters.
    """
    out = _alphas(np.array([r["network_positive_probability"] for r in rows], dtype=float), network_strengths(rows),
                  positive)
    if fusion == "stacked":
        missing = [r.get("seed") for r in rows if r["reader_score"] is not None and r.get("reader_probabilities") is None]
        if missing:
            raise ValueError(f"rule 'stacked' needs each read row's reader_probabilities; rows of seeds {missing[:3]} "
                             "lack them (rows written before the field existed: rescore them with rescore_reader.py)")
        return np.array([stack_reader_opinion(a, None if r["reader_score"] is None else r["reader_probabilities"],
                                              stacking, positive) for a, r in zip(out, rows)])
    for i, r in enumerate(rows):
        if r["reader_score"] is not None:
            out[i] = fuse_reader_opinion(out[i], r["reader_score"], weight, positive, fusion)
    return out


def choose_reader_weight(rows: list[dict], positive: int = 1,
                         fusions: tuple[str, ...] = ("average",)) -> tuple[str, float, dict[str, dict]]:
    """The fusion rule and reader weight (of :data:`READER_WEIGHTS`) whose merged, Platt-calibrated validation
    opinions have the lowest NLL (a proper score: discrimination and calibration together) among those whose ECE is
    at most :data:`READER_WEIGHT_ECE_MAX` (all, if none is), and per rule and weight that NLL, the ECE and the AUC.

    Args:
        rows: Validation rows of :func:`evaluate_cases` for a bundle with a reader, run without a case calibration.
        positive: Index of the positive class.
        fusions: The rules to try (keys of :data:`READER_WEIGHTS`).

    Returns:
        The rule, the weight and ``{rule: {str(weight): {"nll": ..., "ece": ..., "auc": ...}}}``.
    """
    labels = np.array([r["label"] for r in rows], dtype=int)
    table: dict[str, dict] = {}
    for fusion in fusions:
        table[fusion] = {}
        for w in READER_WEIGHTS[fusion]:
            alphas = reader_merged_alphas(rows, w, positive, fusion)
            p = alphas[:, positive] / alphas.sum(axis=1)
            slope, intercept = fit_platt(p, labels)
            calibrated = calibrated_alphas(alphas, rows, slope, intercept, positive, fusion)
            q = calibrated[:, positive] / calibrated.sum(axis=1)
            table[fusion][str(w)] = {"nll": metrics.nll(q, labels), "ece": metrics.expected_calibration_error(q, labels),
                                     "auc": metrics.roc_auc(p, labels)}
    candidates = [(f, w) for f in fusions for w in READER_WEIGHTS[f]]
    calibrated_enough = [fw for fw in candidates if table[fw[0]][str(fw[1])]["ece"] <= READER_WEIGHT_ECE_MAX]
    fusion, w = min(calibrated_enough or candidates, key=lambda fw: table[fw[0]][str(fw[1])]["nll"])
    return fusion, w, table


def fitted_on(rows: list[dict]) -> str:
    """How a fit names its data: ``"<N> validation cases, seeds <first>..<last>"``."""
    seeds = sorted(r["seed"] for r in rows)
    return f"{len(rows)} validation cases, seeds {seeds[0]}..{seeds[-1]}"


def fit_reader(rows: list[dict], card, mode: str) -> tuple[dict, np.ndarray]:
    """``--reader-weight fit``: the reader's rule and weight chosen on validation rows (:func:`choose_reader_weight`).

    Args:
        rows: Validation rows of a bundle with a reader, without a case calibration.
        card: That bundle's card (its positive class and reader rule).
        mode: ``--reader-fusion``: ``"bundle"`` (the card's rule), ``"fit"`` (every rule) or one rule.

    Returns:
        The card's ``reader_fit`` record (rule, weight, data, criterion, the validation table) and the rows'
        uncalibrated merged Dirichlets ``(N, 2)`` under that rule and weight.
    """
    fusions = ((card.reader.fusion,) if mode == "bundle" else tuple(READER_WEIGHTS) if mode == "fit" else (mode,))
    fusion, weight, table = choose_reader_weight(rows, card.positive_class, fusions)
    record = {"fusion": fusion, "weight": weight, "fitted_on": fitted_on(rows), "criterion": READER_WEIGHT_CRITERION,
              "validation": table}
    return record, reader_merged_alphas(rows, weight, card.positive_class, fusion)


def fit_calibration(probs: np.ndarray, labels: np.ndarray, rows: list[dict]) -> dict:
    """The card's ``case_calibration`` record: the Platt fit of validation opinions ``probs`` ``(N,)`` to ``labels``
    ``(N,)`` (the cases of ``rows``), with the ECE before it."""
    slope, intercept = fit_platt(probs, labels)
    return {"slope": slope, "intercept": intercept, "fitted_on": fitted_on(rows),
            "validation_ece_before": metrics.expected_calibration_error(probs, labels)}


def validation_from_report(path: Path, bundle, n_cases: int, shape, label_noise: float, error) -> dict:
    """The first ``n_cases`` validation rows of an earlier ``evaluate.py --calibrate-cases`` report of the same
    weights, as :func:`evaluate_cases` would return them (what the calibration and the weight fit need).

    The rows depend on the network's and the reader's weights, its test-time augmentation, the component filter, the
    reader's rule and weight
    (their ``positive_probability``), the case shape and the label noise; each must match ``bundle`` and the
    arguments, else ``error`` (argparse's) is called with what differs.
    """
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        error(f"--validation-from {path}: cannot read it as JSON ({e})")
    rows = report.get("validation_cases") or []
    card = bundle.card
    reader = None if card.reader is None else {"fusion": card.reader.fusion, "weight": card.reader.weight}
    problems = []
    if report.get("model", {}).get("sha256") != bundle.sha256:
        problems.append(f"it evaluated other weights (sha256 {report.get('model', {}).get('sha256')!r}, this bundle's "
                        f"{bundle.sha256!r})")
    if len(rows) < n_cases or [r.get("seed") for r in rows[:n_cases]] != list(range(VAL_SEED_BASE, VAL_SEED_BASE + n_cases)):
        problems.append(f"it lacks validation rows for seeds {VAL_SEED_BASE}..{VAL_SEED_BASE + n_cases - 1} "
                        f"(it has {len(rows)})")
    if report.get("summary", {}).get("component_max_uncertainty") != card.component_max_uncertainty:
        problems.append(f"its component filter was {report.get('summary', {}).get('component_max_uncertainty')!r}, "
                        f"this bundle's is {card.component_max_uncertainty!r}")
    views = report.get("summary", {}).get("test_time_augmentation", "none")
    if views != card.test_time_augmentation:
        problems.append(f"the network read its cases with test_time_augmentation {views!r}, this run with "
                        f"{card.test_time_augmentation!r}")
    aligned = report.get("summary", {}).get("motion_correction", dataclasses.asdict(MotionCorrection()))
    if aligned != dataclasses.asdict(card.input.motion_correction):
        problems.append(f"its cases were read with motion_correction {aligned}, this run with "
                        f"{dataclasses.asdict(card.input.motion_correction)}")
    if report.get("validation_cases_reader") != reader:
        problems.append(f"its rows were fused with reader {report.get('validation_cases_reader')!r}, this bundle's is "
                        f"{reader!r}")
    if f"shape {tuple(shape)}, label noise {label_noise} " not in str(report.get("dataset", "")):
        problems.append(f"its cases were not of shape {tuple(shape)} with label noise {label_noise}")
    if problems:
        error(f"--validation-from {path}: " + "; ".join(problems) + ". Run the validation pass (drop --validation-from)")
    rows = rows[:n_cases]
    probs = np.array([r["positive_probability"] for r in rows], dtype=float)
    labels = np.array([r["label"] for r in rows], dtype=int)
    return {"_rows": rows, "_probs": probs, "_labels": labels,
            "_u": np.array([r["uncertainty"] for r in rows], dtype=float),
            "_correct": ((probs >= 0.5) == labels.astype(bool)).astype(int),
            "ece": metrics.expected_calibration_error(probs, labels)}


def card_opinions(rows: list[dict], card, calibrated: bool = True) -> list[dict]:
    """``rows`` with the ``positive_probability`` and ``uncertainty`` that ``card``'s predictor gives them: each row's
    network opinion merged with its ``reader_score`` by the card's reader rule and weight, and calibrated by the
    card's case calibration if ``calibrated``."""
    pos = card.positive_class
    alphas = reader_merged_alphas(rows, card.reader.weight, pos, card.reader.fusion, card.reader.stacking)
    if calibrated and card.case_calibration is not None:
        c = card.case_calibration
        alphas = calibrated_alphas(alphas, rows, c["slope"], c["intercept"], pos, card.reader.fusion)
    strength = alphas.sum(axis=1)
    return [{**r, "positive_probability": float(a[pos] / s), "uncertainty": float(2.0 / s)}
            for r, a, s in zip(rows, alphas, strength)]


def compare_opinions(rows: list[dict], card) -> dict:
    """The case metrics of ``card``'s opinion on ``rows`` (its reader's ``compare_reader_score``, rule, weight and
    case calibration on each row's network opinion), as its predictor would have given them.

    Returns:
        ``{"auc", "auc_clean_labels", "accuracy", "ece", "brier", "nll", "eaurc"}`` of the calibrated opinions, and
        ``"probabilities"``: the positive probability of each row."""
    theirs = card_opinions([{**r, "reader_score": r["compare_reader_score"],
                             "reader_probabilities": r.get("compare_reader_probabilities")} for r in rows], card)
    q = np.array([r["positive_probability"] for r in theirs])
    u = np.array([r["uncertainty"] for r in theirs])
    labels = np.array([r["label"] for r in rows], dtype=int)
    clean = np.array([r["clean_label"] for r in rows], dtype=int)
    correct = (q >= 0.5) == labels.astype(bool)
    return {"auc": metrics.roc_auc(q, labels), "auc_clean_labels": metrics.roc_auc(q, clean),
            "accuracy": metrics.accuracy(q, labels), "ece": metrics.expected_calibration_error(q, labels),
            "brier": metrics.brier_score(q, labels), "nll": metrics.nll(q, labels),
            "eaurc": float(metrics.risk_coverage(u, correct, kind="uncertainty")["eaurc"]),
            "probabilities": q.tolist()}


def suggest_review_uncertainty(u: np.ndarray, correct: np.ndarray) -> float:
    """The case-uncertainty threshold above which cases are flagged 'review': the smallest threshold whose
    retained (u <= t) cases reach the error rate of the best half, so 'reliable' means measurably safer."""
    order = np.argsort(u)
    errs = 1 - correct[order]
    half = max(1, len(u) // 2)
    target = errs[:half].mean()
    best = float(np.quantile(u, 0.9))
    for k in range(len(u), half - 1, -1):
        if errs[:k].mean() <= target + 1e-9:
            best = float(u[order][k - 1])
            break
    return round(best, 4)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def write_markdown(report: dict, path: Path) -> None:
    s = report["summary"]
    lines = [
        f"# Evaluation of `{report['model']['id']}` {report['model']['version']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Data: {report['dataset']}",
        "",
        "## Headline (all three phases, no added noise)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in s.items()
              if not isinstance(v, dict)]
    if s.get("case_calibration"):
        c = s["case_calibration"]
        lines += ["", f"Case calibration (Platt, fitted on {c['fitted_on']}): slope {c['slope']:.3f}, intercept "
                      f"{c['intercept']:.3f}; validation ECE before it {c['validation_ece_before']:.3f}."]
    if s.get("compare"):
        c, m = s["compare"], s["compare"]["model"]
        lines += ["", f"Compared on the same cases (the same segmentation; its reader, rule and calibration): "
                      f"`{m['id']}` {m['version']} ({m['path']}, reader `{m['reader_fusion']}` {m['reader_weight']}):", "",
                  "| model | AUC | AUC clean | ECE | accuracy | Brier | NLL | eAURC |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in ("auc", "auc_clean_labels", "ece", "accuracy",
                                                                        "brier", "nll", "eaurc")) + " |"
                  for name, r in ((f"{report['model']['version']} (this)", s), (m["version"], c))]
    if s.get("dice_by_lesion_size"):
        bins = s["dice_by_lesion_size"]
        lines += ["", "Lesion Dice by the case's true lesion size (voxels):", "",
                  "| lesion voxels | cases | mean Dice | nothing predicted |", "|---|---|---|---|"]
        lines += [f"| {k} | {b['cases']} | {_fmt(b['dice_mean'])} | {b['nothing_predicted']} |" for k, b in bins.items()]
    if s.get("refiner"):
        r = s["refiner"]
        lo, hi = r["dice_difference_95"]
        lines += ["", f"The refiner on the same {r['cases']} lesion cases ({r['components_refined']} components redrawn "
                      f"in all cases): lesion Dice {r['dice_mean_without']:.3f} without it, {r['dice_mean_with']:.3f} "
                      f"with it (median {r['dice_median_without']:.3f} -> {r['dice_median_with']:.3f}); difference "
                      f"{r['dice_difference']:+.3f} (95 % bootstrap {lo:+.3f} .. {hi:+.3f}), {r['cases_better']} cases "
                      f"better, {r['cases_worse']} worse. Without it, by lesion size:", "",
                  "| lesion voxels | cases | mean Dice | nothing predicted |", "|---|---|---|---|"]
        lines += [f"| {k} | {b['cases']} | {_fmt(b['dice_mean'])} | {b['nothing_predicted']} |"
                  for k, b in r["dice_by_lesion_size_without"].items()]
    if s.get("errors_by_phenotype"):
        lines += ["", "Case opinions by the (first) lesion's phenotype (accuracy against the reported labels):", "",
                  "| group | cases | suspicious | accuracy | mean probability | read by the reader | median reader score |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {g} | {b['cases']} | {b['suspicious']} | {_fmt(b['accuracy'])} | {_fmt(b['mean_probability'])} | "
                  f"{b['reader_read']} | {_fmt(b['reader_score_median'])} |" for g, b in s["errors_by_phenotype"].items()]
    if s.get("component_filter_validation_dice"):
        table = s["component_filter_validation_dice"]
        lines += ["", "Component filter chosen on the same validation cases (mean lesion Dice by "
                      "`component_max_uncertainty`):", "", "| " + " | ".join(table) + " |",
                  "|" + "---|" * len(table), "| " + " | ".join(f"{v:.3f}" for v in table.values()) + " |"]
    lines += ["", "## Robustness (Gaussian noise, sigma as a fraction of the 0.5-99.5 percentile range)", "",
              "| sigma | Dice | AUC | ECE | accuracy | pixel u-error AUROC |", "|---|---|---|---|---|---|"]
    for r in report["robustness"]:
        lines.append(f"| {r['sigma']} | " + " | ".join(_fmt(r.get(k)) for k in (
            "dice_mean", "auc", "ece", "accuracy", "pixel_uncertainty_error_auroc")) + " |")
    lines += ["", "## Input modes (no added noise)", "", "| input | Dice | AUC | ECE | accuracy |", "|---|---|---|---|---|"]
    for name, r in report["input_modes"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in ("dice_mean", "auc", "ece", "accuracy")) + " |")
    lines += ["", "![reliability diagram](reliability.png)", ""]
    path.write_text("\n".join(lines))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle folder / zip")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256))
    p.add_argument("--label-noise", type=float, default=0.02)
    p.add_argument("--robustness-cases", type=int, default=40, help="cases per noise level (sigma > 0)")
    p.add_argument("--mode-cases", type=int, default=40, help="cases per single-volume input mode")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "mixed"],
                   help="the predictor's precision (mixed: bf16 autocast on CUDA; the shipped figures are fp32)")
    p.add_argument("--workers", type=int, default=1, help="processes generating the synthetic cases ahead")
    p.add_argument("--calibrate-cases", type=int, default=0,
                   help="fit a Platt calibration of the case opinion on this many validation cases (seeds from "
                        "1000000, disjoint from the test seeds), apply it here, and record it for export.py")
    p.add_argument("--component-filter", default="fit", choices=["fit", "bundle"],
                   help="with --calibrate-cases: 'fit' chooses the uncertain-component filter on the validation "
                        "cases first (two validation passes); 'bundle' keeps the bundle's filter (one pass)")
    p.add_argument("--reader-weight", default="bundle", choices=["bundle", "fit"],
                   help="with --calibrate-cases and a bundle with a lesion reader: 'fit' chooses the reader's weight "
                        "in the case opinion on the validation cases (lowest NLL after calibration) before the "
                        "calibration is fitted; 'bundle' keeps the card's")
    p.add_argument("--validation-from", type=Path, default=None,
                   help="with --calibrate-cases N --component-filter bundle: take the N validation rows from this "
                        "earlier report.json of the same weights (and reader rule and filter) instead of running the "
                        "validation pass again (they depend on nothing the calibration changes)")
    p.add_argument("--test-seeds-from", type=int, default=TEST_SEED_BASE,
                   help=f"first test seed (default {TEST_SEED_BASE:,}; a later one gives test cases that an earlier "
                        "report has not seen)")
    p.add_argument("--reader-fusion", default="bundle", choices=["bundle", *READER_WEIGHTS, "fit"],
                   help="with --reader-weight fit: the rule whose weight is fitted ('bundle': the card's; 'fit': "
                        "every rule, keeping the lowest validation NLL)")
    p.add_argument("--compare-model", type=Path, default=None,
                   help="a bundle of the same network with another lesion reader (e.g. the shipped model): its reader "
                        "also reads each test case's lesions, and the report gives its calibrated case opinion's "
                        "metrics on the same cases (summary.compare)")
    p.add_argument("--test-time-augmentation", default="bundle", choices=["bundle", *NETWORK_TTA_MODES],
                   help="how the network reads each slice in this run: 'bundle' (the card's rule) or another rule "
                        "(flip_w: as it is and mirrored left-right; flip_hw: 4 mirrored views), recorded in the "
                        "report's summary")
    p.add_argument("--motion-correction", default="bundle", metavar="{bundle,none,CHANNEL}",
                   help="how the phases of a multi-phase case are aligned in this run: 'bundle' (the card's rule), "
                        "'none' (read as given) or the name of a channel (e.g. 'early') the others are moved onto "
                        "by a 3D translation; recorded in the report's summary")
    p.add_argument("--keep-reader-patches", action="store_true",
                   help="keep the lesion reader's input patches of the validation and test cases "
                        "(reader_patches.npz in --out), so training/rescore_reader.py can score another reader of "
                        "the same network on the same cases in minutes")
    args = p.parse_args(argv)
    if args.component_filter == "bundle" and not args.calibrate_cases:
        p.error("--component-filter bundle only applies to the calibration fit: add --calibrate-cases N")
    if args.reader_weight == "fit" and not args.calibrate_cases:
        p.error("--reader-weight fit chooses the weight on validation cases: add --calibrate-cases N")
    if args.reader_fusion != "bundle" and args.reader_weight != "fit":
        p.error("--reader-fusion chooses the rule whose weight is fitted: add --reader-weight fit")
    if args.validation_from is not None and (not args.calibrate_cases or args.component_filter != "bundle"):
        p.error("--validation-from replaces the validation pass of --calibrate-cases N --component-filter bundle: "
                "add both")
    if args.test_seeds_from < TEST_SEED_BASE:
        p.error(f"--test-seeds-from {args.test_seeds_from}: test seeds start at {TEST_SEED_BASE:,} or later (lower "
                "seeds are training and validation cases)")
    bundle = load_bundle(args.model)
    if args.test_time_augmentation != "bundle":
        bundle = dataclasses.replace(bundle, card=dataclasses.replace(
            bundle.card, test_time_augmentation=args.test_time_augmentation))
    if args.motion_correction != "bundle":
        mode, reference = ("none", "") if args.motion_correction == "none" else ("translation", args.motion_correction)
        if mode != "none" and reference not in bundle.card.input.channels:
            p.error(f"--motion-correction {args.motion_correction}: give 'bundle', 'none' or one of {args.model}'s "
                    f"channels {list(bundle.card.input.channels)} to align the others onto")
        spec = dataclasses.replace(bundle.card.input, motion_correction=dataclasses.replace(
            bundle.card.input.motion_correction, mode=mode, reference=reference))
        bundle = dataclasses.replace(bundle, card=dataclasses.replace(bundle.card, input=spec))
    if args.keep_reader_patches and bundle.card.reader is None:
        p.error(f"--keep-reader-patches: {args.model} has no lesion reader (training/add_reader.py adds one)")
    if args.reader_weight == "fit" and bundle.card.reader is None:
        p.error(f"--reader-weight fit: {args.model} has no lesion reader (training/add_reader.py adds one)")
    if args.reader_weight == "fit" and args.reader_fusion == "bundle" and bundle.card.reader.fusion == "stacked":
        p.error(f"--reader-weight fit: {args.model}'s rule 'stacked' has coefficients, not a weight: fit them with "
                "training/fit_reader_fusion.py --fusion stacked, or name another rule with --reader-fusion")
    reused = None if args.validation_from is None else validation_from_report(
        args.validation_from, bundle, args.calibrate_cases, args.shape, args.label_noise, p.error)
    other = None
    if args.compare_model is not None and args.calibrate_cases and args.component_filter == "fit":
        p.error("--compare-model needs the same segmentation as --model: add --component-filter bundle (a fitted "
                "filter could change it)")
    if args.compare_model is not None:
        try:
            other = load_bundle(args.compare_model)
        except BundleError as err:
            p.error(f"--compare-model: {err}")
        problems = check_comparable(bundle, other)
        if problems:
            p.error(f"--compare-model {args.compare_model} cannot read the same lesions as {args.model}: "
                    + "; ".join(problems))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    calibration, val, threshold, threshold_table = None, None, bundle.card.component_max_uncertainty, None
    # what the validation rows' positive_probability were made with (before any --reader-weight fit)
    validation_reader = (None if bundle.card.reader is None else
                         {"fusion": bundle.card.reader.fusion, "weight": bundle.card.reader.weight})
    reader_fit = None
    kept: Optional[dict[str, dict]] = {"validation": {}, "test": {}} if args.keep_reader_patches else None
    if args.calibrate_cases:
        # 1. on validation cases, without post-processing: which component-uncertainty filter helps the Dice most
        def on_validation(card) -> dict:
            if kept is not None:
                kept["validation"] = {}  # the last pass's (the one the calibration is fitted on)
            return evaluate_cases(Predictor(dataclasses.replace(bundle, card=card), device=args.device, batch_size=16,
                                            precision=args.precision),
                                  args.calibrate_cases, args.shape, args.label_noise, 0.0, "phases", False,
                                  seed_base=VAL_SEED_BASE, components=args.component_filter == "fit",
                                  workers=args.workers, patches=None if kept is None else kept["validation"])

        if args.component_filter == "fit":
            plain = dataclasses.replace(bundle.card, case_calibration=None, component_max_uncertainty=None)
            if plain.reader is not None:  # the components of the raw segmentation, not those the reader kept
                plain = dataclasses.replace(plain, reader=dataclasses.replace(plain.reader, segmentation_min_lesion=None))
            val = on_validation(plain)
            threshold, threshold_table = choose_component_threshold(val["_components"])
            print(f"component filter: max mean uncertainty {threshold} (validation mean Dice by threshold: "
                  f"{ {k: round(v, 3) for k, v in threshold_table.items()} })")
        # 2. the case calibration is fitted on the opinions the filtered labelmap gives (fusion weights change)
        if reused is not None:
            val = reused
        elif args.component_filter == "bundle" or threshold is not None:
            val = on_validation(dataclasses.replace(bundle.card, case_calibration=None,
                                                    component_max_uncertainty=threshold))
        bundle = dataclasses.replace(bundle, card=dataclasses.replace(bundle.card, component_max_uncertainty=threshold))
        if args.reader_weight == "fit":
            pos = bundle.card.positive_class
            again = reader_merged_alphas(val["_rows"], bundle.card.reader.weight, pos, bundle.card.reader.fusion)
            if not np.allclose(again[:, pos] / again.sum(axis=1), val["_probs"], atol=1e-6):
                raise RuntimeError("the validation rows do not reproduce the predictor's reader fusion: "
                                   "reader_merged_alphas and Predictor have drifted apart")
            reader_fit, merged = fit_reader(val["_rows"], bundle.card, args.reader_fusion)
            val["_probs"] = merged[:, pos] / merged.sum(axis=1)
            bundle = dataclasses.replace(bundle, card=dataclasses.replace(bundle.card, reader=dataclasses.replace(
                bundle.card.reader, weight=reader_fit["weight"], fusion=reader_fit["fusion"])))
            for f, t in reader_fit["validation"].items():
                print(f"reader fusion {f!r}: validation NLL / ECE / AUC by weight: "
                      f"{ {k: (round(v['nll'], 4), round(v['ece'], 3), round(v['auc'], 4)) for k, v in t.items()} }")
            print(f"reader: fusion {reader_fit['fusion']!r}, weight {reader_fit['weight']}")
        calibration = fit_calibration(val["_probs"], val["_labels"], val["_rows"])
        slope, intercept = calibration["slope"], calibration["intercept"]
        # the review threshold is suggested from the opinions the predictor will give: calibrated (and with rule
        # "evidence", the strength the calibrated probability needs)
        pos = bundle.card.positive_class
        uncalibrated = merged if args.reader_weight == "fit" else row_alphas(val["_rows"], pos)
        final = calibrated_alphas(uncalibrated, val["_rows"], slope, intercept, pos,
                                  None if bundle.card.reader is None else bundle.card.reader.fusion)
        val["_u"] = 2.0 / final.sum(axis=1)
        val["_correct"] = ((final[:, pos] / final.sum(axis=1) >= 0.5) == val["_labels"].astype(bool)).astype(int)
        bundle = dataclasses.replace(bundle, card=dataclasses.replace(bundle.card, case_calibration=calibration))
        print(f"case calibration: slope {slope:.3f}, intercept {intercept:.3f} "
              f"(validation ECE before {calibration['validation_ece_before']:.3f})")
    predictor = Predictor(bundle, device=args.device, batch_size=16, precision=args.precision)
    compare = None if other is None else Predictor(other, device=args.device, precision=args.precision)
    first = args.test_seeds_from
    main_res = evaluate_cases(predictor, args.cases, args.shape, args.label_noise, 0.0, "phases", pixel_stats=True,
                              seed_base=first, workers=args.workers, compare=compare,
                              patches=None if kept is None else kept["test"])
    robustness = [{"sigma": 0.0, **{k: v for k, v in main_res.items() if not k.startswith("_")}}]
    for sigma in SIGMAS[1:]:
        r = evaluate_cases(predictor, args.robustness_cases, args.shape, args.label_noise, sigma, "phases", True,
                           seed_base=first, workers=args.workers)
        robustness.append({"sigma": sigma, **{k: v for k, v in r.items() if not k.startswith("_")}})
    modes = {}
    for mode in ("early", "subtraction"):
        r = evaluate_cases(predictor, args.mode_cases, args.shape, args.label_noise, 0.0, mode, False,
                           seed_base=first, workers=args.workers)
        modes[mode] = {k: v for k, v in r.items() if not k.startswith("_")}
    modes["phases"] = robustness[0]
    metrics.plot_reliability_diagram(main_res["_probs"], main_res["_labels"], path=str(args.out / "reliability.png"))
    summary = {k: v for k, v in main_res.items() if not k.startswith("_")}
    # the review threshold is a model setting: pick it on validation cases when there are some, not on the test set
    basis = val if args.calibrate_cases else main_res
    summary["suggested_review_uncertainty"] = suggest_review_uncertainty(basis["_u"], basis["_correct"])
    summary["suggested_review_uncertainty_from"] = "validation" if args.calibrate_cases else "test"
    if calibration is not None:
        summary["case_calibration"] = calibration
    summary["component_max_uncertainty"] = threshold
    summary["test_time_augmentation"] = bundle.card.test_time_augmentation
    summary["motion_correction"] = dataclasses.asdict(bundle.card.input.motion_correction)
    summary["segmentation_min_lesion"] = None if bundle.card.reader is None else bundle.card.reader.segmentation_min_lesion
    if threshold_table is not None:
        summary["component_filter_validation_dice"] = threshold_table
    if reader_fit is not None:
        summary["reader_weight"] = reader_fit
    if other is not None:
        theirs = compare_opinions(main_res["_rows"], other.card)
        for row, q in zip(main_res["_rows"], theirs.pop("probabilities")):
            row["compare_positive_probability"] = q
        summary["compare"] = {"model": {"id": other.card.id, "version": other.card.version, "sha256": other.sha256,
                                        "path": str(args.compare_model), "reader_fusion": other.card.reader.fusion,
                                        "reader_weight": other.card.reader.weight}, **theirs}
        print(f"compare {other.card.id} {other.card.version} on the same cases: "
              f"{ {k: round(v, 4) for k, v in summary['compare'].items() if k != 'model'} }")
    report = {
        "model": {"id": bundle.card.id, "version": bundle.card.version, "sha256": bundle.sha256},
        "command": "python training/evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": f"{args.cases} synthetic cases, seeds {first}..{first + args.cases - 1}, "
                   f"shape {tuple(args.shape)}, label noise {args.label_noise} (metrics vs reported labels unless "
                   "named *_clean_labels)",
        "summary": summary,
        "robustness": robustness,
        "input_modes": modes,
        "seconds": round(time.time() - t0, 1),
        "cases": main_res["_rows"],  # one row per test case (all three phases, no added noise)
    }
    if val is not None:  # the rows the calibration was fitted on (uncalibrated), e.g. to choose a reader weight
        report["validation_cases"] = val["_rows"]
        if validation_reader is not None:  # their positive_probability: this reader rule, uncalibrated
            report["validation_cases_reader"] = validation_reader
        if args.validation_from is not None:
            report["validation_cases_from"] = str(args.validation_from)
    if kept is not None:
        np.savez(args.out / "partial-reader-patches.npz",
                 **{f"{section}-{seed}": x for section, by_seed in kept.items() for seed, x in by_seed.items()})
        (args.out / "partial-reader-patches.npz").replace(args.out / READER_PATCHES_FILE)
        cfg = bundle.card.reader
        report["reader_patches"] = {
            "file": READER_PATCHES_FILE, "network_sha256": network_sha256(bundle.model),
            "reader_input": {k: getattr(cfg, k) for k in READER_INPUT_FIELDS},
            "cases": {section: len(by_seed) for section, by_seed in kept.items()}}
    (args.out / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    write_markdown(report, args.out / "report.md")
    print(json.dumps(json_safe(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
