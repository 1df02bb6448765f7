"""A generic folder of the user's own data: images, masks and a label table.

Layout::

    <root>/
      images/<case>.<ext>          # one file per case; or images/<case>/ holding one file per channel
      masks/<case>.<ext>           # label map on the same grid (0 background, 1..K-1 segments)
      labels.csv                   # columns: case, label  (optional column: patient)

Extensions: volumes ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` (read with SimpleITK; a 4D
image gives one channel per volume); pictures ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff``
(Pillow; colour -> 3 channels R, G, B, grey -> 1 channel). With a per-case folder ``images/<case>/`` the files
in it, sorted by name, are the channels (e.g. ``0_pre.nii.gz``, ``1_early.nii.gz``, ``2_late.nii.gz``).

``label`` is a non-negative integer class index (``0/1``, ``yes/no``, ``true/false`` are accepted for binary
labels). ``patient`` (optional) groups several cases of one patient so that a split keeps them together.
Mask values are the labels as stored; the one exception is a binary mask saved as ``0 / 255``, which is read as
``0 / 1``. Every case listed in ``labels.csv`` needs an image and a mask (``incomplete`` decides what happens
otherwise); image files not listed in ``labels.csv`` are ignored and reported in ``skipped``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from .base import Case, DatasetAdapter, DatasetLayoutError, PathLike, parse_binary_label, read_image_2d, read_label_picture, read_table, read_volume

__all__ = ["FolderDataset", "VOLUME_EXTENSIONS", "PICTURE_EXTENSIONS"]

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SIDECARS = (".raw", ".zraw", ".raw.gz", ".img")  # data files of .nhdr / .mhd headers


def _split_ext(path: Path) -> tuple[str, str]:
    """``(stem, extension)`` with the double extension ``.nii.gz`` kept whole."""
    name = path.name
    low = name.lower()
    for ext in VOLUME_EXTENSIONS + PICTURE_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)], ext
    return path.stem, path.suffix.lower()


def _is_picture(path: Path) -> bool:
    return _split_ext(path)[1] in PICTURE_EXTENSIONS


def _read_any(path: Path) -> tuple[list[np.ndarray], tuple[float, ...], dict]:
    if _is_picture(path):
        arr = read_image_2d(path, mode="keep")
        channels = [arr] if arr.ndim == 2 else [c for c in arr]
        return channels, (1.0, 1.0), {"spacing_unit": "pixel"}
    return read_volume(path)


class FolderDataset(DatasetAdapter):
    """The user's own data in the ``images/``, ``masks/``, ``labels.csv`` layout (see the module docstring).

    Args:
        root: The dataset folder.
        labels_file: The label table (``.csv``, or ``.xlsx`` with openpyxl); default ``<root>/labels.csv``.
        class_names: Names of the classes, index = label (default ``("0", "1", ...)``).
        segment_names: Names of the mask labels, index = value (default: empty, the adapter does not open
            the masks to count labels; give them for reports and model cards).
        incomplete: ``"skip"``: listed cases without image or mask are left out (``self.skipped``);
            ``"error"``: they are an error.
    """

    name = "folder"

    def __init__(
        self,
        root: PathLike,
        labels_file: Optional[PathLike] = None,
        class_names: Optional[Sequence[str]] = None,
        segment_names: Optional[Sequence[str]] = None,
        incomplete: Literal["skip", "error"] = "skip",
    ) -> None:
        super().__init__(root)
        if incomplete not in ("skip", "error"):
            raise DatasetLayoutError(f"incomplete must be 'skip' or 'error', got {incomplete!r}")
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        table = Path(labels_file) if labels_file is not None else self.root / "labels.csv"
        missing = [str(p) for p in (image_dir, mask_dir) if not p.is_dir()]
        if not table.is_file():
            missing.append(str(table))
        if missing:
            raise DatasetLayoutError(f"folder dataset: missing {', '.join(missing)}; expected layout:\n{self.layout()}")

        images = self._index(image_dir, allow_folders=True)
        masks = self._index(mask_dir, allow_folders=False)

        try:
            rows = read_table(table, ["case", "label", "patient"])
            has_patient = True
        except DatasetLayoutError:
            rows = read_table(table, ["case", "label"])
            has_patient = False
        self._labels: dict[str, int] = {}
        self._groups: dict[str, str] = {}
        problems: dict[str, str] = {}
        listed = set()
        for row in rows:
            cid = str(row["case"]).strip()
            if not cid:
                continue
            if cid in listed:
                raise DatasetLayoutError(f"folder dataset: case {cid!r} is listed twice in {table.name}")
            listed.add(cid)
            lab = self._parse_label(row["label"], cid, table)
            if lab is None:
                problems[cid] = f"empty label in {table.name}"
            elif cid not in images:
                problems[cid] = f"no image images/{cid}.<ext> or images/{cid}/"
            elif cid not in masks:
                problems[cid] = f"no mask masks/{cid}.<ext>"
            else:
                self._labels[cid] = lab
                patient = row.get("patient") if has_patient else None
                self._groups[cid] = str(patient).strip() if patient not in (None, "") else cid
        if problems and incomplete == "error":
            listing = "\n".join(f"  {c}: {r}" for c, r in sorted(problems.items()))
            raise DatasetLayoutError(f"folder dataset: {len(problems)} incomplete case(s):\n{listing}")
        for cid in sorted(set(images) - listed):
            problems[cid] = f"image not listed in {table.name}"
        self.skipped = problems
        self._images = {c: images[c] for c in self._labels}
        self._masks = {c: masks[c] for c in self._labels}
        if not self._labels:
            raise DatasetLayoutError(
                f"folder dataset: no usable case in {self.root} (e.g. {next(iter(sorted(problems.items())), '-')}); "
                f"expected layout:\n{self.layout()}"
            )
        n_classes = max(max(self._labels.values()) + 1, 2)
        self.class_names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(n_classes))
        if len(self.class_names) < n_classes:
            raise DatasetLayoutError(
                f"folder dataset: {len(self.class_names)} class_names for labels up to {n_classes - 1}"
            )
        self.segment_names = tuple(segment_names) if segment_names is not None else ()

    @staticmethod
    def _parse_label(value, cid: str, table: Path) -> Optional[int]:
        text = "" if value is None else str(value).strip()
        try:
            num = float(text) if text else None
        except ValueError:
            num = None
        if num is not None and num.is_integer() and num >= 0:
            return int(num)
        try:
            return parse_binary_label(value)
        except DatasetLayoutError as exc:
            raise DatasetLayoutError(
                f"folder dataset: {table.name}, case {cid}: label {value!r} is not a class index (0, 1, 2, ...)"
            ) from exc

    @staticmethod
    def _index(folder: Path, allow_folders: bool) -> dict[str, object]:
        found: dict[str, object] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_dir():
                if not allow_folders:
                    continue
                files = sorted(
                    p for p in path.iterdir()
                    if p.is_file() and not p.name.startswith(".") and _split_ext(p)[1] in VOLUME_EXTENSIONS + PICTURE_EXTENSIONS
                )
                if not files:
                    raise DatasetLayoutError(f"folder dataset: {path} holds no image file")
                key, value = path.name, files
            else:
                stem, ext = _split_ext(path)
                if any(path.name.lower().endswith(s) for s in _SIDECARS):
                    continue
                if ext not in VOLUME_EXTENSIONS + PICTURE_EXTENSIONS:
                    raise DatasetLayoutError(
                        f"folder dataset: {path.name} has an unsupported extension; use one of "
                        f"{', '.join(VOLUME_EXTENSIONS + PICTURE_EXTENSIONS)}"
                    )
                key, value = stem, path
            if key in found:
                raise DatasetLayoutError(f"folder dataset: two files for case {key!r} in {folder}; keep one")
            found[key] = value
        return found

    @classmethod
    def layout(cls) -> str:
        return (
            "  <root>/images/<case>.nii.gz|.nrrd|.mha|.png|.jpg  (or images/<case>/ with one file per channel)\n"
            "  <root>/masks/<case>.nii.gz|.nrrd|.mha|.png        (label map, same grid)\n"
            "  <root>/labels.csv                                 (columns: case, label[, patient])"
        )

    def case_ids(self) -> list[str]:
        return sorted(self._labels)

    def labels(self) -> dict[str, int]:
        return dict(sorted(self._labels.items()))

    def groups(self) -> dict[str, str]:
        return {c: self._groups[c] for c in self.case_ids()}

    def load(self, case_id: str) -> Case:
        if case_id not in self._labels:
            raise self._unknown(case_id)
        entry = self._images[case_id]
        paths = entry if isinstance(entry, list) else [entry]
        channels: list[np.ndarray] = []
        spacing: Optional[tuple[float, ...]] = None
        geometry: dict = {}
        for p in paths:
            chans, sp, geo = _read_any(p)
            if spacing is None:
                spacing, geometry = sp, geo
            channels.extend(chans)
        mask_path = self._masks[case_id]
        mchans = [read_label_picture(mask_path)] if _is_picture(mask_path) else read_volume(mask_path)[0]
        if len(mchans) != 1:
            raise DatasetLayoutError(
                f"folder dataset {case_id}: mask {mask_path.name} has {len(mchans)} channels; save a single-channel "
                "label map (grey PNG / scalar volume)"
            )
        raw = mchans[0]
        shapes = {c.shape for c in channels}
        if len(shapes) != 1 or raw.shape != channels[0].shape:
            raise DatasetLayoutError(
                f"folder dataset {case_id}: image channel(s) {sorted(shapes)} and mask {raw.shape} differ in shape; "
                "images and mask must lie on one grid"
            )
        if not np.all(raw == np.round(raw)) or raw.min() < 0 or raw.max() > 255:
            raise DatasetLayoutError(
                f"folder dataset {case_id}: mask {mask_path.name} must hold integer labels 0..255"
            )
        values = np.unique(raw)
        mask = raw.astype(np.uint8)
        if values.size == 2 and values[0] == 0 and values[1] == 255:
            mask = (mask > 0).astype(np.uint8)
        return Case(
            case_id=case_id,
            images=channels,
            mask=mask,
            label=self._labels[case_id],
            spacing=tuple(spacing),  # type: ignore[arg-type]
            meta={
                "dataset": self.name,
                "patient_id": self._groups[case_id],
                "image_paths": [str(p) for p in paths],
                "mask_path": str(mask_path),
                **geometry,
            },
        )
