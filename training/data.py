"""What a run trains on: ``--data KIND:PATH``, its split, and its cases prepared exactly as the predictor reads them.

``synthetic`` is the generator (:mod:`training.splits` gives its seeds); every other kind is a dataset folder read by
an adapter of :mod:`training.datasets` (``folder``, ``ispy1``, ``refuge``, ``isic2017``; layouts in
docs/datasets.md). A dataset run splits its cases once (patient-level, stratified by label), writes the split as
``OUT/split.json`` and describes the data as ``OUT/dataset.json`` (:class:`DatasetInfo`): what ``export`` writes into
the card (input kind and channels, classes, segments) and what ``evaluate`` reads back.

A case is prepared (:func:`prepare_case`) as the predictor prepares it: each channel normalised over the whole
volume or picture, sliced along the axial index axis (a picture is one slice), and resized in-plane to the card's
``target_size`` when one is set (bilinear for the image, nearest for the mask).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from umlcore.card import Normalization, Segment
from umlcore.errors import UMLInputError
from umlcore.preprocess import inplane_axes, normalize, resize_slices, slice_axis_index, to_slices

from .datasets import ADAPTERS, Case, DatasetAdapter, open_dataset, read_split, write_split
from .slices import VolumeCase
from .workers import ordered_map

__all__ = ["DATA_KINDS", "SliceMode", "SliceLabel", "DataSpec", "DatasetInfo", "Preparation", "SYNTHETIC_INFO",
           "LESION", "adapter", "describe", "resolve_split", "split_sha256", "prepare_case", "load_case",
           "check_labels", "checked", "StreamedCases"]

DATA_KINDS = ("synthetic", *sorted(ADAPTERS))
#: Which slices of a training case are trained on: every slice, or those around the largest segmented cross-section.
SliceMode = Literal["all", "largest-lesion"]
#: A slice's class target: the case label on every slice (``case``), or on the slices with a segment and 0 on the
#: others (``lesion``: the class says what the segment is, as in the synthetic suspicion task).
SliceLabel = Literal["case", "lesion"]

#: The lesion segment, coded as 3D Slicer's terminology codes it (SNOMED CT).
LESION = Segment(label=1, name="Lesion", color=(0.90, 0.35, 0.10), terminology={
    "category": {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"},
    "type": {"scheme": "SCT", "code": "4147007", "meaning": "Mass"},
    "region": {"scheme": "SCT", "code": "76752008", "meaning": "Breast"}})

_MASS = {"category": {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"},
         "type": {"scheme": "SCT", "code": "4147007", "meaning": "Mass"}}
#: How the adapters' segments look in Slicer: colour and (where a code is certain) terminology.
_SEGMENT_LOOKS: dict[str, tuple[tuple[float, float, float], dict]] = {
    "tumour": ((0.90, 0.35, 0.10), {**_MASS, "region": LESION.terminology["region"]}),
    "lesion": ((0.85, 0.45, 0.20), _MASS),
    "optic disc rim": ((0.95, 0.80, 0.20), {}),
    "optic cup": ((0.20, 0.55, 0.95), {}),
}
_PALETTE = ((0.90, 0.35, 0.10), (0.20, 0.55, 0.95), (0.30, 0.75, 0.35), (0.85, 0.30, 0.75), (0.95, 0.80, 0.20))


@dataclass(frozen=True)
class DataSpec:
    """``--data``: ``synthetic``, or ``KIND:PATH`` with KIND one of :data:`DATA_KINDS`."""

    kind: str
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        kind, _, path = str(text).partition(":")
        if kind not in DATA_KINDS or (kind == "synthetic") != (path == ""):
            raise UMLInputError(f"--data must be 'synthetic' or KIND:PATH with KIND one of {', '.join(DATA_KINDS[1:])} "
                                f"(e.g. refuge:/data/REFUGE), got {text!r}")
        return cls(kind, path)

    def __str__(self) -> str:
        return self.kind if self.kind == "synthetic" else f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class DatasetInfo:
    """What a run's data is, for the card: ``OUT/dataset.json``."""

    data: str  # the --data text
    name: str
    input_kind: Literal["volume", "picture"]
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    segments: tuple[Segment, ...]
    split_sha256: str = ""  # of OUT/split.json ("" for synthetic data: its split is training.splits)
    cases: dict = dataclasses.field(default_factory=dict)  # cases per split

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DatasetInfo":
        d = json.loads(text)
        segments = tuple(Segment(s["label"], s["name"], tuple(s["color"]), s.get("terminology", {}))
                         for s in d.pop("segments"))
        return cls(**{**d, "channels": tuple(d["channels"]), "classes": tuple(d["classes"]), "segments": segments})


