"""The shared interface of the dataset adapters: :class:`Case`, :class:`DatasetAdapter`, patient-level splits.

An adapter reads one public dataset (or the user's own folder) in its *original* layout and hands out
:class:`Case` objects with raw intensities; normalisation, slicing and augmentation are the training script's
business. Adapters check their layout in ``__init__`` and raise :class:`DatasetLayoutError` naming what is
missing and the layout they expect (see ``docs/datasets.md``).

Array conventions
-----------------
- ``Case.images`` is a list with one array per channel (DCE phase, or R/G/B), all of one shape:
  ``(Z, Y, X)`` float32 for volumes (the SimpleITK ``GetArrayFromImage`` order), ``(H, W)`` float32 for 2D
  images. ``np.stack(case.images)`` (or ``case.array``) is ``(C, Z, Y, X)`` / ``(C, H, W)``.
- ``Case.mask`` is a uint8 label map of that same spatial shape: 0 background, 1..K-1 the segments.
- ``Case.spacing`` is in ITK order: ``(x, y, z)`` mm for volumes, ``(x, y)`` for 2D images (``(1.0, 1.0)``,
  i.e. pixel units, when the file carries no physical spacing). Pass it as is to ``umlcore.metrics.hd95``.
"""

from __future__ import annotations

import csv
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

try:  # the umlcore error hierarchy when available (exit code 2 in CLIs), a plain ValueError otherwise
    from umlcore.errors import UMLInputError as _InputErrorBase
except ImportError:  # pragma: no cover - umlcore is installed with the training requirements
    _InputErrorBase = ValueError  # type: ignore[misc,assignment]

__all__ = [
    "Case",
    "DatasetAdapter",
    "DatasetLayoutError",
    "SPLIT_NAMES",
    "split_cases",
    "write_split",
    "read_split",
    "read_table",
    "parse_binary_label",
    "read_volume",
    "read_image_2d",
    "read_label_picture",
]

PathLike = Union[str, Path]
SPLIT_NAMES = ("train", "val", "test")


class DatasetLayoutError(_InputErrorBase):
    """A dataset folder, file or table that does not match the expected layout (the message says how)."""


@dataclass
class Case:
    """One case (patient / eye / lesion image) with raw intensities.

    Attributes:
        case_id: Unique id within the dataset (e.g. ``"ISPY_1001"``, ``"g0001"``, ``"ISIC_0000000"``).
        images: One float32 array per channel, ``(Z, Y, X)`` (volume) or ``(H, W)`` (2D), all of one shape.
        mask: uint8 label map of the same spatial shape (0 background, 1..K-1 segments).
        label: Case-level class index (e.g. pCR 1 / no pCR 0).
        spacing: ITK-order voxel size ``(x, y, z)`` or pixel size ``(x, y)``.
        meta: Free-form provenance: file paths, patient id, origin / direction, label source, ...
    """

    case_id: str
    images: list[np.ndarray]
    mask: np.ndarray
    label: int
    spacing: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(f"case {self.case_id}: images is empty; give at least one channel")
        shape = self.images[0].shape
        for i, img in enumerate(self.images):
            if img.shape != shape:
                raise ValueError(f"case {self.case_id}: channel {i} has shape {img.shape}, channel 0 {shape}")
        if self.mask.shape != shape:
            raise ValueError(f"case {self.case_id}: mask shape {self.mask.shape} differs from image shape {shape}")
        if len(self.spacing) != len(shape):
            raise ValueError(f"case {self.case_id}: spacing {self.spacing} needs {len(shape)} values")

    @property
    def array(self) -> np.ndarray:
        """The channels stacked: ``(C, Z, Y, X)`` or ``(C, H, W)`` float32."""
        return np.stack(self.images).astype(np.float32, copy=False)

    @property
    def num_channels(self) -> int:
        return len(self.images)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)


