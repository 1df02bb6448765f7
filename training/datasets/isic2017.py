"""ISIC 2017 (Skin Lesion Analysis Towards Melanoma Detection): melanoma classification + lesion segmentation.

The challenge downloads unpack to (any subset of the three parts, at any depth under one root)::

    <root>/
      ISIC-2017_Training_Data/ISIC_0000000.jpg, ...            # (+ *_superpixels.png, ignored)
      ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png   # 0 background, 255 lesion
      ISIC-2017_Training_Part3_GroundTruth.csv                 # image_id, melanoma, seborrheic_keratosis
      ISIC-2017_Validation_Data/ ... _Validation_Part1_GroundTruth/ ... _Validation_Part3_GroundTruth.csv
      ISIC-2017_Test_v2_Data/ ... _Test_v2_Part1_GroundTruth/ ... _Test_v2_Part3_GroundTruth.csv

Cases are the rows of the ``*_Part3_GroundTruth.csv`` tables (``case_id`` = ``image_id``, e.g.
``ISIC_0000000``); the subset name (``Training``, ``Validation``, ``Test_v2``) is in ``meta["subset"]``. The
label is the ``melanoma`` column by default (1 = melanoma). Masks map 0 -> 0 (background), 255 -> 1 (lesion)
(any value >= 128 is lesion). The public ground truth has no patient ids, so each image is its own split unit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from .base import Case, DatasetAdapter, DatasetLayoutError, PathLike, parse_binary_label, read_image_2d, read_table

__all__ = ["ISIC2017Dataset"]

_IMAGE_RE = re.compile(r"^(ISIC_\d{7})\.(jpg|jpeg|png)$", re.IGNORECASE)
_MASK_RE = re.compile(r"^(ISIC_\d{7})_segmentation\.png$", re.IGNORECASE)
_TABLE_RE = re.compile(r"^ISIC-2017_(.+)_Part3_GroundTruth\.csv$", re.IGNORECASE)


class ISIC2017Dataset(DatasetAdapter):
    """ISIC 2017 dermoscopy images with melanoma labels and lesion masks.

    Args:
        root: Folder holding the unpacked ISIC 2017 parts.
        subsets: Restrict to these subsets (e.g. ``("Training",)``); default: every ``*_Part3_GroundTruth.csv``
            found.
        label_column: ``"melanoma"`` (default) or ``"seborrheic_keratosis"``.
        incomplete: ``"skip"``: table rows without an image or mask are left out (``self.skipped``);
            ``"error"``: they are an error.
    """

    name = "ISIC 2017"
    class_names = ("not melanoma", "melanoma")
    segment_names = ("background", "lesion")

    def __init__(
        self,
        root: PathLike,
        subsets: Optional[Sequence[str]] = None,
        label_column: Literal["melanoma", "seborrheic_keratosis"] = "melanoma",
        incomplete: Literal["skip", "error"] = "skip",
    ) -> None:
        super().__init__(root)
        if incomplete not in ("skip", "error"):
            raise DatasetLayoutError(f"incomplete must be 'skip' or 'error', got {incomplete!r}")
        if label_column not in ("melanoma", "seborrheic_keratosis"):
            raise DatasetLayoutError(f"label_column must be 'melanoma' or 'seborrheic_keratosis', got {label_column!r}")
        if label_column == "seborrheic_keratosis":
            self.class_names = ("not seborrheic keratosis", "seborrheic keratosis")

        tables: dict[str, Path] = {}
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            m = _TABLE_RE.match(path.name)
            if m:
                tables[m.group(1)] = path
                continue
            m = _MASK_RE.match(path.name)
            if m:
                self._add(masks, m.group(1), path, "mask")
                continue
            m = _IMAGE_RE.match(path.name)
            if m:
                self._add(images, m.group(1), path, "image")
        if not tables:
            raise DatasetLayoutError(
                f"ISIC 2017: no ISIC-2017_*_Part3_GroundTruth.csv under {self.root}; expected layout:\n{self.layout()}"
            )
        if subsets is not None:
            wanted = {s.lower(): s for s in subsets}
            unknown = sorted(set(wanted) - {k.lower() for k in tables})
            if unknown:
                raise DatasetLayoutError(
                    f"ISIC 2017: subset(s) {[wanted[u] for u in unknown]} not found; available: {sorted(tables)}"
                )
            tables = {k: v for k, v in tables.items() if k.lower() in wanted}
        if not images:
            raise DatasetLayoutError(f"ISIC 2017: no ISIC_<7 digits>.jpg image under {self.root}; expected layout:\n{self.layout()}")
        if not masks:
            raise DatasetLayoutError(
                f"ISIC 2017: no ISIC_<7 digits>_segmentation.png mask under {self.root} (the Part1 ground truth); "
                f"expected layout:\n{self.layout()}"
            )

        self._labels: dict[str, int] = {}
        self._subset: dict[str, str] = {}
        self._extra: dict[str, dict] = {}
        problems: dict[str, str] = {}
        for subset, table in sorted(tables.items()):
            for row in read_table(table, ["image_id", "melanoma", "seborrheic_keratosis"]):
                cid = str(row["image_id"]).strip()
                try:
                    lab = parse_binary_label(row[label_column])
                    other = {k: parse_binary_label(row[k]) for k in ("melanoma", "seborrheic_keratosis")}
                except DatasetLayoutError as exc:
                    raise DatasetLayoutError(f"ISIC 2017: {table.name}, {cid}: {exc}") from exc
                if cid in self._subset:
                    raise DatasetLayoutError(f"ISIC 2017: {cid} is listed in both {self._subset[cid]} and {subset}")
                self._subset[cid] = subset
                if lab is None:
                    problems[cid] = f"empty {label_column} in {table.name}"
                elif cid not in images:
                    problems[cid] = f"no image {cid}.jpg"
                elif cid not in masks:
                    problems[cid] = f"no mask {cid}_segmentation.png"
                else:
                    self._labels[cid] = lab
                    self._extra[cid] = other
        if problems and incomplete == "error":
            listing = "\n".join(f"  {c}: {r}" for c, r in sorted(problems.items()))
            raise DatasetLayoutError(f"ISIC 2017: {len(problems)} incomplete case(s):\n{listing}")
        self.skipped = problems
        self._images = {c: images[c] for c in self._labels}
        self._masks = {c: masks[c] for c in self._labels}
        self.tables = tables
        if not self._labels:
            raise DatasetLayoutError(
                f"ISIC 2017: no usable case under {self.root} (e.g. {next(iter(sorted(problems.items())), '-')}); "
                f"expected layout:\n{self.layout()}"
            )

    @staticmethod
    def _add(table: dict[str, Path], cid: str, path: Path, what: str) -> None:
        if cid in table:
            raise DatasetLayoutError(f"ISIC 2017: two {what} files for {cid}: {table[cid]} and {path}; keep one")
        table[cid] = path

    @classmethod
    def layout(cls) -> str:
        return (
            "  <root>/ISIC-2017_Training_Data/ISIC_0000000.jpg\n"
            "  <root>/ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png (0 / 255)\n"
            "  <root>/ISIC-2017_Training_Part3_GroundTruth.csv (image_id, melanoma, seborrheic_keratosis)\n"
            "  (likewise _Validation_ and _Test_v2_)"
        )

    def case_ids(self) -> list[str]:
        return sorted(self._labels)

    def labels(self) -> dict[str, int]:
        return dict(sorted(self._labels.items()))

    def subset_of(self, case_id: str) -> str:
        """The challenge subset (``Training``, ``Validation``, ``Test_v2``) a case comes from."""
        return self._subset[case_id]

    def load(self, case_id: str) -> Case:
        if case_id not in self._labels:
            raise self._unknown(case_id)
        rgb = read_image_2d(self._images[case_id], mode="RGB")
        grey = read_image_2d(self._masks[case_id], mode="L")
        if grey.shape != rgb.shape[1:]:
            raise DatasetLayoutError(
                f"ISIC 2017 {case_id}: mask {grey.shape} and image {rgb.shape[1:]} differ in size"
            )
        return Case(
            case_id=case_id,
            images=[c for c in rgb],
            mask=(grey >= 128).astype(np.uint8),
            label=self._labels[case_id],
            spacing=(1.0, 1.0),
            meta={
                "dataset": self.name,
                "patient_id": case_id,
                "subset": self._subset[case_id],
                "image_path": str(self._images[case_id]),
                "mask_path": str(self._masks[case_id]),
                "spacing_unit": "pixel",
                **self._extra[case_id],
            },
        )
