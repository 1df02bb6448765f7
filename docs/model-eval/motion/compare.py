"""Lesion Dice of the same seeds read from two mined folders (mine.py), split by whether the generator moved the
phases, and the Dice a model drawing the enhancing lesion exactly would get against a mask left with the
pre-contrast phase (the true mask against itself moved by the case's motion).

    python docs/model-eval/motion/compare.py runs/fnprobe runs/fnprobe2 [runs/fnprobe3 ...]
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
import train_refiner  # noqa: E402

import umlcore.synthetic as syn  # noqa: E402

_shift = syn._shift_axis


def motion(seed: int):
    """The in-plane shift (voxels) the generator applies between the phases of ``seed`` ((0, 0): none), and the case."""
    case = syn.generate_case(seed, shape=train_refiner.SHAPE, label_noise=train_refiner.LABEL_NOISE)
    return case.info["motion_voxels"], case


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 2 * (a & b).sum() / s if s else np.nan


def main() -> None:
    dirs = [Path(d) for d in sys.argv[1:]]
    rows = []
    for p in sorted(dirs[0].glob("*.npz")):
        seed = int(p.stem)
        truth = np.load(p)["truth"] > 0
        if not truth.any():
            continue
        (dy, dx), case = motion(seed)
        mask = case.axial_arrays()[1] > 0
        moved = _shift(_shift(mask.astype(np.float32), dy, 1), dx, 2) > 0.5
        rows.append([seed, dy != 0 or dx != 0, dice(mask, moved), int(truth.sum())]
                    + [dice(np.load(d / p.name)["labels"] > 0, truth) for d in dirs])
    r = np.array(rows, dtype=float)
    m = r[:, 1] > 0
    names = " -> ".join(d.name for d in dirs)
    print(f"{len(r)} lesion cases of {dirs[0]}; lesion Dice {names}")
    for name, s in (("with motion", m), ("without motion", ~m), ("all", m | ~m)):
        print(f"  {name:15s} {s.sum():3.0f} cases: " + " -> ".join(f"{np.nanmean(r[s, 4 + i]):.3f}"
                                                             for i in range(len(dirs))))
    for name, s in (("< 100 voxels", r[:, 3] < 100), ("100-999", (r[:, 3] >= 100) & (r[:, 3] < 1000)),
                    (">= 1000", r[:, 3] >= 1000)):
        print(f"  {name:15s} {s.sum():3.0f} cases: " + " -> ".join(f"{np.nanmean(r[s, 4 + i]):.3f}"
                                                             for i in range(len(dirs))))
    print(f"an exact drawing of the enhancing lesion against the mask left with the pre phase, cases with motion: "
          f"mean Dice {np.nanmean(r[m, 2]):.3f} (min {np.nanmin(r[m, 2]):.3f})")


if __name__ == "__main__":
    main()