class DatasetAdapter(ABC):
    """A dataset in its original layout. Subclasses validate the layout in ``__init__``.

    Attributes:
        root: The dataset folder.
        class_names: Names of the case-level classes, index = label.
        segment_names: Names of the mask labels, index = label value (0 = background).
        skipped: Cases found but left out (incomplete, no label...), ``{case_id: reason}``.
    """

    name: str = "dataset"
    class_names: tuple[str, ...] = ()
    segment_names: tuple[str, ...] = ()

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetLayoutError(
                f"{self.name}: dataset folder {self.root} does not exist or is not a folder; "
                f"expected layout:\n{self.layout()}"
            )
        self.skipped: dict[str, str] = {}

    @classmethod
    @abstractmethod
    def layout(cls) -> str:
        """A short text drawing of the expected folder layout (used in error messages)."""

    @abstractmethod
    def case_ids(self) -> list[str]:
        """The usable case ids, sorted."""

    @abstractmethod
    def load(self, case_id: str) -> Case:
        """Read one case from disk."""

    @abstractmethod
    def labels(self) -> dict[str, int]:
        """``{case_id: class index}`` of all usable cases (no image is read)."""

    def groups(self) -> dict[str, str]:
        """``{case_id: patient id}``, the unit a split must keep together (default: each case its own)."""
        return {cid: cid for cid in self.case_ids()}

    def split(self, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> dict[str, list[str]]:
        """:func:`split_cases` over this dataset's cases, labels and patient groups."""
        return split_cases(self.case_ids(), self.labels(), fractions=fractions, seed=seed, groups=self.groups())

    def __len__(self) -> int:
        return len(self.case_ids())

    def __iter__(self) -> Iterator[Case]:
        for cid in self.case_ids():
            yield self.load(cid)

    def _unknown(self, case_id: str) -> DatasetLayoutError:
        ids = self.case_ids()
        preview = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        reason = f" (left out: {self.skipped[case_id]})" if case_id in self.skipped else ""
        return DatasetLayoutError(f"{self.name}: no usable case {case_id!r}{reason}; known cases: {preview}")


# --------------------------------------------------------------------------------------------------------------
# splits


def _largest_remainder(n: int, fractions: np.ndarray) -> np.ndarray:
    raw = fractions * n
    counts = np.floor(raw + 1e-9).astype(np.int64)
    rest = n - int(counts.sum())
    # hand out the remaining items by largest fractional part; ties go to the earlier split
    order = sorted(range(len(fractions)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def split_cases(
    case_ids: Sequence[str],
    labels: Mapping[str, int],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    groups: Optional[Mapping[str, str]] = None,
) -> dict[str, list[str]]:
    """Deterministic, patient-level, label-stratified train / val / test split.

    Cases are first gathered into patients (``groups``; default each case is its own patient), so all cases of
    a patient land in one split. Patients are stratified by label (a patient's label is the most frequent
    label of its cases, the smallest on a tie); within each label the patients, sorted by id, are shuffled with
    ``numpy.random.default_rng(seed)`` and cut by ``fractions`` with largest-remainder rounding. The result
    depends only on the set of ids, labels, fractions and seed — not on the order of ``case_ids``.

    Args:
        case_ids: The cases to split (unique).
        labels: ``{case_id: class index}``; every case needs one.
        fractions: Three non-negative fractions (train, val, test) that sum to 1.
        seed: Shuffle seed.
        groups: ``{case_id: patient id}``; cases absent from it are their own patient.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each list sorted.
    """
    ids = [str(c) for c in case_ids]
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise DatasetLayoutError(f"case_ids must be unique; repeated: {dup[:5]}")
    frac = np.asarray(list(fractions), dtype=np.float64)
    if frac.shape != (len(SPLIT_NAMES),) or np.any(frac < 0) or not math.isclose(frac.sum(), 1.0, abs_tol=1e-6):
        raise DatasetLayoutError(
            f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {tuple(fractions)}"
        )
    missing = [c for c in ids if c not in labels]
    if missing:
        raise DatasetLayoutError(f"{len(missing)} case(s) have no label, e.g. {missing[:5]}; give labels for all")
    groups = dict(groups or {})
    members: dict[str, list[str]] = {}
    for c in ids:
        members.setdefault(str(groups.get(c, c)), []).append(c)
    patient_label: dict[str, int] = {}
    for pid, cs in members.items():
        values, counts = np.unique([int(labels[c]) for c in cs], return_counts=True)
        patient_label[pid] = int(values[np.argmax(counts)])

    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for lab in sorted(set(patient_label.values())):
        pids = sorted(p for p, lb in patient_label.items() if lb == lab)
        pids = [pids[i] for i in rng.permutation(len(pids))]
        counts = _largest_remainder(len(pids), frac)
        start = 0
        for name, cnt in zip(SPLIT_NAMES, counts):
            for pid in pids[start:start + cnt]:
                out[name].extend(members[pid])
            start += cnt
    return {name: sorted(v) for name, v in out.items()}


def write_split(split: Mapping[str, Sequence[str]], path: PathLike) -> Path:
    """Write a split as JSON ``{"train": [...], "val": [...], "test": [...]}`` (checked by :func:`read_split`)."""
    clean = _check_split({str(k): [str(c) for c in v] for k, v in split.items()}, source="split")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return path


def read_split(path: PathLike) -> dict[str, list[str]]:
    """Read a split written by :func:`write_split`; checks the names and that no case is in two splits."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"split file {path} not found; create one with write_split(split_cases(...), path)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(f"split file {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DatasetLayoutError(f"split file {path} must hold an object of lists, e.g. {{\"train\": [\"case1\"]}}")
    return _check_split({str(k): [str(c) for c in v] for k, v in data.items()}, source=str(path))


def _check_split(split: dict[str, list[str]], source: str) -> dict[str, list[str]]:
    unknown = sorted(set(split) - set(SPLIT_NAMES))
    if unknown:
        raise DatasetLayoutError(f"{source}: unknown split name(s) {unknown}; use {list(SPLIT_NAMES)}")
    seen: dict[str, str] = {}
    for name, ids in split.items():
        for c in ids:
            if c in seen:
                raise DatasetLayoutError(f"{source}: case {c!r} is in both {seen[c]!r} and {name!r}")
            seen[c] = name
    return {name: list(split.get(name, [])) for name in SPLIT_NAMES}


# --------------------------------------------------------------------------------------------------------------
# tables


def _norm_header(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch.isalnum())


def read_table(path: PathLike, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` or ``.xlsx`` table as dicts holding the requested columns.

    Column names match case-insensitively, ignoring spaces and punctuation (``"Glaucoma Label"`` matches
    ``"glaucoma_label"``). ``.xlsx`` needs ``openpyxl`` (the first sheet that has all the columns is used).

    Args:
        path: The table file.
        columns: The column names wanted; the returned dicts use these names as keys.

    Returns:
        One dict per data row (rows with every requested cell empty are dropped); values are strings for CSV
        and the cell values (str / int / float / None) for XLSX.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"table {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f)]
        sheets = [rows]
    elif suffix in (".xlsx", ".xlsm"):
        try:
            import openpyxl
        except ImportError as exc:
            raise DatasetLayoutError(
                f"reading {path.name} needs openpyxl (pip install openpyxl), or save the sheet as CSV "
                f"({path.with_suffix('.csv').name}) with the columns {list(columns)}"
            ) from exc
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            sheets = [[list(r) for r in ws.iter_rows(values_only=True)] for ws in book.worksheets]
        finally:
            book.close()
    else:
        raise DatasetLayoutError(f"table {path} must be a .csv or .xlsx file")

    wanted = {_norm_header(c): c for c in columns}
    seen_headers: list[str] = []
    for rows in sheets:
        if not rows:
            continue
        header = ["" if h is None else str(h) for h in rows[0]]
        seen_headers = header
        index = {}
        for i, h in enumerate(header):
            key = _norm_header(h)
            if key in wanted and wanted[key] not in index:
                index[wanted[key]] = i
        if len(index) < len(columns):
            continue
        out = []
        for r in rows[1:]:
            rec = {c: (r[i] if i < len(r) else None) for c, i in index.items()}
            if all(v is None or (isinstance(v, str) and not v.strip()) for v in rec.values()):
                continue
            out.append(rec)
        return out
    raise DatasetLayoutError(
        f"table {path} needs the columns {list(columns)}; found {[h for h in seen_headers if h]}"
    )


_TRUE = {"1", "yes", "y", "true", "t", "pcr", "positive", "pos", "glaucoma", "melanoma"}
_FALSE = {"0", "no", "n", "false", "f", "nonpcr", "negative", "neg", "nonglaucoma", "benign"}


def parse_binary_label(value: Any) -> Optional[int]:
    """``0`` / ``1`` from a table cell (1, 1.0, "1", "yes", "true"...); ``None`` for an empty / NA cell.

    Raises:
        DatasetLayoutError: For anything else (e.g. ``2`` or ``"maybe"``).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            return None
        if value in (0, 1):
            return int(value)
        raise DatasetLayoutError(f"label value {value!r} is not binary (0/1)")
    text = str(value).strip()
    if text.lower() in ("", "na", "n/a", "nan", "none", "null", "."):
        return None
    key = "".join(ch for ch in text.lower() if ch.isalnum())
    try:
        num = float(text)
    except ValueError:
        num = None
    if num is not None and num in (0.0, 1.0):
        return int(num)
    if key in _TRUE:
        return 1
    if key in _FALSE:
        return 0
    raise DatasetLayoutError(f"label value {value!r} is not binary (use 0/1)")


# --------------------------------------------------------------------------------------------------------------
# image reading


def read_volume(path: PathLike) -> tuple[list[np.ndarray], tuple[float, ...], dict[str, Any]]:
    """Read a 3D (or 4D multi-phase) medical image with SimpleITK (nibabel as a fallback for odd NIfTI).

    Returns:
        ``(channels, spacing, geometry)``: a list of ``(Z, Y, X)`` float32 arrays (one for a 3D image, one per
        volume of a 4D image), the ITK-order spacing ``(x, y, z)``, and ``{"origin", "direction"}``.
    """
    path = Path(path)
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as sitk_error:
        return _read_volume_nibabel(path, sitk_error)
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise DatasetLayoutError(f"{path}: vector-pixel images are not supported; store one phase per volume")
    dim = img.GetDimension()
    if dim == 3:
        channels = [arr.astype(np.float32, copy=False)]
        spacing = tuple(float(s) for s in img.GetSpacing())
        origin = tuple(float(o) for o in img.GetOrigin())
        direction = tuple(float(d) for d in img.GetDirection())
    elif dim == 4:
        channels = [a.astype(np.float32, copy=False) for a in arr]  # (T, Z, Y, X)
        spacing = tuple(float(s) for s in img.GetSpacing()[:3])
        origin = tuple(float(o) for o in img.GetOrigin()[:3])
        d4 = np.asarray(img.GetDirection()).reshape(4, 4)
        direction = tuple(float(d) for d in d4[:3, :3].reshape(-1))
    elif dim == 2:
        channels = [arr[None].astype(np.float32, copy=False)]
        spacing = tuple(float(s) for s in img.GetSpacing()) + (1.0,)
        origin = tuple(float(o) for o in img.GetOrigin()) + (0.0,)
        direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    else:
        raise DatasetLayoutError(f"{path}: expected a 3D or 4D image, got {dim}D")
    return channels, spacing, {"origin": origin, "direction": direction}


def _read_volume_nibabel(path: Path, sitk_error: Exception):
    try:
        import nibabel as nib

        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - report both readers' complaints
        raise DatasetLayoutError(f"cannot read {path}: SimpleITK: {sitk_error}; nibabel: {exc}") from exc
    zooms = img.header.get_zooms()
    if data.ndim == 3:
        vols = [data]
    elif data.ndim == 4:
        vols = [data[..., t] for t in range(data.shape[3])]
    else:
        raise DatasetLayoutError(f"{path}: expected a 3D or 4D image, got {data.ndim}D")
    # nibabel arrays are (i, j, k) = (x, y, z): transpose to the (Z, Y, X) order of SimpleITK
    channels = [np.ascontiguousarray(np.transpose(v, (2, 1, 0))).astype(np.float32) for v in vols]
    return channels, tuple(float(z) for z in zooms[:3]), {"origin": None, "direction": None, "reader": "nibabel"}


def read_image_2d(path: PathLike, mode: str = "RGB") -> np.ndarray:
    """Read a 2D picture (JPEG, PNG, BMP, ...) with Pillow.

    Args:
        path: The image file.
        mode: ``"RGB"`` -> ``(3, H, W)``; ``"L"`` (grey) -> ``(H, W)``; ``"keep"`` -> ``(H, W)`` for single-band
            images and ``(3, H, W)`` for colour ones (alpha dropped).

    Returns:
        A float32 array of raw 0..255 values (uint8 images) — ``(3, H, W)`` or ``(H, W)``.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "keep":
                target = "L" if im.mode in ("1", "L", "P", "I", "I;16", "F") and not _palette_is_colour(im) else "RGB"
            else:
                target = mode
            if im.mode in ("I", "I;16", "F") and target == "L":
                arr = np.asarray(im, dtype=np.float32)
            else:
                arr = np.asarray(im.convert(target), dtype=np.float32)
    except OSError as exc:
        raise DatasetLayoutError(f"cannot read image {path}: {exc}") from exc
    if arr.ndim == 3:
        arr = np.ascontiguousarray(np.transpose(arr, (2, 0, 1)))
    return arr


def read_label_picture(path: PathLike) -> np.ndarray:
    """Read a 2D label map (PNG / BMP / TIFF) keeping the stored values: palette images give their indices.

    Returns:
        ``(H, W)`` float32 array of the stored label values (colour images must be grey, R = G = B).
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA"):
                im = im.convert(im.mode[:-1])
            arr = np.asarray(im)
    except OSError as exc:
        raise DatasetLayoutError(f"cannot read label map {path}: {exc}") from exc
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])):
            raise DatasetLayoutError(
                f"label map {path} is a colour image; save it as a grey or palette PNG whose values are the labels"
            )
        arr = arr[..., 0]
    return arr.astype(np.float32)


def _palette_is_colour(im) -> bool:
    if im.mode != "P":
        return False
    rgb = np.asarray(im.convert("RGB"))
    return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
