"""Small datasets written at test time in the real layouts of I-SPY1, REFUGE, ISIC 2017 and a user's folder.

The images carry what the tasks are about, so that a few training steps have something to learn: DCE cases from
the synthetic generator (pCR = the generator's label), fundus-like pictures whose optic cup is larger in glaucoma,
skin-like pictures whose lesion is darker and more irregular in melanoma.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from umlcore.synthetic import generate_case

__all__ = ["write_ispy1", "write_refuge", "write_isic2017", "write_folder_pictures", "write_folder_volumes", "KINDS",
           "QUICK", "first_test_input"]


def _picture(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _volume(path: Path, image: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _csv(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(v) for v in r) for r in rows) + "\n", encoding="utf-8")


def _disc(size: int, centre: tuple[float, float], radius: float, rng: np.random.Generator, wobble: float = 0.0):
    """A (possibly irregular) filled disc as a boolean mask."""
    y, x = np.mgrid[:size, :size].astype(np.float64)
    angle = np.arctan2(y - centre[0], x - centre[1])
    r = radius * (1 + wobble * np.sin(3 * angle + rng.uniform(0, 6.3)) + wobble / 2 * np.cos(5 * angle))
    return np.hypot(y - centre[0], x - centre[1]) <= r


def fundus(seed: int, glaucoma: bool, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An RGB fundus-like picture and its REFUGE mask (255 background, 128 disc rim, 0 cup)."""
    rng = np.random.default_rng(seed)
    centre = (size / 2 + rng.uniform(-8, 8), size / 2 + rng.uniform(-8, 8))
    disc_r = size * rng.uniform(0.16, 0.2)
    cup_r = disc_r * (rng.uniform(0.6, 0.8) if glaucoma else rng.uniform(0.25, 0.45))
    disc, cup = _disc(size, centre, disc_r, rng), _disc(size, centre, cup_r, rng)
    eye = _disc(size, (size / 2, size / 2), size * 0.48, rng)
    rgb = np.zeros((size, size, 3), np.float64)
    rgb[eye] = (150, 60, 30)
    rgb[disc] = (230, 170, 90)
    rgb[cup] = (250, 230, 170)
    rgb += rng.normal(0, 8, rgb.shape) * eye[..., None]
    mask = np.full((size, size), 255, np.uint8)
    mask[disc], mask[cup] = 128, 0
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def skin(seed: int, melanoma: bool, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An RGB skin-like picture with a lesion, and its ISIC mask (0 / 255)."""
    rng = np.random.default_rng(seed)
    centre = (size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6))
    lesion = _disc(size, centre, size * rng.uniform(0.15, 0.25), rng, wobble=0.3 if melanoma else 0.05)
    rgb = np.empty((size, size, 3), np.float64)
    rgb[:] = (210, 160, 140)
    rgb[lesion] = (70, 40, 30) if melanoma else (150, 100, 80)
    rgb += rng.normal(0, 10, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), lesion.astype(np.uint8) * 255


def write_ispy1(root: Path, n: int = 8, shape: tuple[int, int, int] = (12, 48, 48)) -> Path:
    """I-SPY1: ``Dataset ISPY/ISPY_<id>/DCEMRI_1.nii.gz`` (the early phase of a synthetic case), its tumour mask,
    and ``outcome_new.csv`` (PCR = the case's label)."""
    rows = [["SUBJECTID", "PCR"]]
    for i in range(n):
        case, sid = generate_case(500 + i, shape=shape, label_noise=0.0), str(1001 + i)
        early = case.to_sitk()[1]
        _volume(root / "Dataset ISPY" / f"ISPY_{sid}" / "DCEMRI_1.nii.gz", early)
        mask = sitk.GetImageFromArray(case.mask.astype(np.uint8))
        mask.CopyInformation(early)
        _volume(root / "Tumor_segmentation_new" / f"ISPY_{sid}_tumor_mask.nii.gz", mask)
        rows.append([sid, int(case.label if case.mask.any() else i % 2)])
    _csv(root / "outcome_new.csv", rows)
    return root


def write_refuge(root: Path, n: int = 8, size: int = 64) -> Path:
    """REFUGE: ``Training400/{Glaucoma,Non-Glaucoma}/*.jpg`` with ``Annotation-Training400/Disc_Cup_Masks``."""
    for i in range(n):
        glaucoma = i % 2 == 0
        picture, mask = fundus(i, glaucoma, size)
        folder, cid = ("Glaucoma", f"g{i:04d}") if glaucoma else ("Non-Glaucoma", f"n{i:04d}")
        _picture(root / "Training400" / folder / f"{cid}.jpg", picture)
        _picture(root / "Annotation-Training400" / "Disc_Cup_Masks" / folder / f"{cid}.bmp", mask)
    return root


def write_isic2017(root: Path, n: int = 8, size: int = 64) -> Path:
    """ISIC 2017: ``ISIC-2017_Training_Data/ISIC_*.jpg``, the ``Part1`` masks and the ``Part3`` label table."""
    rows = [["image_id", "melanoma", "seborrheic_keratosis"]]
    for i in range(n):
        melanoma = i % 2 == 1
        picture, mask = skin(100 + i, melanoma, size)
        cid = f"ISIC_{i:07d}"
        _picture(root / "ISIC-2017_Training_Data" / f"{cid}.jpg", picture)
        _picture(root / "ISIC-2017_Training_Part1_GroundTruth" / f"{cid}_segmentation.png", mask)
        rows.append([cid, "1.0" if melanoma else "0.0", "0.0"])
    _csv(root / "ISIC-2017_Training_Part3_GroundTruth.csv", rows)
    return root


def write_folder_pictures(root: Path, n: int = 8, size: int = 64) -> Path:
    """A folder dataset of PNG pictures: ``images/``, ``masks/`` (0 / 1 / 2) and ``labels.csv``."""
    rows = [["case", "label"]]
    for i in range(n):
        picture, grey = fundus(200 + i, i % 2 == 0, size)
        mask = np.select([grey == 0, grey == 128], [2, 1], 0).astype(np.uint8)
        _picture(root / "images" / f"case{i:02d}.png", picture)
        _picture(root / "masks" / f"case{i:02d}.png", mask)
        rows.append([f"case{i:02d}", int(i % 2 == 0)])
    _csv(root / "labels.csv", rows)
    return root


def write_folder_volumes(root: Path, n: int = 8, shape: tuple[int, int, int] = (12, 48, 48)) -> Path:
    """A folder dataset of three-phase volumes: ``images/<case>/{0_pre,1_early,2_late}.nii.gz``, masks, labels."""
    rows = [["case", "label"]]
    for i in range(n):
        case = generate_case(700 + i, shape=shape, label_noise=0.0)
        phases = case.to_sitk()
        for k, name in enumerate(("0_pre", "1_early", "2_late")):
            _volume(root / "images" / f"case{i:02d}" / f"{name}.nii.gz", phases[k])
        mask = sitk.GetImageFromArray(case.mask.astype(np.uint8))
        mask.CopyInformation(phases[0])
        _volume(root / "masks" / f"case{i:02d}.nii.gz", mask)
        rows.append([f"case{i:02d}", int(case.label)])
    _csv(root / "labels.csv", rows)
    return root


#: Each --data kind's fixture (name -> writer, the kind's own training flags).
KINDS = {
    "ispy1": (write_ispy1, ["--slices", "largest-lesion", "--slice-label", "case"]),
    "refuge": (write_refuge, ["--target-size", "32", "32", "--slice-label", "case"]),
    "isic2017": (write_isic2017, ["--target-size", "32", "32"]),
    "folder-pictures": (write_folder_pictures, []),
    "folder-volumes": (write_folder_volumes, ["--cache-cases", "2", "--new-cases-per-epoch", "1"]),
}
#: A run of a few steps that fits CI: two epochs of two steps, one thread (CI's cores are shared).
QUICK = ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "32", "--workers", "1",
         "--split-fractions", "0.5", "0.25", "0.25", "--device", "cpu", "--single-volume-prob", "0", "--threads", "1"]


def first_test_input(kind: str, root: Path, run: Path) -> list[Path]:
    """The files of the run split's first test case, as a user would give them to uml predict."""
    import json

    case = json.loads((run / "split.json").read_text())["test"][0]
    found = {"ispy1": lambda: [root / "Dataset ISPY" / case / "DCEMRI_1.nii.gz"],
             "refuge": lambda: sorted(root.glob(f"Training400/*/{case}.jpg")),
             "isic2017": lambda: [root / "ISIC-2017_Training_Data" / f"{case}.jpg"],
             "folder": lambda: sorted((root / "images").glob(f"{case}.png")) or sorted((root / "images" / case).glob("*"))}
    return found[kind]()
