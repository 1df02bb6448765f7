"""The model card (``model.json``): what a bundle's network expects, and how its outputs become results.

Schema version 2. A schema-1 card is read through :func:`migrate_v1`, the one place that knows the old schema: it
drops the fields whose modes schema 2 removed when the card uses them as schema 2 behaves, and refuses the card,
naming the field and the fix, when it does not. Torch-free (the Slicer module and the catalogue read cards without
loading weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .config import UMLConfig
from .errors import BundleError

__all__ = ["SCHEMA_VERSION", "STACKING_TERMS", "MIN_TARGET_SIZE", "InputKind", "Segment", "Normalization",
           "MotionCorrection", "InputSpec", "ReaderConfig", "ModelCard", "card_digest", "card_from_dict", "migrate_v1"]

SCHEMA_VERSION = 2
_FIX = "re-export the bundle with python -m training.export (docs/training.md)"

#: The terms of the reader's stacked case opinion, in order (:func:`umlcore.fusion.stack_reader_opinion`): its
#: constant, the network's log-odds, and the log-odds of the most suspicious lesion's suspicion and reader outputs.
STACKING_TERMS = ("intercept", "network", "suspicion", "lesion", "spiculated", "washout")

MotionMode = Literal["none", "translation"]
#: What a model reads: ``"volume"`` (3D scans, sliced) or ``"picture"`` (2D pictures: fundus photos, dermoscopy).
InputKind = Literal["volume", "picture"]
#: What scanner or camera made the images a model was trained on (card ``input.modality``; ``None``: not declared).
MODALITIES = ("MR", "CT", "photo")
#: Smallest side of ``input.target_size`` (the network downsamples three times).
MIN_TARGET_SIZE = 8


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Segment:
    """One segmentation label (background, 0, is implicit). ``terminology`` holds DICOM-coded ``category`` /
    ``type`` (and optional ``region``) entries, each ``{"scheme": "SCT", "code": "...", "meaning": "..."}``."""

    label: int
    name: str
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)
    terminology: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Normalization:
    """Per-channel intensity normalisation over the whole volume: clip to the ``lower``/``upper`` percentiles then
    scale to [0, 1] (``percentile``), zero mean and unit variance (``zscore``), or ``none``."""

    mode: Literal["percentile", "zscore", "none"] = "percentile"
    lower: float = 0.5
    upper: float = 99.5


@dataclass(frozen=True)
class MotionCorrection:
    """How the phases of a multi-phase case are aligned before anything reads them (:mod:`umlcore.registration`):
    ``"none"``, or ``"translation"``: every other phase is moved onto the channel ``reference`` by the 3D translation
    that best aligns them, unless that translation is longer than ``max_shift_mm``."""

    mode: MotionMode = "none"
    reference: str = ""
    max_shift_mm: float = 10.0


@dataclass(frozen=True)
class InputSpec:
    """What the network expects per slice.

    Args:
        channels: Meaning of each input volume, e.g. ``("pre", "early", "late")``.
        min_channels: Fewest input volumes accepted; ``missing_channels == "replicate"`` lets one volume fill all.
        slicing_axis: Patient axis the 2D network slices along.
        target_spacing: In-plane spacing (mm) to resample to, ``(first, second)`` in-plane index axis, or ``None``.
        normalization: :class:`Normalization` of each channel.
        context_slices: 2.5D input: the network also sees this many neighbouring slices on each side as extra
            channels (``len(channels) * (2 * context_slices + 1)`` network channels); ``0``: 2D slices.
        motion_correction: :class:`MotionCorrection` of multi-phase cases.
        spacing_mm: ``(smallest, largest)`` voxel spacing in mm, along every axis, of the scans the model reads:
            a volume outside it (a header in metres, say) is refused; ``None``: any spacing.
        kind: ``"volume"``: the model reads 3D volumes slice by slice; ``"picture"``: it reads 2D pictures (one
            slice; channels e.g. ``("red", "green", "blue")`` or ``("grey",)``), which needs ``slicing_axis``
            ``"axial"``, ``context_slices`` 0 and no motion correction.
        target_size: ``(rows, columns)`` every slice is resized to (bilinearly, after normalisation) before the
            network, the outputs resized back to the input grid; both at least :data:`MIN_TARGET_SIZE`. ``None``:
            the slices' own size (or ``target_spacing``'s). Not with ``target_spacing``.
        modality: What made the training images (:data:`MODALITIES`: ``"MR"``, ``"CT"``, ``"photo"``), which the
            engine's input check compares the input with (:mod:`umlcore.inputcheck`); ``None``: not declared.
        body_region: The body region the model was trained on, e.g. ``"breast"`` (shown to users; ``None``: any).
    """

    channels: tuple[str, ...] = ("pre", "early", "late")
    min_channels: int = 1
    missing_channels: Literal["replicate"] = "replicate"
    slicing_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    target_spacing: Optional[tuple[float, float]] = None
    normalization: Normalization = Normalization()
    context_slices: int = 0
    motion_correction: MotionCorrection = MotionCorrection()
    spacing_mm: Optional[tuple[float, float]] = None
    kind: InputKind = "volume"
    target_size: Optional[tuple[int, int]] = None
    modality: Optional[str] = None
    body_region: Optional[str] = None

    def __post_init__(self) -> None:
        self._check_kind_and_size()
        if self.modality is not None and self.modality not in MODALITIES:
            raise BundleError(f"input.modality must be null or one of {list(MODALITIES)}, got {self.modality!r}: "
                              "fix model.json")
        r = self.spacing_mm
        if r is not None and (len(r) != 2 or not all(_is_number(v) for v in r) or not 0 < r[0] < r[1]):
            raise BundleError(f"input.spacing_mm must be null or [smallest, largest] mm with 0 < smallest < largest, "
                              f"got {r!r}: fix model.json")
        k = self.context_slices
        if not _is_int(k) or not 0 <= k <= 8:
            raise BundleError(f"input.context_slices must be an integer from 0 to 8, got {k!r}")
        mc = self.motion_correction
        if mc.mode not in ("none", "translation"):
            raise BundleError(f"input.motion_correction.mode must be 'none' or 'translation', got {mc.mode!r}: "
                              "fix model.json")
        if mc.mode == "translation":
            if mc.reference not in self.channels:
                raise BundleError(f"input.motion_correction.reference must name one of the channels "
                                  f"{list(self.channels)}, got {mc.reference!r}: fix model.json (e.g. \"early\")")
            if not _is_number(mc.max_shift_mm) or mc.max_shift_mm <= 0:
                raise BundleError(f"input.motion_correction.max_shift_mm must be a positive number of mm, got "
                                  f"{mc.max_shift_mm!r}: fix model.json (e.g. 10)")

    def _check_kind_and_size(self) -> None:
        """``kind`` and ``target_size``, and what a picture model cannot have (neighbouring slices, several phases)."""
        if self.kind not in ("volume", "picture"):
            raise BundleError(f"input.kind must be 'volume' or 'picture', got {self.kind!r}: fix model.json")
        t = self.target_size
        if t is not None and (len(t) != 2 or not all(_is_int(v) and v >= MIN_TARGET_SIZE for v in t)):
            raise BundleError(f"input.target_size must be null or [rows, columns], two integers of at least "
                              f"{MIN_TARGET_SIZE}, got {t!r}: fix model.json (e.g. [256, 256])")
        if t is not None and self.target_spacing is not None:
            raise BundleError("input.target_size and input.target_spacing are both set: a slice is resized to one "
                              "or the other; set one of them to null in model.json")
        if self.kind != "picture":
            return
        for name, value, needed in (("slicing_axis", self.slicing_axis, "axial"), ("context_slices", self.context_slices, 0),
                                    ("motion_correction.mode", self.motion_correction.mode, "none")):
            if value != needed:
                raise BundleError(f"input.{name} is {value!r} but a picture model (input.kind 'picture') reads one "
                                  f"2D picture: set input.{name} to {needed!r} in model.json")

    @property
    def motion_reference(self) -> Optional[int]:
        """The channel index the other phases are aligned to, or ``None`` without motion correction."""
        mc = self.motion_correction
        return None if mc.mode == "none" else self.channels.index(mc.reference)

    @property
    def network_channels(self) -> int:
        """Channels the network takes: every named channel at ``2 * context_slices + 1`` slices."""
        return len(self.channels) * (2 * self.context_slices + 1)


@dataclass(frozen=True)
class ReaderConfig:
    """The card's ``reader`` section: a lesion reader (:mod:`umlcore.reader`) for the multi-phase cases of a binary
    model, whose weights are the ``reader.*`` tensors of ``model.safetensors``.

    It checks the segmentation and reads the lesions kept: of the ``segmentation_max_components`` largest connected
    components of the network's labelmap, those it reads as lesions with probability at least
    ``segmentation_min_lesion`` stay in the labelmap; the ``max_components`` largest of those are read for the case
    opinion, a logistic model with the ``stacking`` coefficients (:data:`STACKING_TERMS`) of the network's opinion
    and the most suspicious lesion's outputs. ``stacking`` is ``None`` only in a bundle whose rule is not fitted yet
    (``python -m training.fit opinion``): its case opinion is then the network's.

    Args:
        width: Channels of the reader's first conv stage (then 2x and 4x).
        context_slices: Slices on either side of a component's widest slice in each patch.
        patch_size: Patch side in pixels (a multiple of 8, at least 16).
        pixel_mm: Patch pixel size in mm (patches are resampled bilinearly to it).
        max_components: How many of the kept lesions the case opinion reads.
        stacking: One coefficient per term of :data:`STACKING_TERMS`, or ``None``.
        segmentation_min_lesion: The check's threshold, a probability in (0, 1).
        segmentation_max_components: How many of the largest components the check reads.
        training: Provenance and validation figures (free form).
    """

    width: int = 16
    context_slices: int = 1
    patch_size: int = 80
    pixel_mm: float = 1.0
    max_components: int = 3
    stacking: Optional[dict[str, float]] = None
    segmentation_min_lesion: float = 0.75
    segmentation_max_components: int = 8
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not _is_int(self.width) or self.width < 1:
            problems.append(f"width must be a positive integer, got {self.width!r}")
        if not _is_int(self.context_slices) or not 0 <= self.context_slices <= 8:
            problems.append(f"context_slices must be an integer from 0 to 8, got {self.context_slices!r}")
        if not _is_int(self.patch_size) or self.patch_size < 16 or self.patch_size % 8:
            problems.append(f"patch_size must be a multiple of 8 of at least 16, got {self.patch_size!r}")
        if not _is_number(self.pixel_mm) or not 0 < self.pixel_mm <= 10:
            problems.append(f"pixel_mm must be a number in (0, 10], got {self.pixel_mm!r}")
        for name in ("max_components", "segmentation_max_components"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        c = self.stacking
        if c is not None and (not isinstance(c, dict) or set(c) != set(STACKING_TERMS)
                              or not all(_is_number(v) for v in c.values())):
            problems.append(f"stacking must be null or one finite number for each of {list(STACKING_TERMS)}, got {c!r}")
        t = self.segmentation_min_lesion
        if not _is_number(t) or not 0.0 < t < 1.0:
            problems.append(f"segmentation_min_lesion must be a probability in (0, 1), got {t!r}")
        if problems:
            raise BundleError("the card's reader section is invalid: " + "; ".join(problems))


@dataclass(frozen=True)
class ModelCard:
    """The content of ``model.json`` (everything but the weights).

    Args:
        positive_class: The class whose probability is reported as "the" probability.
        review_uncertainty: A case whose uncertainty exceeds it gets the verdict "review".
        case_calibration: ``{"slope", "intercept", ...}`` of a binary Platt calibration of the network's fused case
            opinion that keeps its strength (:func:`umlcore.fusion.calibrate_case_alpha`), for cases given as all
            channels. Not with a fitted reader, whose stacked rule is calibrated by its fit.
        single_volume_calibration: The same kind of calibration, used when the case was given as one volume
            replicated into every channel (a single phase or a subtraction image); the reader does not read those.
        component_max_uncertainty: Connected components of the segmentation whose mean voxel uncertainty exceeds
            it are removed from the labelmap the network's slice opinions are weighted by (and, without a reader
            check, from the labelmap written).
        reader: :class:`ReaderConfig`, or ``None``.
        changelog: One line per version, newest first: ``{"1.12.0": "what changed", ...}``.
        training, metrics: Provenance and measured figures (free form).
    """

    id: str
    version: str
    name: str
    task: str
    classes: tuple[str, ...]
    segments: tuple[Segment, ...]
    input: InputSpec
    architecture: UMLConfig
    description: str = ""
    positive_class: int = 1
    review_uncertainty: float = 0.3
    case_calibration: Optional[dict[str, Any]] = None
    single_volume_calibration: Optional[dict[str, Any]] = None
    component_max_uncertainty: Optional[float] = None
    reader: Optional[ReaderConfig] = None
    changelog: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    license: str = "Apache-2.0"
    citation: str = (
        "Ren K, Zou K, Liu X, Chen Y, Yuan X, Shen X, Wang M, Fu H. Uncertainty-informed Mutual Learning for Joint "
        "Medical Image Classification and Segmentation. MICCAI 2023."
    )

    def __post_init__(self) -> None:
        arch = self.architecture
        if len(self.classes) != arch.num_classes:
            raise BundleError(f"model card lists {len(self.classes)} classes but the architecture has {arch.num_classes}")
        if len(self.segments) != arch.num_seg_labels - 1:
            raise BundleError(f"model card lists {len(self.segments)} segments but the architecture has "
                              f"{arch.num_seg_labels - 1} (num_seg_labels minus background)")
        if not _is_int(self.positive_class) or not 0 <= self.positive_class < arch.num_classes:
            raise BundleError(f"positive_class must index one of the {arch.num_classes} classes, got {self.positive_class!r}")
        if not _is_number(self.review_uncertainty) or not 0.0 < self.review_uncertainty <= 1.0:
            raise BundleError(f"review_uncertainty must be a number in (0, 1], got {self.review_uncertainty!r}")
        for name in ("case_calibration", "single_volume_calibration"):
            c = getattr(self, name)
            if c is not None and (arch.num_classes != 2 or not isinstance(c, dict)
                                  or not all(_is_number(c.get(k)) for k in ("slope", "intercept"))):
                raise BundleError(f"{name} needs a binary model and the numbers 'slope' and 'intercept'")
        t = self.component_max_uncertainty
        if t is not None and not (_is_number(t) and 0.0 < t <= 1.0):
            raise BundleError(f"component_max_uncertainty must be a number in (0, 1] or null, got {t!r}")
        if self.reader is not None:
            if arch.num_classes != 2 or not isinstance(self.reader, ReaderConfig):
                raise BundleError("a reader needs a binary model (it reads one class's evidence) and a ReaderConfig")
            if self.reader.stacking is not None and self.case_calibration is not None:
                raise BundleError("a card whose reader has stacking coefficients takes its multi-phase calibration "
                                  "from them: remove case_calibration")
        if not isinstance(self.changelog, dict) or not all(isinstance(v, str) for v in self.changelog.values()):
            raise BundleError("changelog must map versions to one line of text each")
        if self.input.network_channels != arch.in_channels:
            k = self.input.context_slices
            raise BundleError(
                f"input spec names {len(self.input.channels)} channels"
                + (f" at {2 * k + 1} slices each ({self.input.network_channels} in all)" if k else "")
                + f" but the architecture takes {arch.in_channels}")

    @property
    def reader_channels(self) -> int:
        """Channels of the reader's patches: every named channel at ``2 * reader.context_slices + 1`` slices."""
        return len(self.input.channels) * (2 * self.reader.context_slices + 1) if self.reader is not None else 0

    def calibration_for(self, single_volume: bool) -> tuple[Optional[str], Optional[dict[str, Any]]]:
        """The Platt calibration of the network's case opinion and its card field (``None, None`` if none applies)."""
        if single_volume:
            name = "single_volume_calibration" if self.single_volume_calibration is not None else "case_calibration"
        else:
            name = "case_calibration"
        value = getattr(self, name)
        return (name, value) if value is not None else (None, None)

    def to_dict(self, sha256: str) -> dict[str, Any]:
        """The JSON object of ``model.json`` for weights with this ``sha256``, sealed with its own hash."""
        d = dataclasses.asdict(self)
        d["architecture"] = self.architecture.to_dict()
        out = {"schema_version": SCHEMA_VERSION, **d, "weights": {"file": "model.safetensors", "sha256": sha256}}
        out["weights"]["card_sha256"] = card_digest(out)
        return out


