"""Model bundles as the module sees them: what to show in the GUI and what the engine needs.

``readModelInfo`` reads a bundle's ``model.json`` with the standard library only, so the module can list
models before PyTorch is installed (importing ``umlcore`` imports torch). It checks what the module relies
on (schema version, required fields, segment labels, channel names, and the seal of a schema-2 card: its own
SHA-256 in ``weights.card_sha256``, so a card edited after export is listed as unusable) and leaves the
authoritative check of the weights to umlcore: ``validateModel`` runs ``python -m umlcore info`` in the engine's
Python (hash, schema, weights fit the architecture; Slicer's own Python never imports umlcore, which an installed
extension does not put on its ``sys.path``), and the engine repeats it before every run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from .engine import engineEnvironment, engineFailure
from .errors import EngineError, InputError
from .paths import defaultPythonExecutable, shippedModelDirectories, umlcorePythonPath, userModelDirectory

__all__ = [
    "CARD_FILE",
    "WEIGHTS_FILE",
    "SCHEMA_VERSION",
    "SCHEMA_VERSIONS",
    "DEFAULT_MODEL_ID",
    "INPUT_KINDS",
    "SLICING_AXES",
    "SegmentInfo",
    "ModelInfo",
    "ModelEntry",
    "cardDigest",
    "readModelInfo",
    "validateModel",
    "listModels",
    "resolveModel",
]

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
#: The card schema umlcore writes; :data:`SCHEMA_VERSIONS` are those this module reads (umlcore migrates schema 1).
SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)
DEFAULT_MODEL_ID = "uml-breast-dce-small"

#: What a model reads (card ``input.kind``): 3D volumes sliced along ``input.slicing_axis``, or 2D pictures.
INPUT_KINDS = ("volume", "picture")
#: Card ``input.slicing_axis`` values.
SLICING_AXES = ("axial", "coronal", "sagittal")

_REQUIRED = ("id", "version", "name", "task", "classes", "segments", "input", "architecture", "weights")
_FIX = "re-export the bundle with python -m training.export (docs/training.md) or pick another model"


@dataclass(frozen=True)
class SegmentInfo:
    """One output segment of a model (label 0, background, is implicit).

    Attributes:
        label: Value in the engine's labelmap.
        name: Segment name shown in Slicer.
        color: ``(r, g, b)`` in 0..1.
        terminology: DICOM codes, ``{"category": {"scheme", "code", "meaning"}, "type": {...}, ...}``.
    """

    label: int
    name: str
    color: tuple[float, float, float]
    terminology: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """What the module needs to know about a bundle (a light view of umlcore's ``ModelCard``).

    Attributes:
        path: The bundle (folder, ``.zip``, or ``model.json``) as given.
        id, version, name, task, description, citation: From the card.
        classes: Image-level class names (index = class index).
        segments: :class:`SegmentInfo` per non-background label.
        channels: Meaning of each input channel, e.g. ``("pre", "early", "late")`` or ``("red", "green", "blue")``.
        minChannels: Fewest input volumes the engine accepts (missing ones are replicated).
        kind: ``"volume"`` (3D volumes, read slice by slice) or ``"picture"`` (one 2D picture: PNG, JPEG... which
            Slicer loads as a single-slice volume, a vector volume when in colour).
        targetSize: ``(rows, columns)`` the engine resizes every slice (picture) to, or ``None`` (native size).
        slicingAxis: Patient axis the engine slices along (``"axial"``, ``"coronal"``, ``"sagittal"``).
        contextSlices: Neighbouring slices on each side the network sees with each slice (2.5D; 0 = 2D). The
            engine takes them from the same volumes, so it changes nothing about the inputs to give.
        positiveClass: Index of the class whose probability is "the" probability.
        reviewUncertainty: Case uncertainty above which the verdict is "review".
        sha256: Declared SHA-256 of the weights.
        trainingData: What the model was trained on (card ``training.data``; ``""`` when the card does not say).
    """

    path: Path
    id: str
    version: str
    name: str
    task: str
    classes: tuple[str, ...]
    segments: tuple[SegmentInfo, ...]
    channels: tuple[str, ...]
    minChannels: int = 1
    kind: str = "volume"
    targetSize: Optional[tuple[int, int]] = None
    slicingAxis: str = "axial"
    contextSlices: int = 0
    positiveClass: int = 1
    reviewUncertainty: float = 0.3
    sha256: str = ""
    description: str = ""
    citation: str = ""
    trainingData: str = ""

    @property
    def isPicture(self) -> bool:
        """True when the model reads one 2D picture (``input.kind`` picture) rather than 3D volumes."""
        return self.kind == "picture"

    @property
    def acceptedChannelCounts(self) -> tuple[int, ...]:
        """How many volumes (or a picture's colours) the engine takes: one per channel, or one replicated."""
        n = len(self.channels)
        return (1, n) if self.minChannels <= 1 and n > 1 else (n,)

    @property
    def label(self) -> str:
        """Text for a model selector, e.g. ``"UML breast DCE (small) 1.0.0"``."""
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class ModelEntry:
    """A bundle found while listing: ``info`` when readable, else the ``error`` message."""

    path: Path
    shipped: bool
    info: Optional[ModelInfo]
    error: Optional[str] = None


def _readCardText(path: Path) -> tuple[str, str]:
    """``(text of model.json, where it came from)`` for a bundle folder, ``.zip`` or ``model.json`` path."""
    if not path.exists():
        raise InputError(f"model {path} does not exist: choose a bundle folder (with {CARD_FILE}) or a .zip of one")
    if path.is_dir():
        card = path / CARD_FILE
        if not card.is_file():
            raise InputError(f"{path} is not a UML model bundle (no {CARD_FILE}): {_FIX}")
        return card.read_text(encoding="utf-8", errors="replace"), str(card)
    if path.name == CARD_FILE:
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if Path(n).name == CARD_FILE]
            if not names:
                raise InputError(f"{path} holds no {CARD_FILE}: {_FIX}")
            return zf.read(names[0]).decode("utf-8", errors="replace"), f"{path}!{names[0]}"
    raise InputError(f"{path} is not a UML model bundle: give a folder with {CARD_FILE} and {WEIGHTS_FILE}, or a .zip of one")


def _colour(value: Any, source: str) -> tuple[float, float, float]:
    try:
        rgb = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        raise InputError(f"{source}: segment colour {value!r} is not three numbers in 0..1: {_FIX}")
    return rgb  # type: ignore[return-value]


def cardDigest(card: Mapping[str, Any]) -> str:
    """The seal of a ``model.json`` object: the SHA-256 (hex) of the card without its ``weights`` section in a
    canonical JSON form (sorted keys, no spaces, ASCII), as ``umlcore.card.card_digest`` computes it (this module
    cannot import umlcore, which imports torch).

    Raises:
        ValueError: the card holds a value canonical JSON cannot hold (NaN, infinity): no card umlcore sealed does.
    """
    body = {k: v for k, v in card.items() if k != "weights"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _checkSeal(data: Mapping[str, Any], source: str) -> None:
    """Refuse a schema-2 card whose ``weights.card_sha256`` is missing or no longer matches it (edited after
    export); a schema-1 card has no seal to check."""
    if data.get("schema_version") == 1:
        return
    weights = data.get("weights")
    declared = weights.get("card_sha256") if isinstance(weights, dict) else None
    try:
        actual = cardDigest(data)
    except ValueError:
        actual = None
    if not isinstance(declared, str) or declared != actual:
        raise InputError(
            f"{source} was changed after the bundle was exported (it no longer matches weights.card_sha256): "
            f"restore the original card, or {_FIX}"
        )


def readModelInfo(path: Union[str, Path]) -> ModelInfo:
    """Read the card of a bundle without loading weights or importing torch.

    Args:
        path: Bundle folder, ``.zip`` or path of its ``model.json``.

    Returns:
        The :class:`ModelInfo`.

    Raises:
        InputError: missing file, not JSON, unknown schema version, missing fields, inconsistent segments, a
            schema-2 card edited after export (its ``weights.card_sha256`` is missing or no longer matches).
    """
    path = Path(path)
    text, source = _readCardText(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is not valid JSON ({exc.msg}, line {exc.lineno}): {_FIX}") from None
    if not isinstance(data, dict):
        raise InputError(f"{source} must hold a JSON object: {_FIX}")
    version = data.get("schema_version")
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        readable = " and ".join(str(v) for v in SCHEMA_VERSIONS)
        raise InputError(
            f"{source} has schema_version {version!r}; this module reads schema_version {readable}: {_FIX}, "
            "or update the UML extension"
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise InputError(f"{source} is missing required field(s) {missing}: {_FIX}")
    try:
        segments = tuple(
            SegmentInfo(
                label=int(s["label"]),
                name=str(s["name"]),
                color=_colour(s.get("color", (1.0, 0.0, 0.0)), source),
                terminology={str(k): {str(a): str(b) for a, b in dict(v).items()} for k, v in dict(s.get("terminology", {})).items()},
            )
            for s in data["segments"]
        )
        inp = dict(data["input"])
        channels = tuple(str(c) for c in inp.get("channels", ("pre", "early", "late")))
        weights = data["weights"]
        sha = str(weights.get("sha256", "")) if isinstance(weights, dict) else ""
        info = ModelInfo(
            path=path,
            id=str(data["id"]),
            version=str(data["version"]),
            name=str(data["name"]),
            task=str(data["task"]),
            classes=tuple(str(c) for c in data["classes"]),
            segments=segments,
            channels=channels,
            minChannels=int(inp.get("min_channels", 1)),
            kind=str(inp.get("kind", "volume")),
            targetSize=None if inp.get("target_size") is None else tuple(int(v) for v in inp["target_size"]),
            slicingAxis=str(inp.get("slicing_axis", "axial")),
            contextSlices=int(inp.get("context_slices", 0)),
            positiveClass=int(data.get("positive_class", 1)),
            reviewUncertainty=float(data.get("review_uncertainty", 0.3)),
            sha256=sha,
            description=str(data.get("description", "")),
            citation=str(data.get("citation", "")),
            trainingData=str((data.get("training") or {}).get("data", "")) if isinstance(data.get("training") or {}, dict) else "",
        )
    except InputError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"{source} is not a valid model card ({type(exc).__name__}: {exc}): {_FIX}") from None
    labels = [s.label for s in info.segments]
    if not labels or min(labels) < 1 or len(set(labels)) != len(labels) or max(labels) > 255:
        raise InputError(f"{source}: segment labels {labels} must be distinct integers in 1..255: {_FIX}")
    if not info.channels:
        raise InputError(f"{source}: input.channels is empty: {_FIX}")
    if info.kind not in INPUT_KINDS:
        raise InputError(f"{source}: input.kind {info.kind!r} is not one of {list(INPUT_KINDS)}: {_FIX}, or update the UML extension")
    if info.slicingAxis not in SLICING_AXES:
        raise InputError(f"{source}: input.slicing_axis {info.slicingAxis!r} is not one of {list(SLICING_AXES)}: {_FIX}")
    if info.targetSize is not None and len(info.targetSize) != 2:
        raise InputError(f"{source}: input.target_size {list(info.targetSize)} is not [rows, columns]: {_FIX}")
    if not 1 <= info.minChannels <= len(info.channels):
        raise InputError(f"{source}: input.min_channels {info.minChannels} is outside 1..{len(info.channels)}: {_FIX}")
    if len(info.classes) < 2 or not 0 <= info.positiveClass < len(info.classes):
        raise InputError(f"{source}: needs at least two classes and positive_class inside them: {_FIX}")
    if len(info.sha256) != 64:
        raise InputError(f"{source} lacks weights.sha256: {_FIX}")
    _checkSeal(data, source)
    return info


def validateModel(path: Union[str, Path], pythonExecutable: Optional[str] = None, timeoutSeconds: float = 300.0) -> ModelInfo:
    """Fully check a bundle the way the engine will: card, weights hash, weights fit the architecture.

    The check runs out of process (``python -m umlcore info BUNDLE --json`` with the engine's ``PYTHONPATH``), as
    every run does, so it works in an installed extension. Without torch only the card and the SHA-256 of a
    folder bundle's weights are checked.

    Args:
        path: Bundle folder, ``.zip`` or ``model.json``.
        pythonExecutable: The engine's interpreter (default: :func:`~.paths.defaultPythonExecutable`).
        timeoutSeconds: How long the check may take.

    Raises:
        InputError: with umlcore's message when the bundle is unusable.
        EngineError: the check itself could not run.
    """
    info = readModelInfo(path)
    bundle = Path(path)
    if _moduleAvailable("torch"):
        _checkWithEngine(bundle.parent if bundle.name == CARD_FILE else bundle, pythonExecutable, timeoutSeconds)
        return info
    folder = bundle.parent if bundle.name == CARD_FILE else bundle
    weights = folder / WEIGHTS_FILE
    if folder.is_dir():
        if not weights.is_file():
            raise InputError(f"{folder} has no {WEIGHTS_FILE}: a bundle needs {CARD_FILE} and {WEIGHTS_FILE}")
        digest = hashlib.sha256()
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != info.sha256:
            raise InputError(f"{weights} does not match the sha256 in {CARD_FILE} (changed or corrupted): restore or re-export the bundle")
    return info


def _checkWithEngine(bundle: Path, pythonExecutable: Optional[str], timeoutSeconds: float) -> None:
    """``python -m umlcore info BUNDLE --json`` in the engine's environment; its refusal as an error."""
    command = [pythonExecutable or defaultPythonExecutable(), "-m", "umlcore", "info", str(bundle), "--json"]
    try:
        done = subprocess.run(command, env=engineEnvironment(umlcorePythonPath()), capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=timeoutSeconds, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EngineError(f"checking the model {bundle} took more than {timeoutSeconds:g} s: try again") from None
    except OSError as exc:
        raise EngineError(f"could not start the UML engine ({command[0]}): {exc.strerror or exc}: check the Python executable") from None
    if done.returncode != 0:
        raise engineFailure(done.returncode, done.stderr.splitlines(), None)


def _moduleAvailable(name: str) -> bool:
    """True when ``import name`` would find a module (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _bundlesIn(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in sorted(directory.iterdir()) if (p / CARD_FILE).is_file() or p.suffix.lower() == ".zip"]


def listModels(extraDirectories: Iterable[Union[str, Path]] = ()) -> list[ModelEntry]:
    """Bundles in the shipped folders, the user's ``~/.uml/models`` and ``extraDirectories``; shipped first.

    Unreadable bundles are listed with their error instead of being dropped silently.
    """
    dirs = [(d, True) for d in shippedModelDirectories()] + [(userModelDirectory(), False)]
    dirs += [(Path(d), False) for d in extraDirectories]
    entries: list[ModelEntry] = []
    seen: set[Path] = set()
    for directory, shipped in dirs:
        for p in _bundlesIn(directory):
            key = p.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                entries.append(ModelEntry(p, shipped, readModelInfo(p)))
            except InputError as exc:
                entries.append(ModelEntry(p, shipped, None, str(exc)))
    return entries


def resolveModel(model: Union[None, str, Path, ModelInfo] = None, extraDirectories: Iterable[Union[str, Path]] = ()) -> ModelInfo:
    """A :class:`ModelInfo` from a bundle path, a model id, a ``ModelInfo``, or ``None`` (the default model).

    Raises:
        InputError: no such path or id, or no model at all.
    """
    if isinstance(model, ModelInfo):
        return model
    if model is not None:
        candidate = Path(model)
        looksLikePath = candidate.exists() or "/" in str(model) or "\\" in str(model) or str(model).endswith((".zip", ".json"))
        if looksLikePath:
            return readModelInfo(candidate)
    entries = listModels(extraDirectories)
    usable = [e.info for e in entries if e.info is not None]
    wanted = DEFAULT_MODEL_ID if model is None else str(model)
    for info in usable:
        if info.id == wanted:
            return info
    if model is None and usable:
        return usable[0]
    known = ", ".join(i.id for i in usable) or "none installed"
    if model is None:
        raise InputError(
            "no model given and no UML model is installed: pass model=<bundle folder> "
            "(or add one with 'Add model from file...')"
        )
    raise InputError(f"no model with id {wanted!r} (known: {known}): give a bundle folder, a .zip, or one of the known ids")
