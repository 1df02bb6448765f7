"""Model bundles (DESIGN section 6): ``model.safetensors`` (weights only) + ``model.json`` (the model card).

A bundle is a folder or a ``.zip`` of one. Loading verifies the schema version, the required fields, the
SHA-256 of the weights and that the weights fit the declared architecture; anything else is refused
with a :class:`~umlcore.errors.BundleError` naming the problem and the fix. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from safetensors.torch import load_file, save_file

from .config import UMLConfig
from .errors import BundleError
from .network import UMLNet
from .reader import LesionReader, ReaderConfig
from .refiner import EXTRA_CHANNELS, LesionRefiner, RefinerConfig
from .registration import MOTION_MODES, MotionMode

__all__ = [
    "SCHEMA_VERSION",
    "WEIGHTS_FILE",
    "CARD_FILE",
    "NETWORK_TTA_MODES",
    "Segment",
    "Normalization",
    "MotionCorrection",
    "InputSpec",
    "ModelCard",
    "ModelBundle",
    "save_bundle",
    "load_bundle",
    "read_card",
    "sha256_file",
]

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
READER_PREFIX = "reader."  # the lesion reader's tensors in model.safetensors
REFINER_PREFIX = "refiner."  # the lesion refiner's tensors in model.safetensors
NetworkTTA = Literal["none", "flip_w", "flip_hw"]
#: How the network reads each slice (card field ``test_time_augmentation``): once (``"none"``), or as it is and
#: mirrored along W (``"flip_w"``) or along W, H and both (``"flip_hw"``), the Dirichlet parameters of the views
#: (mirrored back) averaged. See :func:`umlcore.predictor.forward_views`.
NETWORK_TTA_MODES: tuple[str, ...] = ("none", "flip_w", "flip_hw")


@dataclass(frozen=True)
class Segment:
    """One segmentation label (background, 0, is implicit).

    ``terminology`` holds DICOM-coded ``category`` / ``type`` (and optional ``region``) entries, each
    ``{"scheme": "SCT", "code": "...", "meaning": "..."}``.
    """

    label: int
    name: str
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)
    terminology: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Normalization:
    """Per-channel intensity normalisation: clip to percentiles then scale to [0, 1] (``percentile``),
    zero mean / unit variance (``zscore``) or ``none``."""

    mode: Literal["percentile", "zscore", "none"] = "percentile"
    lower: float = 0.5
    upper: float = 99.5


@dataclass(frozen=True)
class MotionCorrection:
    """How the phases of a multi-phase case are aligned before the network reads them (:mod:`umlcore.registration`).

    Args:
        mode: ``"none"`` (read the phases as given; the rule of cards written before the field existed) or
            ``"translation"`` (every other phase is moved onto ``reference`` by the 3D translation that best aligns
            them). A case given as one volume has nothing to align.
        reference: With ``"translation"``: the channel (one of ``input.channels``) the others are aligned to,
            e.g. ``"early"``, the first post-contrast phase, where a lesion is seen and drawn.
        max_shift_mm: With ``"translation"``: a longer estimated translation is not applied.
    """

    mode: MotionMode = "none"
    reference: str = ""
    max_shift_mm: float = 10.0


@dataclass(frozen=True)
class InputSpec:
    """What the network expects per slice.

    Args:
        channels: Meaning of each network input channel, e.g. ``["pre", "early", "late"]``.
        min_channels: Fewest input volumes accepted; missing channels are filled per ``missing_channels``.
        missing_channels: ``replicate``: a single volume fills every channel (the network was trained so).
        slicing_axis: Patient axis the 2D network slices along.
        target_spacing: In-plane spacing (mm) to resample to, ``(first, second)`` in-plane index axis (``(x, y)``
            for axial slices of an axial acquisition), or ``None`` to keep the input's.
        normalization: :class:`Normalization`.
        context_slices: 2.5D input: the network also sees this many neighbouring slices on each side of the
            slice it segments, as extra channels (``umlcore.preprocess.with_context``: for each named channel,
            slices ``z - k .. z + k``; the edge slice repeats beyond the volume), so it takes
            ``len(channels) * (2 * context_slices + 1)`` channels. ``0``: plain 2D slices.
        motion_correction: :class:`MotionCorrection` of multi-phase cases (default: none).
    """

    channels: tuple[str, ...] = ("pre", "early", "late")
    min_channels: int = 1
    missing_channels: Literal["replicate"] = "replicate"
    slicing_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    target_spacing: Optional[tuple[float, float]] = None
    normalization: Normalization = Normalization()
    context_slices: int = 0
    motion_correction: MotionCorrection = MotionCorrection()

    def __post_init__(self) -> None:
        k = self.context_slices
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 8:
            raise BundleError(f"input.context_slices must be an integer from 0 to 8 (neighbouring slices on each side), got {k!r}")
        mc = self.motion_correction
        if mc.mode not in MOTION_MODES:
            raise BundleError(f"input.motion_correction.mode must be one of {list(MOTION_MODES)}, got {mc.mode!r}: "
                              "fix model.json (\"none\" reads the phases as given)")
        if mc.mode != "none":
            if mc.reference not in self.channels:
                raise BundleError(f"input.motion_correction.reference must name one of the channels "
                                  f"{list(self.channels)}, got {mc.reference!r}: fix model.json (e.g. \"early\")")
            m = mc.max_shift_mm
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < float("inf"):
                raise BundleError(f"input.motion_correction.max_shift_mm must be a positive number of mm, got {m!r}: "
                                  "fix model.json (e.g. 10)")

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
class ModelCard:
    """The content of ``model.json`` (everything but the weights).

    ``positive_class`` is the class whose probability is reported as "the" probability;
    ``review_uncertainty``: a case whose fused uncertainty exceeds it gets the verdict "review".
    ``case_calibration``: optional ``{"slope", "intercept", ...}`` of a binary Platt calibration of the fused case
    opinion that keeps its strength (:func:`umlcore.fusion.calibrate_case_alpha`), fitted on validation cases.
    ``single_volume_calibration``: optional, the same kind of calibration used *instead* when the case was given as
    one volume replicated into every channel (a single DCE phase or a subtraction image), whose opinions differ
    from those of all channels; fitted by ``training/calibrate_single_volume.py``.
    ``reader``: optional :class:`~umlcore.reader.ReaderConfig` of a lesion reader whose weights are the ``reader.*``
    tensors of ``model.safetensors``; its score is merged into the case opinion of multi-phase inputs.
    ``component_max_uncertainty``: optional; connected components of the segmentation (6-connected, all segments
    together) whose mean voxel uncertainty exceeds it are removed from the labelmap before the case opinion is
    fused (they stay visible in the uncertainty map). Chosen on validation cases by ``training/evaluate.py``.
    ``refiner``: optional :class:`~umlcore.refiner.RefinerConfig` of a lesion refiner whose weights are the
    ``refiner.*`` tensors of ``model.safetensors``; it redraws the small components of the labelmap of multi-phase
    inputs in 3D (one segment only).
    ``test_time_augmentation``: how the network reads each slice, one of :data:`NETWORK_TTA_MODES`: ``"none"``
    (once; the rule of cards written before the field existed), ``"flip_w"`` (as it is and mirrored left-right) or
    ``"flip_hw"`` (also mirrored up-down, and both: 4 views), the views' Dirichlet parameters averaged; for
    multi-phase inputs only (one volume is read once, as its ``single_volume_calibration`` was fitted). A card's
    multi-phase figures and calibration are measured with its rule.
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
    refiner: Optional[RefinerConfig] = None
    test_time_augmentation: NetworkTTA = "none"
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
            raise BundleError(
                f"model card lists {len(self.segments)} segments but the architecture has {arch.num_seg_labels - 1} "
                "(num_seg_labels minus background)"
            )
        for name in ("case_calibration", "single_volume_calibration"):
            c = getattr(self, name)
            if c is not None and (arch.num_classes != 2 or not isinstance(c, dict) or not {"slope", "intercept"} <= set(c)):
                raise BundleError(f"{name} needs a binary model and the keys 'slope' and 'intercept'")
        t = self.component_max_uncertainty
        if t is not None and not (isinstance(t, (int, float)) and 0.0 < t <= 1.0):
            raise BundleError(f"component_max_uncertainty must be a number in (0, 1] or null, got {t!r}")
        if self.reader is not None and (arch.num_classes != 2 or not isinstance(self.reader, ReaderConfig)):
            raise BundleError("a reader needs a binary model (its score is one class's probability) and a ReaderConfig")
        if self.refiner is not None and (arch.num_seg_labels != 2 or not isinstance(self.refiner, RefinerConfig)):
            raise BundleError("a refiner needs a model with one segment (num_seg_labels 2) and a RefinerConfig")
        if self.test_time_augmentation not in NETWORK_TTA_MODES:
            raise BundleError(f"test_time_augmentation must be one of {list(NETWORK_TTA_MODES)}, got "
                              f"{self.test_time_augmentation!r}: fix model.json (\"none\" reads each slice once)")
        if self.input.network_channels != arch.in_channels:
            k = self.input.context_slices
            raise BundleError(
                f"input spec names {len(self.input.channels)} channels"
                + (f" at {2 * k + 1} slices each ({self.input.network_channels} in all)" if k else "")
                + f" but the architecture takes {arch.in_channels}"
            )

    @property
    def reader_channels(self) -> int:
        """Channels of the reader's patches: every named channel at ``2 * reader.context_slices + 1`` slices."""
        return len(self.input.channels) * (2 * self.reader.context_slices + 1) if self.reader is not None else 0

    @property
    def refiner_channels(self) -> int:
        """Channels of the refiner's crops: every named channel, the foreground probability and the component."""
        return len(self.input.channels) + EXTRA_CHANNELS if self.refiner is not None else 0

    def calibration_for(self, single_volume: bool) -> tuple[Optional[str], Optional[dict[str, Any]]]:
        """The case calibration to apply, and the name of its card field (``None, None`` if there is none).

        Args:
            single_volume: The case was given as one volume replicated into every channel.
        """
        if single_volume and self.single_volume_calibration is not None:
            return "single_volume_calibration", self.single_volume_calibration
        if self.case_calibration is not None:
            return "case_calibration", self.case_calibration
        return None, None

    def to_dict(self, sha256: str) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["architecture"] = self.architecture.to_dict()
        return {"schema_version": SCHEMA_VERSION, **d, "weights": {"file": WEIGHTS_FILE, "sha256": sha256}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model.json") -> "ModelCard":
        if not isinstance(d, dict):
            raise BundleError(f"{source} must hold a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{source} has schema_version {version!r}; this umlcore reads schema_version {SCHEMA_VERSION}: "
                "re-export the bundle with training/export.py or update UML"
            )
        required = ["id", "version", "name", "task", "classes", "segments", "input", "architecture", "weights"]
        missing = [k for k in required if k not in d]
        if missing:
            raise BundleError(f"{source} is missing required field(s) {missing}: re-export the bundle with training/export.py")
        try:
            inp = dict(d["input"])
            norm = Normalization(**inp.pop("normalization", {}))
            motion = MotionCorrection(**inp.pop("motion_correction", {}))
            if inp.get("target_spacing") is not None:
                inp["target_spacing"] = tuple(float(v) for v in inp["target_spacing"])
            if "channels" in inp:
                inp["channels"] = tuple(inp["channels"])
            spec = InputSpec(normalization=norm, motion_correction=motion, **inp)
            segments = tuple(
                Segment(label=int(s["label"]), name=str(s["name"]), color=tuple(s.get("color", (1, 0, 0))),
                        terminology=dict(s.get("terminology", {})))
                for s in d["segments"]
            )
            known = {f.name for f in dataclasses.fields(cls)}
            extra = {k: v for k, v in d.items()
                     if k in known and k not in ("segments", "input", "architecture", "classes", "reader", "refiner")}
            if d.get("reader") is not None:
                extra["reader"] = ReaderConfig(**d["reader"])
            if d.get("refiner") is not None:
                extra["refiner"] = RefinerConfig(**d["refiner"])
            return cls(
                classes=tuple(str(c) for c in d["classes"]),
                segments=segments,
                input=spec,
                architecture=UMLConfig.from_dict(d["architecture"]),
                **extra,
            )
        except BundleError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise BundleError(f"{source} is not a valid model card ({exc}): re-export the bundle with training/export.py") from None


@dataclass
class ModelBundle:
    """A loaded, verified bundle: the card, the network in eval mode, where it came from, its hash, and the lesion
    reader and refiner (in eval mode) when the card has them."""

    card: ModelCard
    model: UMLNet
    path: Path
    sha256: str
    reader: Optional[LesionReader] = None
    refiner: Optional[LesionRefiner] = None


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(model: UMLNet, card: ModelCard, directory: os.PathLike, overwrite: bool = False,
                reader: Optional[LesionReader] = None, refiner: Optional[LesionRefiner] = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` atomically.

    The files are written into a temporary sibling folder which then replaces ``directory``, so a
    failure never leaves a half-written bundle. A ``reader`` (needs ``card.reader``) is stored as the
    ``reader.*`` tensors of ``model.safetensors``, a ``refiner`` (needs ``card.refiner``) as its ``refiner.*`` tensors.
    """
    directory = Path(directory)
    if model.config != card.architecture:
        raise BundleError("the model's config differs from card.architecture: build the card from model.config")
    if (reader is None) != (card.reader is None):
        raise BundleError("give a reader exactly when the card has a reader section (and the other way round)")
    if (refiner is None) != (card.refiner is None):
        raise BundleError("give a refiner exactly when the card has a refiner section (and the other way round)")
    if directory.exists() and not overwrite:
        raise BundleError(f"{directory} already exists: choose another folder or pass overwrite=True")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if reader is not None:
            state.update({f"{READER_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in reader.state_dict().items()})
        if refiner is not None:
            state.update({f"{REFINER_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in refiner.state_dict().items()})
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})  # one key: a deterministic header
        digest = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / CARD_FILE).write_text(json.dumps(card.to_dict(digest), indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _bundle_dir(path: Path, stack: list) -> Path:
    """A folder holding the bundle files; a zip is extracted into a temporary folder kept in ``stack``."""
    if not path.exists():
        raise BundleError(f"model {path} does not exist: give a bundle folder or .zip, or a model id from `uml models`")
    if path.is_dir():
        return path
    if zipfile.is_zipfile(path):
        tmp = tempfile.TemporaryDirectory(prefix="uml-bundle-")
        stack.append(tmp)
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if Path(n).name in (CARD_FILE, WEIGHTS_FILE)]
            for n in names:
                if Path(n).is_absolute() or ".." in Path(n).parts:
                    raise BundleError(f"{path} contains an unsafe path {n!r}: rebuild the zip from the bundle folder")
                (Path(tmp.name) / Path(n).name).write_bytes(zf.read(n))
        return Path(tmp.name)
    if path.name == CARD_FILE:
        return path.parent
    raise BundleError(f"{path} is not a model bundle: give a folder (or .zip) with {CARD_FILE} and {WEIGHTS_FILE}")


def read_card(path: os.PathLike) -> tuple[ModelCard, str]:
    """Read and validate the card of a bundle without loading the weights; returns ``(card, declared_sha256)``."""
    stack: list = []
    directory = _bundle_dir(Path(path), stack)
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise BundleError(f"{path} has no {CARD_FILE}: a bundle needs {CARD_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{card_path} is not valid JSON ({exc}): re-export the bundle") from None
    card = ModelCard.from_dict(data, source=str(card_path))
    declared = data["weights"].get("sha256") if isinstance(data["weights"], dict) else None
    if not isinstance(declared, str) or len(declared) != 64:
        raise BundleError(f"{card_path} lacks weights.sha256: re-export the bundle with training/export.py")
    return card, declared


def load_bundle(path: os.PathLike, device: str | torch.device = "cpu") -> ModelBundle:
    """Load and verify a bundle (folder, ``.zip``, or the path of its ``model.json``).

    Raises:
        BundleError: missing files, unknown schema version, missing fields, hash mismatch, or weights
            that do not fit the architecture.
    """
    path = Path(path)
    stack: list = []
    try:
        directory = _bundle_dir(path, stack)
        card, declared = read_card(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise BundleError(f"{path} has no {WEIGHTS_FILE}: a bundle needs {CARD_FILE} and {WEIGHTS_FILE}")
        digest = sha256_file(weights)
        if digest != declared:
            raise BundleError(
                f"{weights} does not match the sha256 in {CARD_FILE} (file was changed or corrupted): "
                "restore the original bundle or re-export it"
            )
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{weights} is not a readable safetensors file ({exc}): re-export the bundle") from None
        reader_state = {k[len(READER_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(READER_PREFIX)}
        refiner_state = {k[len(REFINER_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(REFINER_PREFIX)}
        model = UMLNet(card.architecture)
        reader = refiner = None
        try:
            model.load_state_dict(state, strict=True)
            if card.reader is not None:
                reader = LesionReader(card.reader_channels, card.reader.width)
                reader.load_state_dict(reader_state, strict=True)
                reader.eval().to(device)
            elif reader_state:
                raise RuntimeError("reader.* tensors but no reader section in the card")
            if card.refiner is not None:
                refiner = LesionRefiner(card.refiner_channels, card.refiner.width)
                refiner.load_state_dict(refiner_state, strict=True)
                refiner.eval().to(device)
            elif refiner_state:
                raise RuntimeError("refiner.* tensors but no refiner section in the card")
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BundleError(f"weights in {path} do not fit the declared architecture ({first}): re-export the bundle") from None
        model.eval().to(device)
        return ModelBundle(card=card, model=model, path=path, sha256=digest, reader=reader, refiner=refiner)
    finally:
        for tmp in stack:
            tmp.cleanup()