def card_digest(d: dict[str, Any]) -> str:
    """The SHA-256 of a ``model.json`` object without its ``weights`` section, in a canonical JSON form (sorted keys,
    no spaces): ``weights.card_sha256``, which makes a card edited after export evident."""
    body = {k: v for k, v in d.items() if k != "weights"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def card_from_dict(d: Any, source: str = "model.json") -> ModelCard:
    """Validate a ``model.json`` object (schema 2, or schema 1 through :func:`migrate_v1`) into a :class:`ModelCard`.

    Raises:
        BundleError: not an object, an unknown schema version, missing or invalid fields.
    """
    if not isinstance(d, dict):
        raise BundleError(f"{source} must hold a JSON object")
    if type(d.get("schema_version")) is int and d["schema_version"] == 1:
        d = migrate_v1(d, source)
    if d.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{source} has schema_version {d.get('schema_version')!r}; this UML reads schema_version "
                          f"1 and {SCHEMA_VERSION}: {_FIX}, or update UML")
    missing = [k for k in ("id", "version", "name", "task", "classes", "segments", "input", "architecture", "weights")
               if k not in d]
    if missing:
        raise BundleError(f"{source} is missing required field(s) {missing}: {_FIX}")
    known = {f.name for f in dataclasses.fields(ModelCard)}
    unknown = sorted(set(d) - known - {"schema_version", "weights"})
    if unknown:
        raise BundleError(f"{source} has unknown field(s) {unknown}: {_FIX}, or update UML")
    try:
        inp = dict(d["input"])
        inp["normalization"] = Normalization(**inp.get("normalization", {}))
        inp["motion_correction"] = MotionCorrection(**inp.get("motion_correction", {}))
        for key in ("target_spacing", "spacing_mm"):
            if inp.get(key) is not None:
                inp[key] = tuple(float(v) for v in inp[key])
        if inp.get("target_size") is not None:
            inp["target_size"] = tuple(inp["target_size"])
        if "channels" in inp:
            inp["channels"] = tuple(inp["channels"])
        fields = {k: v for k, v in d.items() if k in known}
        fields.update(
            classes=tuple(str(c) for c in d["classes"]),
            segments=tuple(Segment(label=int(s["label"]), name=str(s["name"]), color=tuple(s.get("color", (1, 0, 0))),
                                   terminology=dict(s.get("terminology", {}))) for s in d["segments"]),
            input=InputSpec(**inp),
            architecture=UMLConfig.from_dict(d["architecture"]),
            reader=None if d.get("reader") is None else ReaderConfig(**d["reader"]),
        )
        return ModelCard(**fields)
    except BundleError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise BundleError(f"{source} is not a valid model card ({exc}): {_FIX}") from None