SYNTHETIC_INFO = DatasetInfo("synthetic", "synthetic breast DCE-MRI (umlcore.synthetic)", "volume",
                             ("pre", "early", "late"), ("low suspicion", "high suspicion"), (LESION,))


@dataclass(frozen=True)
class Preparation:
    """How a dataset case becomes a :class:`~training.slices.VolumeCase` (the run's settings)."""

    normalization: Normalization = Normalization()
    target_size: tuple[int, ...] = ()  # (rows, columns) every slice is resized to; () keeps the native size
    slices: SliceMode = "all"
    lesion_slices: int = 10  # with slices "largest-lesion": the segmented slices kept nearest the largest section
    slice_label: SliceLabel = "case"


# ------------------------------------------------------------------------------------------------ datasets
@functools.lru_cache(maxsize=4)
def adapter(spec: DataSpec) -> DatasetAdapter:
    """The adapter of a dataset ``spec`` (opened once per process: worker processes open their own)."""
    return open_dataset(spec.kind, spec.path)


def _channel_names(case: Case, picture: bool, spec: DataSpec) -> tuple[str, ...]:
    n = case.num_channels
    if picture:
        return ("red", "green", "blue") if n == 3 else ("grey",) if n == 1 else tuple(f"channel{i + 1}" for i in range(n))
    phases = getattr(adapter(spec), "phases", ())
    if len(phases) == n:
        return tuple(phases)
    return ("image",) if n == 1 else tuple(f"channel{i + 1}" for i in range(n))


def _segments(names: Sequence[str], n_labels: int) -> tuple[Segment, ...]:
    """Segments 1..n_labels-1, named by the adapter where it names them, coloured and coded where known."""
    segments = []
    for label in range(1, n_labels):
        name = names[label] if label < len(names) else f"segment {label}"
        color, terminology = _SEGMENT_LOOKS.get(name.lower(), (_PALETTE[(label - 1) % len(_PALETTE)], {}))
        segments.append(Segment(label, name[:1].upper() + name[1:], color, terminology))
    return tuple(segments)


def describe(spec: DataSpec, split: dict[str, list[str]], split_path: Path) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset: its first training case says whether it holds pictures or volumes
    and how many channels; a folder dataset whose segments are not named has its masks read to count them."""
    data = adapter(spec)
    first = data.load(split["train"][0])
    picture = first.mask.ndim == 2
    names = tuple(data.segment_names)
    if len(names) < 2:
        ids = [c for part in split.values() for c in part]
        n_labels = 1 + max(int(data.load(c).mask.max()) for c in ids)
    else:
        n_labels = len(names)
    return DatasetInfo(str(spec), data.name, "picture" if picture else "volume", _channel_names(first, picture, spec),
                       tuple(data.class_names), _segments(names, max(n_labels, 2)), split_sha256(split_path),
                       {k: len(v) for k, v in split.items()})


def split_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_split(spec: DataSpec, given: str, fractions: Sequence[float], seed: int, out: Path) -> dict[str, list[str]]:
    """The run's split, written to ``OUT/split.json``: ``given`` (a split file; every case must exist) or a new
    patient-level, label-stratified split of the dataset; a resumed run keeps its own."""
    data, path = adapter(spec), out / "split.json"
    if given:
        split = read_split(given)
        unknown = sorted(set(c for part in split.values() for c in part) - set(data.case_ids()))
        if unknown:
            raise UMLInputError(f"--split {given} names {len(unknown)} case(s) that {spec} does not hold (e.g. "
                                f"{unknown[0]!r}): give the split of this dataset")
    elif path.exists():
        split = read_split(path)
    else:
        split = data.split(tuple(fractions), seed)
    if not split["train"] or not split["val"]:
        raise UMLInputError(f"the split of {spec} has {len(split['train'])} training and {len(split['val'])} validation "
                            "cases: a run needs both (more cases, or other --split-fractions)")
    write_split(split, path)
    return split


# -------------------------------------------------------------------------------------------------- cases
def _training_slices(mask: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` segmented slices nearest the one with the largest segmented area, in slice order (all slices
    when none has a segment), as the UML paper's I-SPY1 preprocessing keeps 10 tumour slices a case."""
    area = mask.reshape(mask.shape[0], -1).astype(bool).sum(axis=1)
    segmented = np.flatnonzero(area)
    if not segmented.size:
        return np.arange(mask.shape[0])
    centre = int(np.argmax(area))
    nearest = sorted(segmented, key=lambda z: (abs(int(z) - centre), z))[:count]
    return np.sort(np.asarray(nearest))


