"""Where the shipped network's drawing of the lesions it finds goes wrong: precision, recall and its foreground
probability at the wrong voxels, by lesion size, from the validation crops train_refiner.py cached.

Run from the repository root after train_refiner.py has cached the crops of validation seeds 1,000,000-099:
    python docs/model-eval/refiner/boundaries.py --cache runs/refcrops
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
import train_refiner  # noqa: E402

BINS = ((0, 50), (50, 200), (200, 1000), (1000, None))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path("runs/refcrops"))
    ap.add_argument("--seed-from", type=int, default=1_000_000)
    ap.add_argument("--cases", type=int, default=100)
    args = ap.parse_args()
    rows = []
    for seed in range(args.seed_from, args.seed_from + args.cases):
        c = train_refiner._read(args.cache / f"{seed}.npz")
        for x, y, hit in zip(c["x"], c["y"], c["hit"]):
            if not hit:  # a component on no lesion: nothing to draw better
                continue
            x, y = train_refiner.center(x.astype(np.float32)), train_refiner.center(y) > 0
            own, fg = x[-1] > 0.5, x[-2]
            tp = (own & y).sum()
            rows.append((y.sum(), tp / own.sum(), tp / max(y.sum(), 1),
                         np.median(fg[y & ~own]) if (y & ~own).any() else np.nan,
                         np.median(fg[own & ~y]) if (own & ~y).any() else np.nan))
    r = np.array(rows, dtype=float)
    print(f"{len(r)} components on a lesion, of {args.cases} validation cases")
    print("| true voxels in the crop | components | precision | recall | foreground p at missed lesion voxels | "
          "at false voxels |\n|---|---|---|---|---|---|")
    for lo, hi in BINS:
        s = r[(r[:, 0] >= lo) & (r[:, 0] < (hi or np.inf))]
        print(f"| {lo}-{hi - 1 if hi else ''} | {len(s)} | {np.median(s[:, 1]):.2f} | {np.median(s[:, 2]):.2f} | "
              f"{np.nanmedian(s[:, 3]):.3f} | {np.nanmedian(s[:, 4]):.3f} |")
    print("(medians over components)")


if __name__ == "__main__":
    main()