def migrate_v1(d: dict[str, Any], source: str = "model.json") -> dict[str, Any]:
    """A schema-1 card as schema 2, where schema 2 gives the same results; refused otherwise.

    Schema 2 removed the network's mirrored test-time augmentation (``test_time_augmentation``), the 3D lesion
    refiner (``refiner``), and every reader rule but the one of the shipped cards since 1.10.0: the ``"stacked"``
    fusion at weight 1, read with the ``"dihedral"`` test-time augmentation, on the labelmap the reader checked
    (``opinion_reads: "checked"``), with an identity ``case_calibration``. A card that used any of those removed
    modes gave results schema 2 cannot reproduce, so it is refused with the field that differs.
    """
    d = dict(d)

    def refuse(what: str) -> None:
        raise BundleError(f"{source} is a schema-1 card that uses {what}, which UML removed in schema 2: retrain or "
                          "refit that part with python -m training (docs/training.md), or run the bundle with umlcore "
                          "0.1 (commit d735605)")

    if d.pop("test_time_augmentation", "none") != "none":
        refuse("the network's mirrored test-time augmentation (test_time_augmentation)")
    if d.pop("refiner", None) is not None:
        refuse("the 3D lesion refiner (refiner)")
    reader = d.get("reader")
    if isinstance(reader, dict):
        reader = dict(reader)
        for key, kept in (("fusion", "stacked"), ("weight", 1.0), ("opinion_reads", "checked"),
                          ("test_time_augmentation", "dihedral")):
            if reader.pop(key, None) != kept:
                refuse(f"the reader setting {key} other than {kept!r}")
        if reader.get("segmentation_min_lesion") is None:
            refuse("a reader that does not check the segmentation (segmentation_min_lesion null)")
        calibration = d.get("case_calibration")
        if calibration is not None:
            if not isinstance(calibration, dict) or (calibration.get("slope"), calibration.get("intercept")) != (1.0, 0.0):
                refuse("a case_calibration on top of the reader's stacked rule")
            d["case_calibration"] = None
        d["reader"] = reader
    d["schema_version"] = SCHEMA_VERSION
    return d
