"""Assemble a model bundle: a network run, optionally a lesion reader run, on a new card or an existing bundle's.

Examples (from the repository root):
    python -m training.export --run runs/small --out runs/small-bundle                    # a new card for a network
    python -m training.export --base B --run runs/ft --weights last.safetensors --out B2  # B with a new network
    python -m training.export --base B --reader runs/reader --out B2                      # B with a lesion reader
    python -m training.export --base B --report runs/test/report.json --out B2            # B with measured figures
    python -m training.export --base B --motion-correction early --out B2                 # B aligning its phases

The network comes from ``--run`` (a ``python -m training.train`` folder) or from ``--base``; the card from
``--base`` or, without it, a new synthetic breast DCE-MRI card. A new network on a base card keeps the base's
reader, thresholds and calibrations (they were fitted on the previous network: measure, then refit what the
measurement says needs it) and empties its metrics; its ``training`` record becomes the run's, with the previous
network's under ``training.init``. A new reader starts with its rule unfitted (``python -m training.fit opinion``)
and the base's check settings (or the defaults); until its rule is fitted, the case opinion stays the network's.
``--report`` writes an evaluation's figures into the card's ``metrics`` (the three-phase figures, and those of
single-volume inputs under ``metrics.single_volume``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from umlcore.bundle import ModelBundle, load_bundle, save_bundle
from umlcore.card import MODALITIES, InputSpec, ModelCard, MotionCorrection, ReaderConfig
from umlcore.config import UMLConfig
from umlcore.errors import UMLInputError
from umlcore.network import UMLNet
from umlcore.reader import LesionReader

from .config import Parser, read_json, run_tool
from .data import SYNTHETIC_INFO, DatasetInfo
from .evaluate import json_safe

__all__ = ["training_record", "run_dataset", "new_card", "save_with_card", "with_version", "main"]

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_dataset(run: Path) -> DatasetInfo:
    """What a ``python -m training.train`` run trained on (``dataset.json``; a run older than it: synthetic)."""
    path = run / "dataset.json"
    return DatasetInfo.from_json(path.read_text()) if path.exists() else SYNTHETIC_INFO


def _data_text(cfg: dict, info: DatasetInfo) -> str:
    if info.data == "synthetic":
        return (f"synthetic breast DCE-MRI (umlcore.synthetic), training seeds [{cfg['seed_base']}, "
                f"{cfg['seed_base'] + cfg['train_cases']}), {cfg['val_cases']} validation cases, label noise "
                f"{cfg['label_noise']}")
    counts = ", ".join(f"{n} {part}" for part, n in info.cases.items())
    return f"{info.name} ({info.data}): {counts} cases (split sha256 {info.split_sha256})"


def training_record(run: Path, weights: str) -> dict:
    """The card's ``training`` entry for ``weights`` of a ``python -m training.train`` folder: the data (and its
    split's SHA-256), the settings, the command (and every invocation, resumes included), the epochs and the git
    commit."""
    cfg = json.loads((run / "train_config.json").read_text())
    info = run_dataset(run)
    state = json.loads((run / "last.json").read_text()) if (run / "last.json").exists() else {}
    flags = " ".join(f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else shlex.quote(str(v)))
                     for k, v in cfg.items())
    split = {"split_sha256": info.split_sha256} if info.split_sha256 else {}
    return json_safe({"data": _data_text(cfg, info), **split,
            "seed": cfg["seed"], "epochs_planned": cfg["epochs"], "epochs_completed": state.get("epoch"),
            "weights": weights, "best_epoch": state.get("best_epoch"), "best_validation": state.get("best_metrics"),
            "commit": git_commit(), "command": f"python -m training.train {flags}",
            "invocations": (run / "commands.txt").read_text().splitlines() if (run / "commands.txt").exists() else [],
            "config": cfg})  # a tiny validation set can leave a figure undefined (NaN): null in the card


#: What made each dataset kind's images (card ``input.modality``, ``input.body_region``): the engine checks inputs
#: against it. A ``folder`` dataset's is unknown (declare nothing).
_MADE_BY = {"synthetic": ("MR", "breast"), "ispy1": ("MR", "breast"), "refuge": ("photo", "eye fundus"),
            "isic2017": ("photo", "skin")}


def new_card(architecture: UMLConfig, model_id: str, version: str, cfg: dict, info: DatasetInfo) -> ModelCard:
    """A card for a network trained on ``info``'s data with the run settings ``cfg``."""
    context, preset = int(cfg.get("context_slices", 0)), cfg.get("preset", "small")
    replicate = float(cfg.get("single_volume_prob", 0)) > 0 or len(info.channels) == 1
    kind = info.data.split(":")[0]
    modality, region = _MADE_BY.get(kind, (None, None))
    spec = InputSpec(kind=info.input_kind, channels=info.channels, min_channels=1 if replicate else len(info.channels),
                     context_slices=context, target_size=tuple(cfg.get("target_size") or ()) or None,
                     modality=modality, body_region=region)
    if info.data == "synthetic":
        return ModelCard(
            id=model_id, version=version, task="breast-dce-mri-lesion",
            name=f"UML breast DCE-MRI lesion segmentation + suspicion ({preset}{', 2.5D' if context else ''})",
            description=("Uncertainty-informed Mutual Learning network trained on synthetic breast DCE-MRI. Input: one "
                         "DCE-MRI volume (any phase or a subtraction image; replicated into the three channels) or the "
                         "pre-contrast, early and late post-contrast phases. Output: lesion segmentation, per-voxel "
                         "evidential uncertainty, and a case-level suspicion opinion. Research use only; not for "
                         "diagnosis."),
            classes=info.classes, segments=info.segments, input=spec, architecture=architecture)
    segments = ", ".join(s.name.lower() for s in info.segments)
    what = "picture" if info.input_kind == "picture" else "volume"
    return ModelCard(
        id=model_id, version=version, task=info.data.split(":")[0], architecture=architecture, input=spec,
        name=f"UML {info.name}: {segments} segmentation + {' / '.join(info.classes)} ({preset})",
        description=(f"Uncertainty-informed Mutual Learning network trained on {info.name}. Input: one {what} "
                     f"({', '.join(info.channels)}). Output: {segments} segmentation, per-pixel evidential uncertainty "
                     f"and a case-level opinion ({' / '.join(info.classes)}). Research use only; not for diagnosis."),
        classes=info.classes, segments=info.segments, positive_class=len(info.classes) - 1)


