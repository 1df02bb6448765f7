"""Put a lesion refiner trained by ``train_refiner.py`` into a model bundle, then its measured metrics.

1. ``--refiner DIR``: ``DIR/refiner.safetensors`` become the ``refiner.*`` tensors of the new bundle's
   ``model.safetensors`` and ``DIR/refiner.json`` the card's ``refiner`` (:class:`~umlcore.refiner.RefinerConfig`,
   with its training record); the network, the reader and everything else are copied. The refiner redraws the
   labelmap after the case opinion was read, so the opinion, its calibration and the review threshold stand.
2. ``--report``: an ``evaluate.py`` report of that bundle supplies the card's measured test metrics (its
   single-volume entry stays: the refiner does not redraw single volumes).

Example:
    python training/add_refiner.py --model Resources/Models/uml-breast-dce-small --refiner runs/refiner \
        --version 1.11.0 --out runs/v111
    python training/evaluate.py --model runs/v111 --out runs/v111/eval --cases 600 --test-seeds-from 2007800 \
        --robustness-cases 1 --mode-cases 1 --workers 2
    python training/add_refiner.py --model runs/v111 --report runs/v111/eval/report.json \
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

from umlcore.bundle import load_bundle, save_bundle
from umlcore.errors import BundleError
from umlcore.refiner import LesionRefiner, RefinerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from add_reader import card_metrics, insert_sentence, read_report, with_measured_rule  # noqa: E402

REFINER_SENTENCE = "For multi-phase inputs a lesion refiner (a small 3D network) redraws the smaller segmented lesions."


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the bundle to start from")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--refiner", type=Path, help="step 1: the train_refiner.py output folder")
    p.add_argument("--report", type=Path, help="step 2: evaluate.py report of --model: the card's metrics")
    p.add_argument("--version", help="the new bundle's version (default: --model's)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if (args.refiner is None) == (args.report is None):
        p.error("give --refiner (step 1: add a refiner) or --report (step 2: its measured metrics), one of them")
    files = ([args.refiner / "refiner.safetensors", args.refiner / "refiner.json"] if args.refiner else [args.report])
    for path in files:
        if not path.is_file():
            p.error(f"{path}: no such file" + (" (train_refiner.py writes it)" if args.refiner else ""))
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists: add --overwrite to replace it, or choose another --out folder")
    try:
        bundle = load_bundle(args.model)
    except BundleError as err:
        p.error(str(err))
    card, refiner = bundle.card, bundle.refiner
    if args.refiner is not None:
        if card.architecture.num_seg_labels != 2:
            p.error(f"{args.model} has {card.architecture.num_seg_labels - 1} segments: the refiner draws one")
        try:
            config = RefinerConfig(**json.loads((args.refiner / "refiner.json").read_text()))
        except (BundleError, TypeError, json.JSONDecodeError) as err:
            p.error(f"{args.refiner / 'refiner.json'} is not a refiner section: {err}")
        refiner = LesionRefiner(len(card.input.channels) + 2, config.width)
        try:
            refiner.load_state_dict(load_file(str(args.refiner / "refiner.safetensors")))
        except Exception as err:  # another width or channel count, or not a refiner at all
            p.error(f"{args.refiner / 'refiner.safetensors'} does not fit a refiner of width {config.width} for "
                    f"{len(card.input.channels)} channels: {err}")
        description = card.description
        if REFINER_SENTENCE not in description:
            description = insert_sentence(description, REFINER_SENTENCE)
        card = dataclasses.replace(card, refiner=config, description=description)
    else:
        if refiner is None:
            p.error(f"{args.model} has no refiner: run step 1 (--refiner) first")
        report = read_report(args.report, bundle, args.model, p.error)
        summary = dict(report.get("summary", {}))
        if "case_calibration" in summary:
            p.error(f"{args.report} refitted a case calibration (--calibrate-cases): the refiner does not change the "
                    "opinion, so measure the card's calibration as it is (a test-only report)")
        for key in ("component_max_uncertainty", "segmentation_min_lesion", "reader_weight"):
            summary.pop(key, None)
        card = with_measured_rule(card, summary)
        card = dataclasses.replace(card, metrics=card_metrics(report, summary, card))
    if args.version:
        card = dataclasses.replace(card, version=args.version)
    path = save_bundle(bundle.model, card, args.out, overwrite=args.overwrite, reader=bundle.reader, refiner=refiner)
    print(f"wrote {path} (version {card.version}, sha256 {load_bundle(path).sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
