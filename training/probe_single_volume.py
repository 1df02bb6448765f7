"""What does a bundle find in one volume, and could its lesion reader read what it finds? A CPU measurement.

The reader is not used on one volume (it was trained on patches of all phases). Before training one for single
volumes, this asks two questions on validation cases, for every single-volume input of ``evaluate.py`` (``pre``,
``early``, ``late``, ``subtraction``) beside all three phases:

1. **Does the segmentation find the lesion?** Dice per case, the share of lesion cases with any predicted
   component, and the share of lesion-free cases with one (a false lesion the reader would read).
2. **Does the bundle's reader read anything from one volume?** The predictor runs as usual, and its reader is also
   run on the components it found, as if every channel had its own volume (the replicated volume's patches): the
   AUC of the case score (the most suspicious component, the label rule), and of the spiculated and washout
   outputs on the lesion cases it read, against the truth.

Prints a table and writes the per-case rows to ``--out`` (JSON).

Example (CPU, 2 cores: about 25 s per case for the five inputs):
    python training/probe_single_volume.py --model Resources/Models/uml-breast-dce-small --cases 40 \
        --seed-from 1200000 --out runs/svprobe/rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from umlcore import metrics
from umlcore.bundle import load_bundle
from umlcore.errors import BundleError
from umlcore.predictor import Predictor
from umlcore.reader import suspicion
from umlcore.synthetic import generate_case

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import SINGLE_VOLUME_MODES, input_views  # noqa: E402
from probe_features import _auc, phenotype  # noqa: E402

INPUTS = (*SINGLE_VOLUME_MODES, "phases")


def probe_case(predictor: Predictor, seed: int, shape: tuple[int, int, int], modes: tuple[str, ...]) -> list[dict]:
    """One row per input mode of the case of ``seed``: Dice, what was found, the network's and the reader's view."""
    case = generate_case(seed, shape=shape, label_noise=0.02)
    images, truth = case.to_sitk(), case.mask > 0  # as evaluate.py: Dice of label 1 where the case has a lesion
    spic, wash = phenotype(case)
    own = predictor._read_lesions
    readings: list = []

    def read_as_phases(stack, labels, spacing_hw, single_volume):  # the reader on every input, as if all phases
        readings.append(own(stack, labels, spacing_hw, False))
        return own(stack, labels, spacing_hw, single_volume)

    predictor._read_lesions = read_as_phases
    rows = []
    try:
        for mode in modes:
            readings.clear()
            pred = predictor.predict(input_views(images, mode), case_id=f"synthetic-{seed}")
            dice = metrics.dice(sitk.GetArrayFromImage(pred.labelmap), case.mask) if truth.any() else None
            reading = readings[0]
            rows.append({"seed": seed, "mode": mode, "label": int(case.label), "lesion": int(truth.any()),
                         "spiculated": spic, "washout": wash, "dice": dice,
                         "network_p": float(pred.summary["classification"]["positive_probability"]),
                         "components": len(reading["components"]) if reading else 0,
                         "reader_p": reading["p"].tolist() if reading else []})
    finally:
        predictor._read_lesions = own
    return rows


def summarise(rows: list[dict], modes: tuple[str, ...]) -> list[dict]:
    """Per input mode: Dice, found rates, and the AUCs of the network and of the reader (see the module doc)."""
    out = []
    for mode in modes:
        r = [x for x in rows if x["mode"] == mode]
        y = np.array([x["label"] for x in r])
        dice = np.array([x["dice"] for x in r if x["dice"] is not None])
        score = np.array([float(suspicion(np.array(x["reader_p"])).max()) if x["reader_p"] else 0.0 for x in r])
        read = [x for x in r if x["lesion"] and x["reader_p"]]
        top = [np.array(x["reader_p"]).max(axis=0) for x in read]
        lesion_cases = [x for x in r if x["lesion"]]
        free = [x for x in r if not x["lesion"]]
        out.append({
            "input": mode, "cases": len(r),
            "dice_mean": round(float(dice.mean()), 3) if dice.size else None,
            "lesion_cases_found": round(float(np.mean([x["components"] > 0 for x in lesion_cases])), 3)
            if lesion_cases else None,
            "lesion_free_with_a_component": round(float(np.mean([x["components"] > 0 for x in free])), 3) if free else None,
            "auc_network": _auc(np.array([x["network_p"] for x in r]), y),
            "auc_reader_score": _auc(score, y),
            "lesion_cases_read": len(read),
            "auc_spiculated_read": _auc(np.array([t[1] for t in top]), np.array([x["spiculated"] for x in read])),
            "auc_washout_read": _auc(np.array([t[2] for t in top]), np.array([x["washout"] for x in read])),
        })
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle folder / zip with a lesion reader")
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--seed-from", type=int, default=1_200_000, help="first seed (validation seeds: 1,000,000 on)")
    p.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256))
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    p.add_argument("--out", type=Path, help="JSON file for the per-case rows and the table")
    args = p.parse_args(argv)
    if args.cases < 1:
        p.error(f"--cases must be at least 1, got {args.cases}")
    try:
        bundle = load_bundle(args.model)
    except BundleError as err:
        p.error(str(err))
    if bundle.reader is None:
        p.error(f"{args.model} has no lesion reader (training/add_reader.py adds one)")
    predictor = Predictor(bundle, device="cpu", batch_size=8)
    modes = tuple(args.inputs)
    rows = []
    for seed in range(args.seed_from, args.seed_from + args.cases):
        rows += probe_case(predictor, seed, tuple(args.shape), modes)
        print(f"case {seed - args.seed_from + 1}/{args.cases}", flush=True)
    table = summarise(rows, modes)
    header = list(table[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for t in table:
        print("| " + " | ".join("-" if t[k] is None else str(t[k]) for k in header) + " |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": {"id": bundle.card.id, "version": bundle.card.version},
                                        "command": "python training/probe_single_volume.py " +
                                                   " ".join(sys.argv[1:] if argv is None else argv),
                                        "table": table, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