def save_with_card(bundle: ModelBundle, card: ModelCard, out: Path, overwrite: bool) -> Path:
    """``bundle``'s networks with ``card`` as a new bundle at ``out`` (verified by loading it back)."""
    path = save_bundle(bundle.model, card, out, overwrite=overwrite, reader=bundle.reader)
    load_bundle(path)
    return path


def with_version(card: ModelCard, version: Optional[str], changelog: Optional[str]) -> ModelCard:
    """``card`` with a new version and its changelog line first (``None``: unchanged)."""
    if version is not None:
        card = dataclasses.replace(card, version=version)
    if changelog:
        card = dataclasses.replace(card, changelog={card.version: changelog,
                                                     **{k: v for k, v in card.changelog.items() if k != card.version}})
    return card


def report_metrics(card: ModelCard, report: dict) -> dict:
    """``card.metrics`` with an evaluation report's figures: a dataset's clean cases or the synthetic three-phase ones
    at the top level (their test set and command with them), and those of single-volume inputs under
    ``single_volume``."""
    figures, where = report["figures"], {"test_set": report["dataset"], "command": report["command"]}
    out = dict(card.metrics)
    if "clean" in figures:  # a dataset's report: its cases without added noise
        out = {**where, **figures["clean"]}
    if "phases" in figures:
        out = {**where, **figures["phases"], **({"single_volume": out["single_volume"]} if "single_volume" in out else {})}
    single = {k: v for k, v in figures.items() if k in ("pre", "early", "late", "subtraction")}
    if single:
        out["single_volume"] = {**where, **single}
    return out