def _resize(channels: np.ndarray, mask: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(C, S, H, W)`` bilinear and ``(S, H, W)`` nearest to ``size`` in-plane, as the predictor resizes."""
    x = torch.from_numpy(np.ascontiguousarray(channels.swapaxes(0, 1)))  # (S, C, H, W)
    x = resize_slices(x, tuple(size)).numpy().swapaxes(0, 1)
    m = F.interpolate(torch.from_numpy(mask[:, None].astype(np.float32)), size=tuple(size), mode="nearest-exact")
    return np.ascontiguousarray(x, dtype=np.float32), m[:, 0].numpy().astype(np.uint8)


def prepare_case(case: Case, prep: Preparation, training: bool) -> VolumeCase:
    """A dataset case as the network reads it (training cases keep only their ``prep.slices``)."""
    if case.mask.ndim == 2:  # a picture: one slice
        channels = np.stack([normalize(c, prep.normalization) for c in case.images])[:, None]
        mask, spacing = case.mask[None], (float(case.spacing[0]), float(case.spacing[1]), 1.0)
    else:
        axis = slice_axis_index(case.meta.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1)), "axial")
        w_axis, h_axis = inplane_axes(axis)
        channels = np.stack([to_slices(normalize(c, prep.normalization), axis) for c in case.images])
        mask = to_slices(case.mask, axis)
        spacing = (float(case.spacing[w_axis]), float(case.spacing[h_axis]), float(case.spacing[axis]))
    if training and prep.slices == "largest-lesion":
        keep = _training_slices(mask, prep.lesion_slices)
        channels, mask = channels[:, keep], mask[keep]
    if prep.target_size:
        h, w = mask.shape[1:]
        channels, mask = _resize(channels, mask, prep.target_size)
        spacing = (spacing[0] * w / prep.target_size[1], spacing[1] * h / prep.target_size[0], spacing[2])
    empty = np.zeros((0, *mask.shape), np.float32)
    return VolumeCase(case.case_id, np.ascontiguousarray(channels, dtype=np.float32), empty,
                      np.ascontiguousarray(mask, dtype=np.uint8), int(case.label), int(case.label), spacing,
                      prep.slice_label)


def load_case(job: tuple[DataSpec, str, Preparation, bool]) -> VolumeCase:
    """Worker entry: ``(spec, case_id, preparation, training)`` -> the prepared case."""
    spec, case_id, prep, training = job
    return prepare_case(adapter(spec).load(case_id), prep, training)


def check_labels(case: VolumeCase, info: DatasetInfo) -> None:
    """Refuse a case whose mask or class lies outside what the run's network predicts."""
    top = int(case.mask.max()) if case.mask.size else 0
    if top > len(info.segments) or not 0 <= case.label < len(info.classes):
        raise UMLInputError(f"case {case.case_id} has mask label {top} and class {case.label}, but the run predicts "
                            f"segments 1..{len(info.segments)} and classes 0..{len(info.classes) - 1}: fix the case or "
                            "name the segments and classes")


def checked(cases: Iterator[VolumeCase], info: DatasetInfo) -> Iterator[VolumeCase]:
    """``cases`` with :func:`check_labels` on each; closing it closes ``cases`` (and its workers)."""
    try:
        for case in cases:
            check_labels(case, info)
            yield case
    finally:
        close = getattr(cases, "close", None)
        if close is not None:
            close()


class StreamedCases:
    """Cases loaded anew at every pass, by ``workers`` processes (the validation set of a run that does not hold
    its cases in memory)."""

    def __init__(self, jobs: list, workers: int, info: DatasetInfo) -> None:
        self.jobs, self.workers, self.info = jobs, workers, info

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[VolumeCase]:
        return checked(ordered_map(load_case, self.jobs, self.workers), self.info)
