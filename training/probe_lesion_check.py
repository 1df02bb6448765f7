"""Which of the network's segmented components should the labelmap keep? A CPU study of the reader's check.

For every connected component of a bundle's *unfiltered* segmentation (6-connected, as the predictor labels them)
of synthetic multi-phase cases, this records its size, its mean voxel uncertainty (what the card's
``component_max_uncertainty`` filter judges), its overlap with the true lesion mask, and its lesion reader's three
probabilities (the bundle's reader, its test-time augmentation, patches cut on the predictor's axial slices). It
then prints, per rule choosing components, the mean lesion Dice (cases with a lesion; components are disjoint,
so the Dice of any choice follows from these numbers) and the share of lesion-free cases left with a component:

- every component; the uncertainty filter (the card's threshold);
- the reader's check, card field ``reader.segmentation_min_lesion``: of the ``--max-components`` largest, those
  whose ``lesion`` probability is at least ``t``, for each ``t`` of ``--thresholds``;
- the true components (an oracle: the ceiling of any choice among the network's components).

With ``--report`` (an ``evaluate.py`` report of the same bundle whose ``cases`` or ``validation_cases`` rows hold
these seeds) it also asks what the case opinion would be if the reader read the 3 largest components of the
*checked* labelmap instead of those the uncertainty filter leaves: the card's stacked rule, as fitted, on the
network's opinion of each row (unchanged: its slice weights come from the filtered labelmap) and the most
suspicious of those components; AUC, NLL and ECE per threshold, beside the card's own reading (which reproduces
the report's probabilities). ``--fit-report`` writes those cases' rows for that reading (the card's
``reader.segmentation_min_lesion``, or ``--fit-threshold``) as an ``evaluate.py``-style report that
``fit_reader_fusion.py --fusion stacked`` takes, for a card whose ``reader.opinion_reads`` is ``"checked"``;
``--from-rows`` reuses an earlier ``--out`` instead of running the network again.

Example (CPU, 2 cores: about 4 s per case and worker):
    python training/probe_lesion_check.py --model Resources/Models/uml-breast-dce-small --seed-from 1000000 \
        --cases 300 --workers 2 --out runs/seg/val.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from umlcore import metrics
from umlcore.bundle import load_bundle
from umlcore.errors import BundleError
from umlcore.fusion import stack_reader_opinion
from umlcore.predictor import Predictor
from umlcore.preprocess import inplane_axes, normalize, slice_axis_index, to_slices
from umlcore.reader import cut_patch, largest_components, most_suspicious, read_patches, suspicion
from umlcore.synthetic import generate_case

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_features import _auc  # noqa: E402
from slices import phases_as_read  # noqa: E402
from workers import ordered_map  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
_PREDICTORS: dict[str, Predictor] = {}  # one per worker process and model


def _predictor(model: str) -> Predictor:
    if model not in _PREDICTORS:
        torch.set_num_threads(1)
        bundle = load_bundle(model)
        predictor = Predictor(bundle, device="cpu")
        # the raw segmentation: no uncertainty filter, no check, no reading for the opinion (not needed here)
        predictor.card = dataclasses.replace(bundle.card, component_max_uncertainty=None, reader=None)
        _PREDICTORS[model] = predictor
    return _PREDICTORS[model]


def probe_case(job: tuple[str, int, tuple[int, int, int]]) -> dict:
    """One case's row: its truth and, per component of the unfiltered segmentation, what the rules judge."""
    model, seed, shape = job
    predictor = _predictor(model)
    bundle = predictor.bundle
    cfg = bundle.card.reader
    case = generate_case(seed, shape=shape, label_noise=0.02)
    images = case.to_sitk()
    pred = predictor.predict(images)
    axis = slice_axis_index(images[0].GetDirection(), bundle.card.input.slicing_axis)
    labels = to_slices(sitk.GetArrayFromImage(pred.labelmap), axis)
    unc = to_slices(sitk.GetArrayFromImage(pred.uncertainty), axis)
    truth = to_slices(case.mask, axis) > 0
    phases = phases_as_read(case, bundle.card.input, pred.summary).phases  # as the predictor read them
    stack = np.stack([to_slices(normalize(p, bundle.card.input.normalization), axis)
                      for p in phases])  # (C, S, H, W), as the predictor cuts its patches
    w_axis, h_axis = inplane_axes(axis)
    spacing = images[0].GetSpacing()
    components, found = largest_components(labels, int(labels.size))
    rows = []
    if found:
        patches = np.stack([cut_patch(stack, z, y, x, (spacing[h_axis], spacing[w_axis]), cfg.patch_size,
                                      cfg.context_slices, cfg.pixel_mm) for _, _, z, y, x in found])
        p = read_patches(bundle.reader, torch.from_numpy(patches), cfg.test_time_augmentation).numpy()
        n = int(components.max()) + 1
        inside = np.bincount(components.ravel(), weights=truth.ravel().astype(np.float64), minlength=n)
        u_sum = np.bincount(components.ravel(), weights=unc.ravel().astype(np.float64), minlength=n)
        for (cid, voxels, *_), q in zip(found, p):
            rows.append({"voxels": voxels, "inside": float(inside[cid]), "mean_uncertainty": float(u_sum[cid] / voxels),
                         "p": [float(v) for v in q]})
    return {"seed": seed, "truth_voxels": int(truth.sum()), "components": rows}  # components largest first


