"""REFUGE (MICCAI 2018) fundus photographs: glaucoma classification + optic disc / cup segmentation.

The challenge archives unpack to (any subset of them under one root)::

    <root>/
      Training400/{Glaucoma,Non-Glaucoma}/g0001.jpg, n0001.jpg, ...
      Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/g0001.bmp, ...
      REFUGE-Validation400/V0001.jpg, ...
      REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp
      REFUGE-Validation400-GT/Glaucoma_label_and_Fovea_location.xlsx   # columns ImgName, Glaucoma Label
      Test400/T0001.jpg, ...
      REFUGE-Test-GT/Disc_Cup_Masks/{G,N}/T0001.bmp
      REFUGE-Test-GT/Glaucoma_label_and_Fovea_location.xlsx

Discovery rules:

- masks: ``.bmp`` / ``.png`` files under any folder named ``Disc_Cup_Masks``;
- images: ``.jpg`` / ``.jpeg`` / ``.png`` files anywhere else, except under folders whose name mentions
  ``annotation``, ``illustration`` or ends in ``-GT`` / ``_GT`` (those hold ground truth and drawings);
- the case id is the file stem (``g0001``, ``V0001``, ``T0001``); an image and a mask pair by stem;
- labels (1 = glaucoma): from a parent folder named ``Glaucoma`` / ``G`` (1) or ``Non-Glaucoma`` / ``N`` (0)
  of the image or the mask, else from label tables: the ``label_file`` given, or every
  ``*Glaucoma_label*.csv|.xlsx`` / ``labels.csv`` found, columns ``ImgName`` and ``Glaucoma Label``
  (``.xlsx`` needs ``openpyxl``; a CSV copy with the same columns works without it).

Mask encoding: REFUGE stores grey levels 0 = optic cup, 128 = optic disc rim (disc minus cup), 255 =
background. They map to our label map **0 = background, 1 = disc rim, 2 = cup** (the whole optic disc is
``mask >= 1``). Grey values in between (from resampling or lossy saving) go to the nearest of the three
levels: ``< 64`` cup, ``64..191`` rim, ``>= 192`` background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np

from .base import Case, DatasetAdapter, DatasetLayoutError, PathLike, parse_binary_label, read_image_2d, read_table

__all__ = ["REFUGEDataset", "refuge_mask_to_labels"]

_IMAGE_EXT = (".jpg", ".jpeg", ".png")
_MASK_EXT = (".bmp", ".png")
_POSITIVE_DIRS = {"glaucoma", "g"}
_NEGATIVE_DIRS = {"non-glaucoma", "nonglaucoma", "non_glaucoma", "n"}


def refuge_mask_to_labels(grey: np.ndarray) -> np.ndarray:
    """REFUGE grey mask (0 cup, 128 rim, 255 background) -> uint8 labels (0 background, 1 rim, 2 cup)."""
    grey = np.asarray(grey)
    out = np.zeros(grey.shape, dtype=np.uint8)
    out[grey < 192] = 1
    out[grey < 64] = 2
    return out


def _is_gt_folder(name: str) -> bool:
    low = name.lower()
    return (
        "annotation" in low
        or "illustration" in low
        or low == "disc_cup_masks"
        or low == "gt"
        or low.endswith("-gt")
        or low.endswith("_gt")
    )


def _folder_label(path: Path, root: Path) -> Optional[int]:
    for part in reversed(path.relative_to(root).parts[:-1]):
        low = part.lower()
        if low in _POSITIVE_DIRS:
            return 1
        if low in _NEGATIVE_DIRS:
            return 0
    return None


class REFUGEDataset(DatasetAdapter):
    """REFUGE fundus images with glaucoma labels and disc / cup masks.

    Args:
        root: Folder holding the unpacked REFUGE archives (see the module docstring).
        label_file: A ``.csv`` / ``.xlsx`` with columns ``ImgName``, ``Glaucoma Label``; default: the label
            tables found under ``root`` (used for images whose folders do not name the class).
        incomplete: ``"skip"``: images without a mask or a label are left out (listed in ``self.skipped``);
            ``"error"``: they are an error.
    """

    name = "REFUGE"
    class_names = ("non-glaucoma", "glaucoma")
    segment_names = ("background", "optic disc rim", "optic cup")

    def __init__(
        self,
        root: PathLike,
        label_file: Optional[PathLike] = None,
        incomplete: Literal["skip", "error"] = "skip",
    ) -> None:
        super().__init__(root)
        if incomplete not in ("skip", "error"):
            raise DatasetLayoutError(f"incomplete must be 'skip' or 'error', got {incomplete!r}")
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            parts = path.relative_to(self.root).parts[:-1]
            suffix = path.suffix.lower()
            if any(p.lower() == "disc_cup_masks" for p in parts):
                if suffix in _MASK_EXT:
                    self._add(masks, path, "mask")
            elif suffix in _IMAGE_EXT and not any(_is_gt_folder(p) for p in parts):
                self._add(images, path, "image")
        if not images:
            raise DatasetLayoutError(f"REFUGE: no fundus image (.jpg) found under {self.root}; expected layout:\n{self.layout()}")
        if not masks:
            raise DatasetLayoutError(
                f"REFUGE: no Disc_Cup_Masks folder with .bmp masks under {self.root}; expected layout:\n{self.layout()}"
            )

        labels: dict[str, int] = {}
        sources: dict[str, str] = {}
        for cid, path in images.items():
            lab = _folder_label(path, self.root)
            if lab is None and cid in masks:
                lab = _folder_label(masks[cid], self.root)
            if lab is not None:
                labels[cid], sources[cid] = lab, "folder"

        tables = [Path(label_file)] if label_file is not None else self._label_tables()
        need_tables = label_file is not None or any(cid not in labels for cid in images)
        if need_tables:
            for table in tables:
                if not table.is_file():
                    raise DatasetLayoutError(f"REFUGE: label file {table} not found")
                for row in read_table(table, ["ImgName", "Glaucoma Label"]):
                    cid = Path(str(row["ImgName"]).strip()).stem
                    try:
                        lab = parse_binary_label(row["Glaucoma Label"])
                    except DatasetLayoutError as exc:
                        raise DatasetLayoutError(f"REFUGE: {table.name}, {cid}: {exc}") from exc
                    if lab is None:
                        continue
                    if cid in labels and labels[cid] != lab:
                        raise DatasetLayoutError(
                            f"REFUGE: {cid} is labelled {labels[cid]} by its {sources[cid]} but {lab} by {table.name}"
                        )
                    labels[cid], sources[cid] = lab, table.name

        problems: dict[str, str] = {}
        for cid in images:
            if cid not in masks:
                problems[cid] = "no mask in a Disc_Cup_Masks folder"
            elif cid not in labels:
                problems[cid] = "no label (no Glaucoma/Non-Glaucoma folder, not in a label table)"
        for cid in masks:
            if cid not in images:
                problems[cid] = "mask without image"
        if problems and incomplete == "error":
            listing = "\n".join(f"  {c}: {r}" for c, r in sorted(problems.items()))
            raise DatasetLayoutError(f"REFUGE: {len(problems)} incomplete case(s):\n{listing}")
        self.skipped = problems
        self._images = {c: p for c, p in images.items() if c not in problems}
        self._masks = {c: masks[c] for c in self._images}
        self._labels = {c: labels[c] for c in self._images}
        self._sources = sources
        if not self._images:
            raise DatasetLayoutError(
                f"REFUGE: no usable case under {self.root} (images, masks and labels do not pair up: "
                f"e.g. {next(iter(sorted(problems.items())))}); expected layout:\n{self.layout()}"
            )

    def _add(self, table: dict[str, Path], path: Path, what: str) -> None:
        if path.stem in table:
            raise DatasetLayoutError(
                f"REFUGE: two {what} files for case {path.stem!r}: {table[path.stem]} and {path}; keep one"
            )
        table[path.stem] = path

    def _label_tables(self) -> list[Path]:
        found = []
        for path in sorted(self.root.rglob("*")):
            low = path.name.lower()
            if path.is_file() and path.suffix.lower() in (".csv", ".xlsx") and (
                "glaucoma_label" in low or low == "labels.csv"
            ):
                found.append(path)
        # prefer a CSV copy over the .xlsx of the same name
        stems = {p.with_suffix("") for p in found if p.suffix.lower() == ".csv"}
        return [p for p in found if p.suffix.lower() == ".csv" or p.with_suffix("") not in stems]

    @classmethod
    def layout(cls) -> str:
        return (
            "  <root>/Training400/{Glaucoma,Non-Glaucoma}/<id>.jpg\n"
            "  <root>/Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/<id>.bmp\n"
            "  <root>/REFUGE-Validation400/<id>.jpg + REFUGE-Validation400-GT/Disc_Cup_Masks/<id>.bmp\n"
            "  labels: Glaucoma/Non-Glaucoma folders, or a table with columns ImgName, Glaucoma Label\n"
            "  masks: grey 0 = cup, 128 = disc rim, 255 = background"
        )

    def case_ids(self) -> list[str]:
        return sorted(self._images)

    def labels(self) -> dict[str, int]:
        return dict(sorted(self._labels.items()))

    def load(self, case_id: str) -> Case:
        if case_id not in self._images:
            raise self._unknown(case_id)
        rgb = read_image_2d(self._images[case_id], mode="RGB")
        grey = read_image_2d(self._masks[case_id], mode="L")
        if grey.shape != rgb.shape[1:]:
            raise DatasetLayoutError(
                f"REFUGE {case_id}: mask {grey.shape} and image {rgb.shape[1:]} differ in size; "
                "use the original (un-resized) image and mask"
            )
        return Case(
            case_id=case_id,
            images=[c for c in rgb],
            mask=refuge_mask_to_labels(grey),
            label=self._labels[case_id],
            spacing=(1.0, 1.0),
            meta={
                "dataset": self.name,
                "patient_id": case_id,
                "image_path": str(self._images[case_id]),
                "mask_path": str(self._masks[case_id]),
                "label_source": self._sources.get(case_id, ""),
                "spacing_unit": "pixel",
            },
        )
