"""Put a network that ``train.py`` fine-tuned from a bundle (``--init BUNDLE``) into a copy of that bundle.

The copy keeps the bundle's lesion reader, refiner, calibrations and thresholds: they were fitted on the previous
network, so the card's ``metrics`` are emptied and the new bundle must be measured (``evaluate.py``; its report then
goes in with ``add_reader.py --report``, which writes the measured metrics, or refit what the measurement says needs
refitting). The card's ``training`` becomes the fine-tuning run's record (as ``export.py`` writes it), with the
previous network's record under ``training.init``.

Example:
    python training/train.py --out runs/ft --init Resources/Models/uml-breast-dce-small --lr 2e-4 ...
    python training/replace_network.py --model Resources/Models/uml-breast-dce-small --run runs/ft \
        --weights last.safetensors --version 1.11.0 --out runs/v111
    python training/evaluate.py --model runs/v111 --out runs/v111/eval --cases 600 --robustness-cases 1 --mode-cases 1
    python training/add_reader.py --model runs/v111 --report runs/v111/eval/report.json --out runs/v111r
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file

from umlcore.bundle import load_bundle, save_bundle
from umlcore.config import UMLConfig
from umlcore.errors import BundleError

from export import training_record


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the bundle the run was initialised from")
    p.add_argument("--run", required=True, type=Path, help="the train.py output folder of the fine-tuning run")
    p.add_argument("--weights", default="last.safetensors", help="file in --run to take (default: last.safetensors)")
    p.add_argument("--version", required=True, help="the new bundle's version")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for needed in (args.weights, "model_config.json", "train_config.json"):
        if not (args.run / needed).is_file():
            p.error(f"{args.run / needed} is missing: give the --run folder that training/train.py wrote")
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists: add --overwrite to replace it, or choose another --out folder")
    try:
        bundle = load_bundle(args.model)
    except BundleError as err:
        p.error(str(err))
    arch = UMLConfig.from_json((args.run / "model_config.json").read_text())
    if arch != bundle.card.architecture:
        p.error(f"{args.run} trained another architecture ({arch}) than {args.model}'s "
                f"({bundle.card.architecture}): fine-tune with train.py --init {args.model} and the bundle's "
                "--preset, --cls-pool and --context-slices, or export a new bundle with export.py")
    model = bundle.model
    try:
        model.load_state_dict(load_file(str(args.run / args.weights)))
    except RuntimeError as err:
        p.error(f"{args.run / args.weights} does not fit {args.model}'s network: {err}")
    training = {**training_record(args.run, args.weights), "init": bundle.card.training}
    card = dataclasses.replace(bundle.card, version=args.version, training=training, metrics={})
    path = save_bundle(model, card, args.out, overwrite=args.overwrite, reader=bundle.reader, refiner=bundle.refiner)
    new = load_bundle(path)  # verify what we wrote
    kept = [name for name, value in (("case_calibration", card.case_calibration),
                                     ("single_volume_calibration", card.single_volume_calibration),
                                     ("reader", card.reader), ("refiner", card.refiner)) if value is not None]
    print(f"wrote {path} (version {args.version}, sha256 {new.sha256[:12]}...); kept from {bundle.card.version}, "
          f"fitted on its network: {', '.join(kept) or 'nothing'}, review_uncertainty; metrics emptied: measure "
          "this bundle with evaluate.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
