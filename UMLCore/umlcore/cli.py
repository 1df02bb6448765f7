"""The ``uml`` command line (also ``python -m umlcore``); documented in ``docs/cli.md``.

Commands:

- ``uml predict INPUT [INPUT ...] -o OUTDIR [--model ID|PATH] [--device auto|cpu|cuda] [--batch-size N|auto] [--threads N|auto]
  [--precision fp32|mixed] [--format auto|nii.gz|nrrd|png] [--progress bar|json|none] [--overwrite]``
- ``uml info MODEL [--json]``
- ``uml models [--json]``
- ``uml serve [--model ID|PATH] [--device ...] [--batch-size N|auto] [--threads N|auto] [--idle-exit S]``: a warm engine for programs (the
  Slicer module): the model is loaded once, then each JSON request line on stdin is predicted as ``predict`` would,
  answered by JSON progress lines and one ``{"stage": "exit", "code": N, ...}`` line on stdout (``docs/cli.md``)

Exit codes: 0 success; 2 bad input or usage (one line on stderr starting with ``uml: error: ``); 1 internal
error (one line plus a hint; the traceback only with ``--debug``); 130 when interrupted (Ctrl-C, SIGTERM).

``predict`` validates everything (inputs readable and acceptable to the model, the memory they need, model
loads, outputs that touch no input and are absent or uml's own with ``--overwrite``, OUTDIR creatable) before
writing anything, then claims its case folders, writes every case into a temporary folder inside OUTDIR and moves
them into place only when all cases succeeded; on failure nothing new is left behind (:mod:`umlcore.outputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, TextIO

import SimpleITK as sitk
import torch

from .allocator import tune_allocator
from .bundle import ModelBundle, load_bundle
from .catalogue import list_models, resolve_model, shipped_models_dir, user_models_dir
from .errors import BundleError, CancelledError, UMLError, UMLInputError
from .io import read_case, read_geometry, strip_image_extension, write_image_atomic
from .outputs import OutputClaim, check_output_folder, check_targets, os_error_message, refuse_inputs
from .pictures import UNCERTAINTY_PNG_SCALE, as_png, check_single_slice, is_picture_file
from .predictor import Predictor, ProgressCallback
from .threads import choose_threads
from .preview import write_preview

__all__ = ["main", "build_parser", "OUTPUT_FILES", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a program stopped by a closed pipe

ProgressMode = Literal["bar", "json", "none"]
OutputFormat = Literal["auto", "nii.gz", "nrrd", "png"]

#: Files written per case (``{fmt}`` is ``nii.gz``, ``nrrd`` or ``png``).
OUTPUT_FILES = {"segmentation": "segmentation.{fmt}", "uncertainty": "uncertainty.{fmt}", "summary": "summary.json"}
PREVIEW_FILE = "preview.png"

# Share of the whole run: reading/validating all inputs first, then the cases; per case the prediction,
# then writing its files.
_READ_SHARE = 0.05
_PREDICT_SHARE = 0.9


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``uml: error: ...``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"uml: error: {_one_line(message)} (see `{self.prog} --help`)\n")
        sys.stderr.flush()
        self.exit(EXIT_USAGE)


def _batch_size(text: str):
    """``auto`` or a positive integer."""
    return "auto" if text == "auto" else _positive_int(text)


def _threads(text: str):
    """``auto`` or a positive integer."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"threads must be a positive integer or auto, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch size must be a positive integer or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be a positive integer (1 or more), got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``uml`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of internal errors")
    parser = _Parser(prog="uml", description="UML: uncertainty-aware joint classification + segmentation (evidential deep learning).")
    parser.add_argument("--debug", action="store_true", default=False, help="print the traceback of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="{predict,info,models,serve}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("predict", parents=[common], help="segment cases and write labelmap, uncertainty and summary",
                       description="Segment each case; write OUTDIR/<case>/segmentation.<fmt>, uncertainty.<fmt> and summary.json.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="one case: an image file, a DICOM series folder, or the phases of one case joined with commas "
                        "(pre.nii.gz,early.nii.gz,late.nii.gz)")
    p.add_argument("-o", "--output", dest="outdir", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    p.add_argument("--model", default=None, metavar="ID|PATH", help="model id (see `uml models`) or bundle folder/.zip; default: the shipped model")
    _engine_options(p)
    p.add_argument("--format", choices=("auto", "nii.gz", "nrrd", "png"), default="auto",
                   help="image format of the outputs; auto (default): png for a picture input, else nii.gz; png only "
                        "for pictures (one slice)")
    p.add_argument("--progress", choices=("bar", "json", "none"), default=None,
                   help="bar: text bar on stderr (default on a terminal); json: one JSON object per line on stdout; none (default otherwise)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing OUTDIR/<case> folders that uml wrote (never anything else)")
    p.add_argument("--strict-input", action="store_true",
                   help="refuse an input that does not look like the model's training images (e.g. a CT for an MR "
                        "model) instead of answering it with the verdict review")
    p.add_argument("--preview", action="store_true",
                   help="also write OUTDIR/<case>/preview.png: key slice with the lesion outline, uncertainty, confidence")
    p.set_defaults(func=_cmd_predict)

    i = sub.add_parser("info", parents=[common], help="print a model bundle's card", description="Print a model bundle's card (verifies the bundle).")
    i.add_argument("model", metavar="MODEL", help="model id or bundle folder/.zip")
    i.add_argument("--json", action="store_true", help="print the card as JSON")
    i.set_defaults(func=_cmd_info)

    m = sub.add_parser("models", parents=[common], help="list the model bundles found (shipped first)",
                       description="List the model bundles found: shipped ones first, then ~/.uml/models.")
    m.add_argument("--json", action="store_true", help="print the list as JSON")
    m.set_defaults(func=_cmd_models)

    w = sub.add_parser("serve", parents=[common], help="a warm engine: load the model once, answer JSON requests on stdin",
                       description="Load the model once, then predict each JSON request line read from stdin "
                                   '({"inputs": [...], "output": OUTDIR, "format": ..., "overwrite": false, "preview": false}), '
                                   'answering with JSON progress lines and one {"stage": "exit", "code": N} line on stdout. '
                                   "Ends at the end of stdin, or after --idle-exit seconds without a request.")
    w.add_argument("--model", default=None, metavar="ID|PATH", help="model id or bundle folder/.zip; default: the shipped model")
    _engine_options(w)
    w.add_argument("--idle-exit", type=_positive_float, default=1800.0, metavar="S",
                   help="end after S seconds without a request, freeing the model's memory (default 1800)")
    w.set_defaults(func=_cmd_serve)
    return parser


def _engine_options(p: argparse.ArgumentParser) -> None:
    """The options that fix a loaded predictor (``predict`` and ``serve``)."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: CUDA if available, else CPU (default); mps: Apple-silicon GPU")
    p.add_argument("--batch-size", type=_batch_size, default="auto", metavar="N|auto",
                   help="slices per forward pass (default auto: 1 on the CPU, 8 on a GPU)")
    p.add_argument("--threads", type=_threads, default="auto", metavar="N|auto",
                   help="CPU threads (default auto: the cores that are free when a case starts)")
    p.add_argument("--precision", choices=("fp32", "mixed"), default="fp32",
                   help="fp32: exact, a GPU gives the CPU's results (default); mixed: bf16 autocast on CUDA")
    p.add_argument("--max-memory-gb", type=_positive_float, default=None, metavar="GB",
                   help="the memory a case may take (default: 70%% of what is available); a larger volume is refused")


# --------------------------------------------------------------------------------------------- progress


@dataclass
class _Progress:
    """Reports run-wide progress: JSON lines on stdout, a text bar on stderr, or nothing."""

    mode: ProgressMode
    out: TextIO
    err: TextIO
    fraction: float = 0.0
    _bar_open: bool = field(default=False, repr=False)

    def emit(self, stage: str, case: Optional[str], fraction: float, message: str) -> None:
        self.fraction = min(1.0, max(self.fraction, float(fraction)))
        if self.mode == "json":
            line = {"stage": stage, "case": case, "fraction": round(self.fraction, 6), "message": message}
            self.out.write(json.dumps(line) + "\n")
            self.out.flush()
        elif self.mode == "bar":
            width = 30
            filled = int(round(width * self.fraction))
            label = f"{case}: " if case else ""
            text = f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * self.fraction:5.1f}% {stage:<11} {label}{message}"
            self.err.write(text[:150].ljust(150) if stage != "done" else text + "\n")
            self.err.flush()
            self._bar_open = stage != "done"

    def error(self, case: Optional[str], message: str) -> None:
        if self.mode == "json":
            self.emit("error", case, self.fraction, message)
        elif self._bar_open:
            self.err.write("\n")
            self._bar_open = False


# --------------------------------------------------------------------------------------------- predict


@dataclass
class _Case:
    id: str
    paths: list[str]
    volumes: Optional[list] = None
    read_s: float = 0.0
    format: str = "nii.gz"


def _parse_cases(inputs: Sequence[str]) -> list[_Case]:
    cases: list[_Case] = []
    for text in inputs:
        parts = [p.strip() for p in text.split(",")]
        if any(not p for p in parts):
            raise UMLInputError(f"input {text!r} has an empty item: join the phases of one case with single commas, e.g. pre.nii.gz,early.nii.gz")
        first = Path(parts[0])
        name = first.name if first.name not in ("", ".", "..") else first.absolute().resolve().name
        case_id = strip_image_extension(name)
        if case_id in ("", ".", "..") or case_id.startswith("."):
            raise UMLInputError(f"cannot name a case after {parts[0]!r}: rename the input so its name does not start with a dot")
        cases.append(_Case(case_id, parts))
    seen: dict[str, str] = {}
    for c in cases:
        if c.id in seen:
            raise UMLInputError(f"inputs {seen[c.id]!r} and {','.join(c.paths)!r} both give the case name {c.id!r}: rename one or run them separately")
        seen[c.id] = ",".join(c.paths)
    return cases


def _load_model(spec: Optional[str]) -> ModelBundle:
    if spec is None:
        try:
            path = resolve_model(None)
        except BundleError:
            raise UMLInputError(
                f"no model given and no shipped model found in {shipped_models_dir()}: pass --model with a bundle folder, "
                ".zip or id (see `uml models`)"
            ) from None
    else:
        path = resolve_model(spec)
    return load_bundle(path)


def _case_format(case: _Case, size: Sequence[int], fmt: OutputFormat) -> str:
    """The image format of a case's outputs: ``auto`` is ``png`` for a picture file (one slice), else ``nii.gz``;
    ``png`` is refused for a grid of several slices."""
    if fmt == "auto":
        return "png" if is_picture_file(case.paths[0]) and size[2] == 1 else "nii.gz"
    if fmt == "png":
        check_single_slice(size, f"case {case.id!r} ({', '.join(case.paths)})")
    return fmt


def _read_cases(cases: list[_Case], predictor: Predictor, progress: _Progress, state: dict, fmt: OutputFormat,
                strict: bool = False) -> None:
    """Check every case before anything is written: the memory it needs (from its header), then its volumes
    (one case is kept in memory rather than read twice)."""
    for n, case in enumerate(cases):
        state["case"] = case.id
        progress.emit("read", case.id, _READ_SHARE * n / len(cases), f"reading and checking {', '.join(case.paths)}")
        try:
            geometry = read_geometry(case.paths[0])
        except UMLInputError:  # read_case below names what is wrong with the file
            geometry = None
        if geometry is not None:
            size, spacing, direction = geometry
            predictor.plan_batch(size, direction, spacing)  # the memory it needs, before its voxels are read
        t0 = time.perf_counter()
        volumes = read_case(case.paths)
        case.read_s = time.perf_counter() - t0
        channels, source = predictor.channel_volumes(volumes)
        reasons = predictor.input_reasons(channels, source) if strict else []  # else predict() checks, and warns
        if reasons:
            raise UMLInputError(f"case {case.id!r}: {reasons[0]}: give a scan of the kind the model was trained on "
                                "(uml info shows its card), or leave out --strict-input to get an answer marked review")
        case.format = _case_format(case, volumes[0].GetSize(), fmt)
        case.volumes = volumes if len(cases) == 1 else None
    progress.emit("read", None, _READ_SHARE, f"{len(cases)} case(s) checked")


def _write_case(case: _Case, predictor: Predictor, folder: Path, args: argparse.Namespace,
                on_progress: ProgressCallback) -> dict:
    """Predict one case and write its files into its (staging) ``folder``; returns its summary."""
    volumes, read_s = case.volumes, case.read_s
    if volumes is None:
        t0 = time.perf_counter()
        volumes = read_case(case.paths)
        read_s = time.perf_counter() - t0
    case.volumes = None
    prediction = predictor.predict(volumes, progress=on_progress, case_id=case.id)
    summary = prediction.summary
    summary["timings_s"]["read"] = read_s
    summary["timings_s"]["total"] += read_s
    four_d = len(case.paths) == 1 and len(volumes) > 1
    for entry in summary["inputs"]:
        entry["path"] = case.paths[0] if four_d else case.paths[entry["volume"]]
    names = {k: v.format(fmt=case.format) for k, v in OUTPUT_FILES.items()}
    summary["outputs"] = {**names, **({"preview": PREVIEW_FILE} if args.preview else {})}
    labelmap, uncertainty = prediction.labelmap, prediction.uncertainty
    if case.format == "png":
        labelmap = as_png(labelmap, "the segmentation")
        uncertainty = as_png(uncertainty, "the uncertainty", UNCERTAINTY_PNG_SCALE, sitk.sitkUInt16)
    try:
        write_image_atomic(labelmap, folder / names["segmentation"])
        write_image_atomic(uncertainty, folder / names["uncertainty"])
        if args.preview:
            write_preview(volumes, prediction.labelmap, prediction.uncertainty, summary, folder / PREVIEW_FILE,
                          picture=predictor.card.input.kind == "picture")
        (folder / names["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise UMLInputError(os_error_message(exc, f"the outputs of case {case.id!r}")) from None
    return summary


def _new_predictor(args: argparse.Namespace) -> Predictor:
    return Predictor(_load_model(args.model), device=args.device, batch_size=args.batch_size,
                     precision=args.precision, max_memory_gb=args.max_memory_gb)


def _warn_input(case_id: str, reasons: Sequence[str], progress: _Progress) -> None:
    """One warning line on stderr for a case whose input does not look like the model's training images."""
    for reason in reasons:
        progress.err.write(f"uml: warning: case {case_id!r}: {reason}; its verdict is review (--strict-input refuses such "
                           "an input)\n")
        progress.err.flush()


def _cmd_predict(args: argparse.Namespace, progress: _Progress, state: dict, predictor: Optional[Predictor] = None) -> int:
    """Predict ``args.inputs`` into ``args.outdir`` (with ``predictor`` when one is loaded: ``serve``)."""
    cases = _parse_cases(args.inputs)
    outdir = check_output_folder(args.outdir)
    targets = {case.id: outdir / case.id for case in cases}
    refuse_inputs([p for case in cases for p in case.paths], outdir, targets)
    check_targets(targets, args.overwrite)
    if args.preview and importlib.util.find_spec("matplotlib") is None:
        raise UMLInputError("--preview needs matplotlib: pip install matplotlib, or leave out --preview")
    predictor = predictor or _new_predictor(args)
    torch.set_num_threads(choose_threads(args.threads, state["threads"]))  # per run: what is free now
    _read_cases(cases, predictor, progress, state, args.format, args.strict_input)
    share = (1.0 - _READ_SHARE) / len(cases)
    try:
        with OutputClaim(outdir, targets, args.overwrite) as claim:
            for n, case in enumerate(cases):
                state["case"], base = case.id, _READ_SHARE + n * share

                def on_progress(stage: str, fraction: float, message: str, _base: float = base, _id: str = case.id) -> None:
                    progress.emit(stage, _id, _base + share * _PREDICT_SHARE * fraction, message)

                summary = _write_case(case, predictor, claim.folder(case.id), args, on_progress)
                _warn_input(case.id, summary["input_check"]["reasons"], progress)
                progress.emit("write", case.id, base + share, "written")
            claim.commit()
    except OSError as exc:  # creating, staging or moving the folders
        raise UMLInputError(os_error_message(exc, f"into {outdir}")) from None
    state["case"] = None
    progress.emit("done", None, 1.0, f"wrote {len(cases)} case(s) to {outdir}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- info / models


def _kind_text(spec) -> str:
    """What the model reads, as ``uml info`` says it: ``2D pictures`` or ``3D volumes in axial slices``."""
    if spec.kind == "picture":
        return "2D pictures (PNG, JPEG, BMP, TIFF)"
    return (f"3D volumes in {spec.slicing_axis} slices"
            + (f" with {spec.context_slices} neighbouring slice(s) on each side (2.5D)" if spec.context_slices else ""))


def _card_text(bundle: ModelBundle) -> str:
    card = bundle.card
    spec = card.input
    norm = spec.normalization
    norm_text = f"{norm.mode} ({norm.lower}-{norm.upper} percentiles -> [0, 1])" if norm.mode == "percentile" else norm.mode
    arch = card.architecture
    lines = [
        f"{card.name} ({card.id} {card.version})",
        f"  task:          {card.task}",
    ]
    if card.description:
        lines.append(f"  description:   {card.description}")
    lines += [
        f"  classes:       {', '.join(card.classes)} (positive: {card.classes[card.positive_class]})",
        "  segments:      " + ", ".join(f"{s.label} {s.name}" for s in card.segments),
        f"  input:         {_kind_text(spec)}, channels {', '.join(spec.channels)} (at least {spec.min_channels}; "
        f"missing: {spec.missing_channels})",
        f"  spacing:       {'native' if spec.target_spacing is None else ' x '.join(f'{v:g}' for v in spec.target_spacing) + ' mm in-plane'}"
        + ("" if spec.spacing_mm is None else f"; reads voxels of {spec.spacing_mm[0]:g}-{spec.spacing_mm[1]:g} mm"),
        "  size:          " + ("native" if spec.target_size is None else
                               f"every slice resized to {spec.target_size[0]} rows x {spec.target_size[1]} columns"),
        f"  normalisation: {norm_text}",
        "  motion:        " + ("phases read as given" if spec.motion_correction.mode == "none" else
                              f"the other phases of a multi-phase case moved onto the {spec.motion_correction.reference} "
                              f"phase by a 3D translation (up to {spec.motion_correction.max_shift_mm:g} mm)"),
        f"  architecture:  in {arch.in_channels}, classes {arch.num_classes}, labels {arch.num_seg_labels}, "
        f"widths {list(arch.cls_widths)}/{list(arch.seg_widths)}/{list(arch.mutual_widths)}, "
        f"classifier pool {arch.cls_pool}",
        f"  review if uncertainty > {card.review_uncertainty:g}",
    ]
    if card.component_max_uncertainty is not None:
        lines.append(f"  postprocess:   drop segmentation components with mean uncertainty > {card.component_max_uncertainty:g}"
                     + (" (one volume; multi-phase cases: the lesion reader's check)" if card.reader is not None else ""))
    if card.reader is not None:
        r = card.reader
        params = sum(p.numel() for p in bundle.reader.parameters()) if bundle.reader is not None else 0
        lines.append(f"  lesion reader: {params:,} parameters, {r.patch_size} x {r.patch_size} patches of {r.pixel_mm:g} mm "
                     f"(+-{r.context_slices} slices), each read in its 8 flips and transposes (multi-phase cases)")
        lines.append(f"                 check: keeps those of the {r.segmentation_max_components} largest components it "
                     f"reads as lesions with p >= {r.segmentation_min_lesion:g}")
        lines.append(f"                 case opinion: the {r.max_components} largest lesions kept, "
                     + ("stacked rule " + ", ".join(f"{t} {v:+.3f}" for t, v in r.stacking.items())
                        if r.stacking is not None else "rule not fitted yet (the network's opinion stands)"))
    calibrations = [(what, getattr(card, name)) for what, name in (("multi-phase cases", "case_calibration"),
                                                                   ("one volume given", "single_volume_calibration"))]
    for n, (what, c) in enumerate((w, c) for w, c in calibrations if c is not None):
        lines.append(f"  {'calibration:' if n == 0 else '':<15}{what}: Platt slope {c['slope']:.3f}, intercept {c['intercept']:.3f}")
    if card.changelog:
        version, change = next(iter(card.changelog.items()))
        lines.append(f"  changelog:     {version}: {change}" + (f" (and {len(card.changelog) - 1} earlier versions)"
                                                                if len(card.changelog) > 1 else ""))
    figures = {k: v for k, v in card.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if figures:
        lines.append(f"  metrics:       {card.metrics.get('test_set', 'test set not described')}: "
                     + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    if card.training.get("command"):
        lines.append(f"  training:      {card.training['command']}")
    lines += [
        f"  license:       {card.license}",
        f"  citation:      {card.citation}",
        f"  weights:       sha256 {bundle.sha256} (verified)",
        f"  path:          {bundle.path}",
        "  (uml info --json prints the whole card)",
    ]
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace, progress: _Progress, state: dict) -> int:
    bundle = load_bundle(resolve_model(args.model))
    if args.json:
        print(json.dumps({**bundle.card.to_dict(bundle.sha256), "path": str(bundle.path)}, indent=2))
    else:
        print(_card_text(bundle))
    return EXIT_OK


def _cmd_models(args: argparse.Namespace, progress: _Progress, state: dict) -> int:
    entries = list_models()
    if args.json:
        print(json.dumps([
            {"id": e.id, "version": e.card.version if e.card else None, "path": str(e.path), "shipped": e.shipped, "error": e.error}
            for e in entries
        ], indent=2))
        return EXIT_OK
    if not entries:
        print(f"no model bundles found (looked in {shipped_models_dir()} and {user_models_dir()})")
        return EXIT_OK
    for e in entries:
        where = "shipped" if e.shipped else "user"
        if e.card is None:
            print(f"{e.id}\t-\t{e.path}\t{where}\tunusable: {_one_line(e.error)}")
        else:
            print(f"{e.id}\t{e.card.version}\t{e.path}\t{where}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- serve

_REQUEST_FIELDS = ("inputs", "output", "format", "overwrite", "preview", "strict_input")


def _request_args(line: str, threads) -> argparse.Namespace:
    """The ``predict`` arguments of one ``serve`` request line (one JSON object, see ``docs/cli.md``)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UMLInputError(f"the request is not JSON ({exc.msg}): send one JSON object per line") from None
    if not isinstance(data, dict):
        raise UMLInputError("the request is not a JSON object: send {\"inputs\": [...], \"output\": OUTDIR}")
    unknown = sorted(set(data) - set(_REQUEST_FIELDS))
    if unknown:
        raise UMLInputError(f"the request has unknown field(s) {unknown}: use {list(_REQUEST_FIELDS)}")
    inputs, output = data.get("inputs"), data.get("output")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) and i for i in inputs):
        raise UMLInputError("the request's inputs must be a non-empty list of INPUT strings, as uml predict takes them")
    if not isinstance(output, str) or not output:
        raise UMLInputError("the request's output must be the output folder (a string)")
    fmt = data.get("format", "auto")
    if fmt not in ("auto", "nii.gz", "nrrd", "png"):
        raise UMLInputError(f"the request's format {fmt!r} is unknown: use auto, nii.gz, nrrd or png")
    flags = {k: data.get(k, False) for k in ("overwrite", "preview", "strict_input")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise UMLInputError("the request's overwrite, preview and strict_input must be true or false")
    return argparse.Namespace(inputs=inputs, outdir=output, format=fmt, threads=threads, **flags)


def _write_line(out: TextIO, data: dict) -> None:
    out.write(json.dumps(data) + "\n")
    out.flush()


def _cmd_serve(args: argparse.Namespace, progress: _Progress, state: dict) -> int:
    """Load the model once, then answer request lines until stdin ends or ``--idle-exit`` seconds pass idle."""
    predictor = _new_predictor(args)
    card = predictor.card
    _write_line(progress.out, {"stage": "ready", "case": None, "fraction": 0.0, "device": predictor.device,
                               "torch": torch.__version__, "message": f"model {card.id} {card.version} loaded on "
                                                                      f"{predictor.device} (PyTorch {torch.__version__})"})
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_stdin, name="uml-serve-stdin", daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=args.idle_exit)
        except queue.Empty:
            return EXIT_OK  # idle: free the model's memory; the client starts a new engine when it needs one
        if line is None:
            return EXIT_OK
        if not line.strip():
            continue
        answer = _Progress("json", progress.out, progress.err)
        state["case"] = None
        code, message = _guarded(lambda: _cmd_predict(_request_args(line, args.threads), answer, state, predictor),
                                 answer, state, state.get("debug", False))
        _write_line(progress.out, {"stage": "exit", "case": None, "fraction": 1.0, "code": code, "message": message})
        if code in (EXIT_INTERRUPTED, EXIT_BROKEN_PIPE):
            return code


# --------------------------------------------------------------------------------------------- main


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _guarded(command: Callable[[], int], progress: _Progress, state: dict, debug: bool) -> tuple[int, str]:
    """Run one command; a failure becomes its exit code and one line on stderr. Returns ``(code, that line)``."""
    hint = ""
    try:
        return command(), ""
    except UMLInputError as exc:
        code, prefix, message = EXIT_USAGE, "error", _one_line(exc)
    except (CancelledError, KeyboardInterrupt):
        code, prefix, message = EXIT_INTERRUPTED, "cancelled", "nothing was written"
    except BrokenPipeError:  # the reader of stdout went away (`uml info ... | head`): stop quietly, as cat does
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_BROKEN_PIPE, ""
    except UMLError as exc:
        code, prefix, message = EXIT_INTERNAL, "error", _one_line(exc)
    except Exception as exc:  # noqa: BLE001 - the command line turns every failure into an exit code
        code, prefix, message = EXIT_INTERNAL, "internal error", _one_line(f"{type(exc).__name__}: {exc}")
        hint = " (rerun with --debug for the traceback and report it)"
        if debug:
            traceback.print_exc()
    progress.error(state["case"], "cancelled" if code == EXIT_INTERRUPTED else message)
    sys.stderr.write(f"uml: {prefix}: {message}{hint}\n")
    return code, message + hint


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``uml`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    debug = bool(getattr(args, "debug", False))
    tune_allocator()  # large tensors reused instead of mapped and zeroed by the kernel each time (umlcore.allocator)
    mode: ProgressMode = getattr(args, "progress", None) or ("bar" if sys.stderr.isatty() else "none")
    progress = _Progress(mode, sys.stdout, sys.stderr)
    state: dict = {"case": None, "debug": debug, "threads": torch.get_num_threads()}  # PyTorch's default threads
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warnings would break the one-line error contract
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _guarded(lambda: args.func(args, progress, state), progress, state, debug)[0]
    finally:
        sys.stderr.flush()
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
        torch.set_num_threads(state["threads"])  # a caller in the same process (tests, a notebook) keeps its threads
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