def mean_dice(cases: list[dict], keep: Callable[[int, dict], bool]) -> Optional[float]:
    """Mean Dice over the cases with a lesion of the labelmap of the components ``keep(rank, component)`` keeps
    (``None`` without such cases)."""
    dices = []
    for c in cases:
        if c["truth_voxels"]:
            kept = [k for i, k in enumerate(c["components"]) if keep(i, k)]
            dices.append(2 * sum(k["inside"] for k in kept) / (sum(k["voxels"] for k in kept) + c["truth_voxels"]))
    return float(np.mean(dices)) if dices else None


def lesion_free_with_component(cases: list[dict], keep: Callable[[int, dict], bool]) -> Optional[float]:
    """The share of lesion-free cases where ``keep`` leaves a component (``None`` without such cases)."""
    free = [any(keep(i, k) for i, k in enumerate(c["components"])) for c in cases if not c["truth_voxels"]]
    return float(np.mean(free)) if free else None


def rules(card_threshold: Optional[float], thresholds: tuple[float, ...],
          max_components: int) -> dict[str, Callable[[int, dict], bool]]:
    """The component choices compared, by name."""
    out: dict[str, Callable[[int, dict], bool]] = {"every component": lambda i, k: True}
    if card_threshold is not None:
        out[f"mean uncertainty <= {card_threshold:g} (the card's filter)"] = \
            lambda i, k: k["mean_uncertainty"] <= card_threshold
    for t in thresholds:
        out[f"reader lesion >= {t:g}, {max_components} largest"] = \
            lambda i, k, t=t: i < max_components and k["p"][0] >= t
    out["the true components (oracle)"] = lambda i, k: k["inside"] > 0
    return out


def table(cases: list[dict], card_threshold: Optional[float], thresholds: tuple[float, ...],
          max_components: int) -> list[dict]:
    return [{"rule": name, "dice_mean": mean_dice(cases, keep), "lesion_free_with_component":
             lesion_free_with_component(cases, keep)}
            for name, keep in rules(card_threshold, thresholds, max_components).items()]


def separation(cases: list[dict]) -> dict:
    """AUC of the reader's ``lesion`` output and of minus the mean uncertainty, true (over half inside the truth)
    against false (nothing inside) components."""
    true = [k for c in cases for k in c["components"] if k["inside"] > 0.5 * k["voxels"]]
    false = [k for c in cases for k in c["components"] if k["inside"] == 0]
    y = np.array([1] * len(true) + [0] * len(false))
    both = true + false
    return {"true_components": len(true), "false_components": len(false),
            "auc_reader_lesion": _auc(np.array([k["p"][0] for k in both]), y),
            "auc_minus_mean_uncertainty": _auc(np.array([-k["mean_uncertainty"] for k in both]), y)}


def opinions(cases: list[dict], report_rows: dict[int, dict], card, keep: Callable[[int, dict], bool],
             read: int = 3) -> np.ndarray:
    """The stacked case probability of each case if the reader read the ``read`` largest components ``keep`` keeps.

    Args:
        cases: :func:`probe_case` rows.
        report_rows: ``evaluate.py`` rows by seed (their ``network_positive_probability``, ``network_uncertainty``).
        card: A card with the reader rule ``"stacked"``.
        keep: The labelmap's rule, as in :func:`rules`.
    """
    out = []
    for c in cases:
        row = report_rows[c["seed"]]
        p, strength = row["network_positive_probability"], 2.0 / row["network_uncertainty"]
        alpha = np.maximum(np.array([strength * (1 - p), strength * p]), 1.0)  # 1 - p may round below 1 / S
        kept = [k for i, k in enumerate(c["components"]) if keep(i, k)][:read]
        top = most_suspicious(np.array([k["p"] for k in kept])) if kept else None
        a = stack_reader_opinion(alpha, top, card.reader.stacking, card.positive_class)
        out.append(a[card.positive_class] / a.sum())
    return np.array(out)


