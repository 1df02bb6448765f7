"""The engine's case summary (``summary.json``) as table rows and as one CSV row per case.

Table rows are ``(field, value)`` text pairs in the summary's own order, nested keys joined with ``.``
(``classification.predicted_class``), lists of objects indexed (``segments[0].volume_ml``), lists of plain
values and numbers written as JSON (so ``[0.25, 0.75]`` and ``0.1`` read back exactly) and strings as they
are (quoted only when they would read back as something else, like ``"1.0"``). :func:`unflattenRows`
inverts :func:`flattenSummary`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = [
    "FIELD_COLUMN",
    "VALUE_COLUMN",
    "SUMMARY_KEY_ORDER",
    "flattenSummary",
    "unflattenRows",
    "caseCsvRow",
    "csvColumns",
    "writeCasesCsv",
    "ConfidencePanel",
    "VERDICT_COLORS",
    "confidencePanel",
]

FIELD_COLUMN = "Field"
VALUE_COLUMN = "Value"

#: Top-level keys shown first in the table (the rest follow in the summary's own order).
SUMMARY_KEY_ORDER = ("case_id", "classification", "segments", "model", "device", "timings_s", "geometry", "outputs")


def _text(value: Any) -> str:
    if isinstance(value, str):
        # A string that would read back as another JSON value ("1.0", "true") is written quoted.
        return value if _parseValue(value) == value else json.dumps(value)
    return json.dumps(value, allow_nan=True)


def _flatten(prefix: str, value: Any, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping):
        if not value:
            rows.append((prefix, "{}"))
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            _flatten(f"{prefix}[{i}]", v, rows)
    else:
        rows.append((prefix, _text(list(value) if isinstance(value, tuple) else value)))


def flattenSummary(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(field, value)`` rows of a summary, most useful keys first (see :data:`SUMMARY_KEY_ORDER`)."""
    keys = [k for k in SUMMARY_KEY_ORDER if k in summary] + [k for k in summary if k not in SUMMARY_KEY_ORDER]
    rows: list[tuple[str, str]] = []
    for k in keys:
        _flatten(str(k), summary[k], rows)
    return rows


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parseValue(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def unflattenRows(rows: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Rebuild the summary dictionary from ``(field, value)`` rows (inverse of :func:`flattenSummary`)."""
    root: dict[str, Any] = {}
    for field, text in rows:
        parts = [(m.group(1), m.group(2)) for m in _PART.finditer(field)]
        node: Any = root
        for i, (key, index) in enumerate(parts):
            last = i == len(parts) - 1
            nextIsIndex = not last and parts[i + 1][1] is not None
            if key is not None:
                if last:
                    node[key] = _parseValue(text)
                else:
                    node = node.setdefault(key, [] if nextIsIndex else {})
            else:
                idx = int(index)
                while len(node) <= idx:
                    node.append({})
                if last:
                    node[idx] = _parseValue(text)
                else:
                    node = node[idx]
    return root


def _segmentKey(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "segment"


def _componentsRemoved(summary: Mapping[str, Any]) -> Optional[int]:
    """Regions the model's filters removed from the labelmap (its uncertainty filter, or the lesion reader's check of
    the segmentation); ``None`` when neither ran."""
    post = summary.get("postprocessing") or {}
    ran = post.get("component_max_uncertainty") is not None or post.get("segmentation_min_lesion") is not None
    if not ran or post.get("components_removed") is None:
        return None
    return int(post["components_removed"])


def _motionShiftMm(summary: Mapping[str, Any]) -> Optional[float]:
    """The longest shift (mm) by which the model's motion correction moved a phase; ``None`` when none was moved."""
    moved = [sum(v * v for v in p["shift_mm"]) ** 0.5 for p in (summary.get("motion_correction") or {}).get("phases", [])
             if p.get("applied")]
    return max(moved) if moved else None


def _cell(value: Any) -> str:
    return "" if value is None else _text(value)


def caseCsvRow(summary: Optional[Mapping[str, Any]], caseId: str, inputPath: str, files: Mapping[str, str], error: str = "") -> dict[str, str]:
    """One CSV row: case, status, classification, per-segment volume / uncertainty, model, device, files.

    Args:
        summary: The case summary, or ``None`` when the case failed.
        caseId: Case id (used when there is no summary).
        inputPath: The input file.
        files: ``{"segmentation": ..., "uncertainty": ..., "summary": ...}`` paths written for the case.
        error: The error message of a failed case.
    """
    row: dict[str, str] = {"case_id": caseId, "input": inputPath, "status": "error" if error else "ok", "error": error}
    if summary is not None:
        cls = summary.get("classification", {})
        row["case_id"] = str(summary.get("case_id", caseId))
        row["predicted_class"] = str(cls.get("predicted_class", ""))
        row["positive_probability"] = _cell(cls.get("positive_probability"))
        row["uncertainty"] = _cell(cls.get("uncertainty"))
        row["verdict"] = str(cls.get("verdict", ""))
        row["input_check"] = _inputWarning(summary)
        for name, p in zip(cls.get("classes", []), cls.get("probabilities", [])):
            row[f"probability_{_segmentKey(str(name))}"] = _cell(p)
        for name, b in zip(cls.get("classes", []), cls.get("belief", [])):
            row[f"belief_{_segmentKey(str(name))}"] = _cell(b)
        for seg in summary.get("segments", []):
            key = _segmentKey(str(seg.get("name", seg.get("label", ""))))
            row[f"{key}_volume_ml"] = _cell(seg.get("volume_ml"))
            row[f"{key}_voxel_count"] = _cell(seg.get("voxel_count"))
            row[f"{key}_mean_uncertainty"] = _cell(seg.get("mean_uncertainty"))
        row["components_removed"] = _cell(_componentsRemoved(summary))
        row["motion_shift_mm"] = _cell(_motionShiftMm(summary))
        model = summary.get("model", {})
        row["model_id"] = str(model.get("id", ""))
        row["model_version"] = str(model.get("version", ""))
        row["model_sha256"] = str(model.get("sha256", ""))
        row["device"] = str(summary.get("device", ""))
    for key in ("segmentation", "uncertainty", "summary"):
        row[f"{key}_file"] = str(files.get(key, ""))
    return row


_FIRST = ["case_id", "input", "status", "error", "predicted_class", "positive_probability", "uncertainty", "verdict",
          "input_check"]
_LAST = ["model_id", "model_version", "model_sha256", "device", "segmentation_file", "uncertainty_file", "summary_file"]


def csvColumns(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Column order: identification and verdict first, then per-class and per-segment columns, then files."""
    middle: list[str] = []
    for row in rows:
        for k in row:
            if k not in _FIRST and k not in _LAST and k not in middle:
                middle.append(k)
    return _FIRST + middle + _LAST


def writeCasesCsv(rows: Sequence[Mapping[str, str]], path: Path) -> Path:
    """Write ``rows`` as a UTF-8 CSV with a header (missing cells empty); returns ``path``."""
    columns = csvColumns(rows)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class ConfidencePanel:
    """What the module's confidence panel shows for one case (all numbers in 0..1 unless noted).

    Attributes:
        predictedClass: Name of the predicted class.
        predictedProbability: Expected probability of the predicted class.
        positiveClass: Name of the positive class.
        positiveProbability: Expected probability of the positive class.
        beliefs: ``(class name, belief mass)`` per class; the masses and ``uncertainty`` add up to 1.
        uncertainty: Case-level uncertainty mass.
        verdict: ``"reliable"`` or ``"review"``.
        verdictColor: ``#rrggbb`` for the verdict (green / orange).
        lesionName: Name of the first segment (the lesion), or ``""``.
        lesionVolumeMl: Its volume in ml (``None`` without segments).
        lesionVoxels: Its voxel (for a picture: pixel) count (``None`` without segments).
        lesionMeanUncertainty: Mean voxel uncertainty inside it (``None`` when it is empty).
        componentsRemoved: Segmented regions the model's filter removed (``None`` when the model has no filter;
            the regions stay visible in the uncertainty map).
        removedBy: Which filter made the labelmap: ``"uncertainty"`` (regions whose mean uncertainty was above the
            model's threshold) or ``"reader"`` (the lesion reader did not read them as lesions).
        singleVolume: The case was given as one volume replicated into the model's several channels (a single
            DCE phase or a subtraction image; for a picture model a grey picture): a weaker opinion than from all
            channels.
        picture: The case is a 2D picture (one slice: ``slicing.count`` 1), so its size is an area in pixels.
        readerText: What the model's lesion reader found (``""`` when the model has none): the most suspicious
            lesion's score and its margin and kinetics probabilities, or why the reader was not used.
        readerToolTip: How the reader's score entered the case opinion, with the network's own probability.
        inputWarning: Why the input does not look like the model's training images (the engine's input check,
            ``summary.input_check.reasons``; it made the verdict "review"), ``""`` when it passed.
    """

    predictedClass: str
    predictedProbability: float
    positiveClass: str
    positiveProbability: float
    beliefs: tuple[tuple[str, float], ...]
    uncertainty: float
    verdict: str
    verdictColor: str
    lesionName: str
    lesionVolumeMl: Optional[float]
    lesionMeanUncertainty: Optional[float]
    componentsRemoved: Optional[int] = None
    removedBy: str = "uncertainty"
    singleVolume: bool = False
    picture: bool = False
    lesionVoxels: Optional[int] = None
    readerText: str = ""
    readerToolTip: str = ""
    inputWarning: str = ""

    @property
    def lesionSizeText(self) -> str:
        """The lesion's size and name for the panel: ``"0.18 ml (Lesion)"``, for a picture ``"812 pixels (Lesion)"``,
        or ``"-"`` without segments."""
        if self.lesionVolumeMl is None:
            return "-"
        if self.picture and self.lesionVoxels is not None:
            return f"{self.lesionVoxels} pixel{'s' if self.lesionVoxels != 1 else ''} ({self.lesionName})"
        return f"{self.lesionVolumeMl:.2f} ml ({self.lesionName})"

    @property
    def singleInputText(self) -> str:
        """How the panel marks a case given as one volume (``"from one volume"``, for a picture ``"from a grey
        picture"``), ``""`` otherwise."""
        if not self.singleVolume:
            return ""
        return "from a grey picture" if self.picture else "from one volume"


VERDICT_COLORS = {"reliable": "#2e7d32", "review": "#e65100"}


def _readerTexts(summary: Mapping[str, Any]) -> tuple[str, str]:
    """The reader's line and tool tip of the confidence panel (``docs/summary-schema.md``: classification.reader)."""
    reader = summary.get("classification", {}).get("reader")
    if not isinstance(reader, Mapping):
        return "", ""
    if not reader.get("applied"):
        return f"not used: {reader.get('reason') or 'no reason given'}", ""
    lesions = [l for l in summary.get("lesions", []) if isinstance(l, Mapping)]
    top = max(lesions, key=lambda l: float(l.get("suspicion", 0.0)), default={})
    p = top.get("probabilities", {})
    text = f"{100 * float(reader.get('score', float('nan'))):.0f} % suspicious"
    if p:
        text += f" (spiculated {100 * float(p.get('spiculated', 0)):.0f} %, washout {100 * float(p.get('washout', 0)):.0f} %)"
    n = len(lesions)
    text += f"; most suspicious of {n} lesion{'s' if n != 1 else ''} read"
    network = reader.get("network_probabilities") or []
    positive = summary.get("classification", {}).get("positive_class")
    classes = list(summary.get("classification", {}).get("classes", []))
    alone = network[classes.index(positive)] if positive in classes and len(network) == len(classes) else None
    # The one reader rule (summary schema 2, classification.reader.fusion): logistic stacking of the network's opinion
    # and the reader's outputs, fitted on evaluated cases; the evidence the reader adds may lower the uncertainty.
    network_u = reader.get("network_uncertainty")
    own = f" (the network alone: {100 * float(network_u):.0f} %)" if network_u is not None else ""
    tip = (f"A second network read the {n} largest segmented lesion{'s' if n != 1 else ''} from patches of all phases "
           f"(margin and kinetics). A model fitted on evaluated cases combines its three outputs and its score with "
           f"the network's opinion; the evidence it adds may lower the uncertainty{own}.")
    if alone is not None:
        tip += f" The network alone (uncalibrated) said {100 * float(alone):.0f} % {positive}."
    return text, tip


def confidencePanel(summary: Mapping[str, Any]) -> ConfidencePanel:
    """The confidence panel's content from a case summary.

    Raises:
        ValueError: the summary lacks the classification section.
    """
    cls = summary.get("classification")
    if not isinstance(cls, Mapping):
        raise ValueError("the summary has no classification section")
    classes = [str(c) for c in cls.get("classes", [])]
    probabilities = [float(p) for p in cls.get("probabilities", [])]
    index = int(cls.get("predicted_index", max(range(len(probabilities)), key=probabilities.__getitem__) if probabilities else 0))
    segments = list(summary.get("segments", []))
    lesion = segments[0] if segments else {}
    meanU = lesion.get("mean_uncertainty")
    verdict = str(cls.get("verdict", ""))
    removed = _componentsRemoved(summary)
    sources = [item.get("volume") for item in summary.get("inputs", []) if isinstance(item, Mapping)]
    readerText, readerToolTip = _readerTexts(summary)
    return ConfidencePanel(
        predictedClass=str(cls.get("predicted_class", classes[index] if index < len(classes) else "")),
        predictedProbability=probabilities[index] if index < len(probabilities) else float("nan"),
        positiveClass=str(cls.get("positive_class", "")),
        positiveProbability=float(cls.get("positive_probability", float("nan"))),
        beliefs=tuple(zip(classes, (float(b) for b in cls.get("belief", [])))),
        uncertainty=float(cls.get("uncertainty", float("nan"))),
        verdict=verdict,
        verdictColor=VERDICT_COLORS.get(verdict, "#000000"),
        lesionName=str(lesion.get("name", "")),
        lesionVolumeMl=None if not lesion else float(lesion.get("volume_ml", 0.0)),
        lesionVoxels=None if not lesion or lesion.get("voxel_count") is None else int(lesion["voxel_count"]),
        lesionMeanUncertainty=None if meanU is None else float(meanU),
        componentsRemoved=removed,
        removedBy="reader" if (summary.get("postprocessing") or {}).get("segmentation_min_lesion") is not None
        else "uncertainty",
        singleVolume=len(sources) > 1 and len(set(sources)) == 1,
        picture=(summary.get("slicing") or {}).get("count") == 1,
        readerText=readerText,
        readerToolTip=readerToolTip,
        inputWarning=_inputWarning(summary),
    )


def _inputWarning(summary: Mapping) -> str:
    """The input check's reasons as one text (summary schema 2: ``input_check`` is a dict; older summaries hold a
    list of notes and no check)."""
    check = summary.get("input_check")
    reasons = check.get("reasons", []) if isinstance(check, Mapping) else []
    return "; ".join(str(r) for r in reasons)