def _load_state(net: torch.nn.Module, path: Path, what: str) -> None:
    """``net``'s weights from ``path``, refused with one line where they do not fit."""
    try:
        net.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UMLInputError(f"{path} does not hold the weights of this {what} ({first}): give the run's own file") from None


def _network(args, base: Optional[ModelBundle]) -> tuple[UMLNet, Optional[dict]]:
    """The network (from ``--run`` or the base) and, for a run, its training record."""
    if args.run is None:
        return base.model, None
    for needed in (args.weights, "model_config.json", "train_config.json"):
        if not (args.run / needed).is_file():
            raise UMLInputError(f"{args.run / needed} is missing: give the --run folder that python -m training.train wrote")
    model = UMLNet(UMLConfig.from_json((args.run / "model_config.json").read_text()))
    _load_state(model, args.run / args.weights, "run's network")
    return model, training_record(args.run, args.weights)


def _reader(args, base: Optional[ModelBundle], card: ModelCard) -> tuple[Optional[LesionReader], ModelCard]:
    """The reader (from ``--reader`` or the base) and the card with its section."""
    if args.reader is None:
        return (None if base is None else base.reader), card
    if not all((args.reader / f).is_file() for f in ("reader.json", "reader.safetensors")):
        raise UMLInputError(f"--reader {args.reader} lacks reader.json or reader.safetensors: give the --out folder of "
                            "a finished python -m training.train_reader run")
    section = read_json(args.reader / "reader.json", "the reader.json of python -m training.train_reader")
    kept = {} if card.reader is None else {k: getattr(card.reader, k) for k in (
        "max_components", "segmentation_min_lesion", "segmentation_max_components")}
    config = ReaderConfig(**{**section, **kept, "stacking": None})
    reader = LesionReader(len(card.input.channels) * (2 * config.context_slices + 1), config.width)
    _load_state(reader, args.reader / "reader.safetensors", "reader")
    return reader, dataclasses.replace(card, reader=config)


def _card(args, base: Optional[ModelBundle], model: UMLNet, record: Optional[dict]) -> ModelCard:
    """The card: new, or the base's with the new network's record (and no figures: they were the old network's)."""
    if base is None:
        info = run_dataset(args.run)
        default_id = "uml-breast-dce-small" if info.data == "synthetic" else f"uml-{info.data.split(':')[0]}"
        card = new_card(model.config, args.id or default_id, args.version or "1.0.0", record["config"], info)
    else:
        card = base.card if args.id is None else dataclasses.replace(base.card, id=args.id)
        if record is not None:
            card = dataclasses.replace(card, architecture=model.config, metrics={}, training={**record, "init": card.training})
    if record is not None and base is None:
        card = dataclasses.replace(card, training=record)
    changes = {k: v for k, v in (("name", args.name), ("description", args.description)) if v is not None}
    return dataclasses.replace(card, **changes)


def _motion(card: ModelCard, text: Optional[str]) -> ModelCard:
    """The card with ``--motion-correction`` (``none`` or the channel the others are moved onto)."""
    if text is None:
        return card
    mc = (MotionCorrection() if text == "none"
          else MotionCorrection("translation", text, card.input.motion_correction.max_shift_mm))
    return dataclasses.replace(card, input=dataclasses.replace(card.input, motion_correction=mc))


def _made_by(card: ModelCard, modality: Optional[str], region: Optional[str]) -> ModelCard:
    """The card with ``--modality`` / ``--body-region``: what made the training images (the engine's input check)."""
    changes = {k: v for k, v in (("modality", modality), ("body_region", region)) if v is not None}
    return dataclasses.replace(card, input=dataclasses.replace(card.input, **changes)) if changes else card