def opinion_table(cases: list[dict], report_rows: dict[int, dict], card, thresholds: tuple[float, ...],
                  max_components: int) -> list[dict]:
    """AUC, NLL and ECE of :func:`opinions` for the card's own reading and each threshold's checked labelmap."""
    y = np.array([report_rows[c["seed"]]["label"] for c in cases])
    choices = {"the card's (after its uncertainty filter)": lambda i, k: (
        card.component_max_uncertainty is None or k["mean_uncertainty"] <= card.component_max_uncertainty)}
    for t in thresholds:
        choices[f"the checked labelmap, reader lesion >= {t:g}"] = \
            lambda i, k, t=t: i < max_components and k["p"][0] >= t
    rows = []
    for name, keep in choices.items():
        p = opinions(cases, report_rows, card, keep, card.reader.max_components)
        probs = np.stack([1 - p, p], axis=1)
        rows.append({"opinion_reads": name, "auc": metrics.roc_auc(p, y), "nll": metrics.nll(probs, y),
                     "ece": metrics.expected_calibration_error(probs, y)})
    return rows


def fit_rows(cases: list[dict], report: dict, card, threshold: float, max_components: int) -> dict:
    """An ``evaluate.py``-style report of ``cases`` whose reader fields are those of the opinion reading the labelmap
    checked at ``threshold`` (the card's ``max_components`` largest of the ``max_components`` largest components
    kept), for ``fit_reader_fusion.py``. Each case keeps its section of ``report`` (``validation_cases`` or
    ``cases``) and the network's opinion and labels of its row there."""
    sections = {r["seed"]: key for key in ("validation_cases", "cases") for r in report.get(key) or []}
    rows = {r["seed"]: r for key in ("validation_cases", "cases") for r in report.get(key) or []}
    out: dict = {"dataset": report.get("dataset"),
                 "summary": {"component_max_uncertainty": card.component_max_uncertainty,
                             "segmentation_min_lesion": threshold},
                 "validation_cases": [], "cases": []}
    for c in cases:
        row = rows[c["seed"]]
        kept = [k for i, k in enumerate(c["components"]) if i < max_components and k["p"][0] >= threshold]
        kept = kept[:card.reader.max_components]
        top = [float(v) for v in most_suspicious(np.array([k["p"] for k in kept]))] if kept else None
        out[sections[c["seed"]]].append({
            **{k: row[k] for k in ("seed", "label", "clean_label", "network_positive_probability", "network_uncertainty")},
            "reader_score": None if top is None else float(suspicion(np.array(top))),
            "reader_probabilities": top})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a bundle folder with a lesion reader")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed-from", type=int, default=1_000_000, help="first seed (validation seeds by default)")
    p.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    p.add_argument("--max-components", type=int, default=8, help="the reader's check reads this many largest")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the per-case rows and the table here (JSON)")
    p.add_argument("--report", type=Path, help="evaluate.py report.json holding these seeds: the opinion what-if")
    p.add_argument("--from-rows", type=Path, help="take the cases from this earlier --out instead of running the "
                                                  "network (--cases, --seed-from, --shape, --workers then unused)")
    p.add_argument("--fit-report", type=Path,
                   help="with --report: write the case rows of the opinion reading the checked labelmap (threshold "
                        "--fit-threshold) as an evaluate.py-style report, for fit_reader_fusion.py")
    p.add_argument("--fit-threshold", type=float, help="default: the card's reader.segmentation_min_lesion")
    args = p.parse_args(argv)
    if args.cases < 1 or args.max_components < 1:
        p.error("--cases and --max-components must be at least 1")
    if not all(0 < t < 1 for t in args.thresholds):
        p.error("--thresholds are probabilities in (0, 1)")
    if args.fit_report is not None and args.report is None:
        p.error("--fit-report needs --report (the network's opinion of each case comes from its rows)")
    try:
        bundle = load_bundle(args.model)
    except BundleError as err:
        p.error(str(err))
    if bundle.reader is None:
        p.error(f"{args.model} has no lesion reader: the check needs one (training/add_reader.py)")
    fit_threshold = args.fit_threshold if args.fit_threshold is not None else bundle.card.reader.segmentation_min_lesion
    if args.fit_report is not None and (fit_threshold is None or not 0 < fit_threshold < 1):
        p.error("--fit-report: give --fit-threshold in (0, 1) (the card has no reader.segmentation_min_lesion)")
    model = str(Path(args.model).resolve())
    if args.from_rows is not None:
        try:
            saved = json.loads(args.from_rows.read_text())
            cases = saved["cases"]
        except (OSError, ValueError, KeyError) as err:
            p.error(f"--from-rows {args.from_rows}: not an --out of this script ({err})")
        if saved.get("sha256", bundle.sha256) != bundle.sha256:
            p.error(f"--from-rows {args.from_rows} was measured with other weights: use its model or run again")
    else:
        jobs = [(model, s, tuple(args.shape)) for s in range(args.seed_from, args.seed_from + args.cases)]
        cases = list(ordered_map(probe_case, jobs, args.workers))
    seeds = [c["seed"] for c in cases]
    report, report_rows = None, None
    if args.report is not None:
        if bundle.card.reader.fusion != "stacked":
            p.error(f"--report: the what-if applies the reader rule 'stacked'; {args.model} has "
                    f"{bundle.card.reader.fusion!r}")
        if not args.report.is_file():
            p.error(f"--report {args.report}: no such file")
        report = json.loads(args.report.read_text())
        report_rows = {r["seed"]: r for key in ("validation_cases", "cases") for r in report.get(key) or []}
        missing = [s for s in seeds if s not in report_rows]
        if missing:
            p.error(f"--report {args.report} has no rows for {len(missing)} of these seeds (first {missing[0]}): "
                    "give the evaluate.py report of these cases")
    rows = table(cases, bundle.card.component_max_uncertainty, tuple(args.thresholds), args.max_components)
    sep = separation(cases)
    print(f"{len(cases)} cases (seeds {min(seeds)}..{max(seeds)}), {sum(c['truth_voxels'] > 0 for c in cases)} "
          "with a lesion")

    def fmt(v: Optional[float], spec: str) -> str:
        return "-" if v is None or np.isnan(v) else format(v, spec)

    print(f"true / false components {sep['true_components']} / {sep['false_components']}: AUC reader lesion "
          f"{fmt(sep['auc_reader_lesion'], '.3f')}, minus mean uncertainty {fmt(sep['auc_minus_mean_uncertainty'], '.3f')}")
    print(f"{'labelmap keeps':55s} {'mean Dice':>9s} {'lesion-free with a component':>29s}")
    for r in rows:
        print(f"{r['rule']:55s} {fmt(r['dice_mean'], '.4f'):>9s} {fmt(r['lesion_free_with_component'], '.2f'):>29s}")
    what_if = None
    if report_rows is not None:
        what_if = opinion_table(cases, report_rows, bundle.card, tuple(args.thresholds), args.max_components)
        print(f"\n{'the case opinion reads the ' + str(bundle.card.reader.max_components) + ' largest of':55s} "
              f"{'AUC':>7s} {'NLL':>7s} {'ECE':>7s}")
        for r in what_if:
            print(f"{r['opinion_reads']:55s} {fmt(r['auc'], '.4f'):>7s} {fmt(r['nll'], '.4f'):>7s} {fmt(r['ece'], '.4f'):>7s}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": model, "sha256": bundle.sha256, "command": " ".join(sys.argv),
                                        "table": rows, "separation": sep, "opinion_what_if": what_if,
                                        "cases": cases}, indent=1))
    if args.fit_report is not None:
        fit = fit_rows(cases, report, bundle.card, fit_threshold, args.max_components)
        fit.update(model={"id": bundle.card.id, "version": bundle.card.version, "sha256": bundle.sha256,
                          "path": model}, command=" ".join(sys.argv))
        args.fit_report.parent.mkdir(parents=True, exist_ok=True)
        args.fit_report.write_text(json.dumps(fit, indent=1))
        print(f"wrote {args.fit_report}: {sum(len(fit[k]) for k in ('validation_cases', 'cases'))} case rows of the "
              f"opinion reading the labelmap checked at {fit_threshold:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
