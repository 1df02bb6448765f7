"""I-SPY1 breast DCE-MRI (pCR prediction + tumour segmentation) in the layout the UML paper's code reads.

The official UML repository (``datasets/datasets_preprocess/ispy_preprocess.py``) expects::

    <root>/
      Dataset ISPY/
        ISPY_<SUBJECTID>/DCEMRI_1.nii          # the DCE-MRI volume (3D, or 4D = one volume per phase)
      Tumor_segmentation_new/
        ISPY_<SUBJECTID>_tumor_mask.nii        # tumour mask on the same grid (any value > 0 = tumour)
      outcome_new.xlsx                         # columns SUBJECTID, PCR (0 / 1)

``.nii.gz`` works wherever ``.nii`` is named. The outcome table may also be ``outcome_new.csv`` (same columns;
this is the documented, dependency-free form); ``.xlsx`` needs ``openpyxl``. Each subject (patient) is one
case, ``case_id = "ISPY_<SUBJECTID>"``; the split unit is the patient. Label 1 = pCR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from .base import Case, DatasetAdapter, DatasetLayoutError, PathLike, parse_binary_label, read_table, read_volume

__all__ = ["ISPY1Dataset"]

_NII = (".nii", ".nii.gz")


def _subject_id(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, float):
        if value != value:  # nan
            return None
        if value.is_integer():
            value = int(value)
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].isdigit():
        text = text[:-2]
    if text.upper().startswith("ISPY_"):
        text = text[5:]
    return text or None


def _find_nii(folder: Path, stem: str) -> Optional[Path]:
    for ext in _NII:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


class ISPY1Dataset(DatasetAdapter):
    """I-SPY1 cases with pCR labels and tumour masks.

    Args:
        root: The download folder (holding ``Dataset ISPY``, ``Tumor_segmentation_new`` and the outcome table).
        phases: File stems inside each ``ISPY_<id>`` folder, one per channel, in channel order
            (default ``("DCEMRI_1",)``, the volume the UML paper used). A 4D file contributes one channel per
            volume.
        outcome: The outcome table; default: ``outcome_new.csv`` or ``outcome_new.xlsx`` in ``root``.
        id_column: Subject-id column of the outcome table.
        label_column: Label column of the outcome table (1 = pCR).
        image_dir: Name of the image folder under ``root``.
        mask_dir: Name of the mask folder under ``root``.
        incomplete: ``"skip"``: subjects without a label, image or mask are left out and listed in
            ``self.skipped``; ``"error"``: any such subject is an error.
    """

    name = "I-SPY1"
    class_names = ("no pCR", "pCR")
    segment_names = ("background", "tumour")

    def __init__(
        self,
        root: PathLike,
        phases: Sequence[str] = ("DCEMRI_1",),
        outcome: Optional[PathLike] = None,
        id_column: str = "SUBJECTID",
        label_column: str = "PCR",
        image_dir: str = "Dataset ISPY",
        mask_dir: str = "Tumor_segmentation_new",
        incomplete: Literal["skip", "error"] = "skip",
    ) -> None:
        super().__init__(root)
        if incomplete not in ("skip", "error"):
            raise DatasetLayoutError(f"incomplete must be 'skip' or 'error', got {incomplete!r}")
        if isinstance(phases, str) or not phases:
            raise DatasetLayoutError(f"phases must be a non-empty list of file stems, e.g. ['DCEMRI_1'], got {phases!r}")
        self.phases = tuple(str(p) for p in phases)
        self.image_root = self.root / image_dir
        self.mask_root = self.root / mask_dir
        missing = [p for p in (self.image_root, self.mask_root) if not p.is_dir()]
        if missing:
            raise DatasetLayoutError(
                f"I-SPY1: missing folder(s) {', '.join(repr(str(p)) for p in missing)}; expected layout:\n{self.layout()}"
            )
        self.outcome_path = self._find_outcome(outcome)
        rows = read_table(self.outcome_path, [id_column, label_column])

        table: dict[str, Optional[int]] = {}
        problems: dict[str, str] = {}
        for row in rows:
            sid = _subject_id(row[id_column])
            if sid is None:
                continue
            try:
                table[sid] = parse_binary_label(row[label_column])
            except DatasetLayoutError as exc:
                raise DatasetLayoutError(f"I-SPY1: {self.outcome_path.name}, subject {sid}: {exc}") from exc

        folders = {
            p.name[5:]: p for p in self.image_root.iterdir() if p.is_dir() and p.name.upper().startswith("ISPY_")
        }
        self._images: dict[str, list[Path]] = {}
        self._masks: dict[str, Path] = {}
        self._labels: dict[str, int] = {}
        for sid in sorted(set(table) | set(folders)):
            cid = f"ISPY_{sid}"
            if sid not in table:
                problems[cid] = f"not in {self.outcome_path.name}"
                continue
            if table[sid] is None:
                problems[cid] = f"empty {label_column} in {self.outcome_path.name}"
                continue
            if sid not in folders:
                problems[cid] = f"no folder {self.image_root.name}/{cid}"
                continue
            images = [_find_nii(folders[sid], ph) for ph in self.phases]
            if any(p is None for p in images):
                absent = [ph for ph, p in zip(self.phases, images) if p is None]
                problems[cid] = f"no {', '.join(a + '.nii' for a in absent)} in {self.image_root.name}/{cid}"
                continue
            mask = _find_nii(self.mask_root, f"{cid}_tumor_mask")
            if mask is None:
                problems[cid] = f"no {self.mask_root.name}/{cid}_tumor_mask.nii"
                continue
            self._images[cid] = images  # type: ignore[assignment]
            self._masks[cid] = mask
            self._labels[cid] = int(table[sid])  # type: ignore[arg-type]

        if problems and incomplete == "error":
            listing = "\n".join(f"  {c}: {r}" for c, r in sorted(problems.items()))
            raise DatasetLayoutError(f"I-SPY1: {len(problems)} incomplete subject(s):\n{listing}")
        self.skipped = problems
        if not self._labels:
            raise DatasetLayoutError(
                f"I-SPY1: no usable subject in {self.root} ({len(problems)} incomplete, e.g. "
                f"{next(iter(sorted(problems.items())), ('-', '-'))}); expected layout:\n{self.layout()}"
            )

    @classmethod
    def layout(cls) -> str:
        return (
            "  <root>/Dataset ISPY/ISPY_<SUBJECTID>/DCEMRI_1.nii\n"
            "  <root>/Tumor_segmentation_new/ISPY_<SUBJECTID>_tumor_mask.nii\n"
            "  <root>/outcome_new.csv (or .xlsx with openpyxl): columns SUBJECTID, PCR (0/1)"
        )

    def _find_outcome(self, outcome: Optional[PathLike]) -> Path:
        if outcome is not None:
            path = Path(outcome)
            if not path.is_absolute() and not path.is_file():
                path = self.root / path
            if not path.is_file():
                raise DatasetLayoutError(f"I-SPY1: outcome table {path} not found")
            return path
        for name in ("outcome_new.csv", "outcome_new.xlsx"):
            if (self.root / name).is_file():
                return self.root / name
        raise DatasetLayoutError(
            f"I-SPY1: no outcome table in {self.root}; put outcome_new.csv (columns SUBJECTID, PCR) or "
            f"outcome_new.xlsx there, or pass outcome=<path>; expected layout:\n{self.layout()}"
        )

    def case_ids(self) -> list[str]:
        return sorted(self._labels)

    def labels(self) -> dict[str, int]:
        return dict(sorted(self._labels.items()))

    def groups(self) -> dict[str, str]:
        return {cid: cid[5:] for cid in self.case_ids()}

    def load(self, case_id: str) -> Case:
        if case_id not in self._labels:
            raise self._unknown(case_id)
        channels: list[np.ndarray] = []
        spacing = geometry = None
        for path in self._images[case_id]:
            vols, sp, geo = read_volume(path)
            if spacing is None:
                spacing, geometry = sp, geo
            channels.extend(vols)
        mask_vols, _, _ = read_volume(self._masks[case_id])
        mask = (mask_vols[0] > 0).astype(np.uint8)
        shapes = {tuple(c.shape) for c in channels}
        if len(shapes) != 1 or mask.shape != channels[0].shape:
            raise DatasetLayoutError(
                f"I-SPY1 {case_id}: image(s) {sorted(shapes)} and mask {mask.shape} are not on one voxel grid; "
                "resample the mask onto the DCE-MRI volume"
            )
        return Case(
            case_id=case_id,
            images=channels,
            mask=mask,
            label=self._labels[case_id],
            spacing=tuple(spacing),
            meta={
                "dataset": self.name,
                "patient_id": case_id[5:],
                "image_paths": [str(p) for p in self._images[case_id]],
                "mask_path": str(self._masks[case_id]),
                "label_source": str(self.outcome_path),
                **(geometry or {}),
            },
        )