def _spacing(card: ModelCard, limits: Optional[list[float]]) -> ModelCard:
    """The card with ``--spacing-mm``: the voxel sizes (mm) the model accepts; others are refused."""
    if limits is None:
        return card
    return dataclasses.replace(card, input=dataclasses.replace(card.input, spacing_mm=tuple(limits)))


def _report(card: ModelCard, path: Optional[Path], sha256: str) -> ModelCard:
    """The card with ``--report``'s figures, if they were measured on these weights."""
    if path is None:
        return card
    report = read_json(path, "a report.json of python -m training.evaluate")
    if not isinstance(report, dict) or not isinstance(report.get("figures"), dict):
        raise UMLInputError(f"{path} is not a report of python -m training.evaluate: give its report.json")
    if report.get("model", {}).get("sha256") != sha256:
        raise UMLInputError(f"{path} measured other weights than this bundle's: evaluate this bundle, then add its report")
    return dataclasses.replace(card, metrics=report_metrics(card, report))


def build_parser() -> Parser:
    p = Parser(prog="python -m training.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the bundle folder to write")
    p.add_argument("--base", help="an existing bundle whose card (and network, reader) the new one starts from")
    p.add_argument("--run", type=Path, help="a python -m training.train folder: its network")
    p.add_argument("--weights", default="best.safetensors", help="the file in --run (default best.safetensors)")
    p.add_argument("--reader", type=Path, help="a python -m training.train_reader folder: its lesion reader")
    p.add_argument("--report", type=Path, help="a python -m training.evaluate report.json of the --base bundle: "
                                                "its figures as the card's metrics")
    p.add_argument("--motion-correction", metavar="none|CHANNEL",
                   help="how multi-phase cases are aligned: none, or the channel the others are moved onto (e.g. early)")
    p.add_argument("--modality", choices=MODALITIES, default=None,
                   help="what made the training images (default: the base's, else from the dataset kind): the engine "
                        "marks an input of another kind for review, e.g. a CT for an MR model")
    p.add_argument("--body-region", default=None, metavar="TEXT", help="the body region trained on, e.g. breast")
    p.add_argument("--spacing-mm", nargs=2, type=float, metavar=("SMALLEST", "LARGEST"),
                   help="the voxel sizes in mm the model accepts along every axis; a scan outside is refused "
                        "(default: the base's, else any)")
    p.add_argument("--id", help="the model id (default: the base's, else uml-breast-dce-small)")
    p.add_argument("--version", help="the version (default: the base's, else 1.0.0; required with --base and --run)")
    p.add_argument("--name", help="the model's name for people (default: the base's, else one from the preset)")
    p.add_argument("--description", help="what the model does, for people (default: the base's, else a generic one)")
    p.add_argument("--changelog", help="one line for the card's changelog under the version")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.base is None and args.run is None:
        p.error("give --run (a new bundle) or --base (a bundle to change)")
    if args.base is not None and args.run is not None and args.version is None:
        p.error("a new network in --base's card is a new model version: give --version")
    if args.report is not None and (args.run is not None or args.reader is not None):
        p.error("--report holds figures of --base's weights: export the new networks first, evaluate that bundle, "
                "then add its report")
    base = None if args.base is None else load_bundle(args.base)
    model, record = _network(args, base)
    reader, card = _reader(args, base, _card(args, base, model, record))
    card = _made_by(_spacing(_motion(card, args.motion_correction), args.spacing_mm), args.modality, args.body_region)
    card = _report(card, args.report, None if base is None else base.sha256)
    path = save_bundle(model, with_version(card, args.version, args.changelog), args.out, overwrite=args.overwrite,
                       reader=reader)
    bundle = load_bundle(path)
    size = (path / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {path} ({bundle.card.id} {bundle.card.version}, {size:.2f} MB weights, sha256 {bundle.sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "python -m training.export"))
