"""Lesion Dice of a bundle's predictor on validation seeds, under a motion-correction rule, with each case's motion.

Rows (one per lesion case): seed, true lesion voxels, the generator's in-plane motion (voxels; 0 without), the
lesion Dice of the labelmap written, and the longest shift the motion correction applied (mm). Two workers, one
thread each. Run from the repository root (the project's .venv):

    python docs/model-eval/v1110-motion/validation_probe.py MODEL none|translation 1000000 1000100 OUT.json
    python docs/model-eval/v1110-motion/validation_probe.py --compare OUT_A.json OUT_B.json [...]
"""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
from workers import ordered_map  # noqa: E402

import umlcore.synthetic as syn  # noqa: E402
from umlcore import metrics  # noqa: E402
from umlcore.bundle import MotionCorrection, load_bundle  # noqa: E402
from umlcore.predictor import Predictor  # noqa: E402

SHAPE, LABEL_NOISE = (24, 256, 256), 0.02  # train.py's validation cases
_PREDICTORS: dict = {}


def motion_and_case(seed: int):
    """The generator's in-plane motion of ``seed`` (voxels, (0, 0) without) and the case."""
    case = syn.generate_case(seed, shape=SHAPE, label_noise=LABEL_NOISE)
    return case.info["motion_voxels"], case


def job(args):
    seed, model, mode = args
    torch.set_num_threads(1)
    if (model, mode) not in _PREDICTORS:
        b = load_bundle(model)
        mc = MotionCorrection("translation", "early") if mode == "translation" else MotionCorrection()
        card = dataclasses.replace(b.card, input=dataclasses.replace(b.card.input, motion_correction=mc))
        _PREDICTORS[model, mode] = Predictor(dataclasses.replace(b, card=card), device="cpu")
    (dy, dx), case = motion_and_case(seed)
    if not case.mask.any():
        return None
    pred = _PREDICTORS[model, mode].predict(case.to_sitk())
    moved = [np.linalg.norm(p["shift_mm"]) for p in pred.summary["motion_correction"]["phases"] if p["applied"]]
    return {"seed": seed, "lesion_voxels": int(case.mask.sum()), "motion_voxels": float(np.hypot(dy, dx)),
            "dice": metrics.dice(sitk.GetArrayFromImage(pred.labelmap), case.mask),
            "shift_mm": float(max(moved)) if moved else None}


def compare(paths: list[str]) -> None:
    runs = [{r["seed"]: r for r in json.loads(Path(p).read_text())["rows"]} for p in paths]
    seeds = sorted(set.intersection(*(set(r) for r in runs)))
    base = runs[0]
    groups = {"all": seeds, "with motion": [s for s in seeds if base[s]["motion_voxels"] > 0],
              "without motion": [s for s in seeds if base[s]["motion_voxels"] == 0],
              "< 100 voxels": [s for s in seeds if base[s]["lesion_voxels"] < 100],
              "100-999": [s for s in seeds if 100 <= base[s]["lesion_voxels"] < 1000],
              ">= 1000": [s for s in seeds if base[s]["lesion_voxels"] >= 1000]}
    print(f"{len(seeds)} lesion cases; lesion Dice of " + " | ".join(Path(p).stem for p in paths))
    for name, sel in groups.items():
        print(f"  {name:15s} {len(sel):3d}: " + " | ".join(
            f"{np.mean([r[s]['dice'] for s in sel]):.3f}" if sel else "-" for r in runs))
    for r, p in zip(runs[1:], paths[1:]):
        d = np.array([r[s]["dice"] - base[s]["dice"] for s in seeds])
        boot = np.random.default_rng(0).integers(0, len(d), (2000, len(d)))
        lo, hi = np.percentile(d[boot].mean(axis=1), [2.5, 97.5])
        print(f"  {Path(p).stem} - {Path(paths[0]).stem}: {d.mean():+.3f} (bootstrap 95 % {lo:+.3f} .. {hi:+.3f}); "
              f"better by > 0.05 in {(d > 0.05).sum()}, worse in {(d < -0.05).sum()}")


def main() -> None:
    if sys.argv[1] == "--compare":
        return compare(sys.argv[2:])
    model, mode, first, stop, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    rows = [r for r in ordered_map(job, [(s, model, mode) for s in range(first, stop)], 2) if r is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "motion_correction": mode, "seeds": [first, stop], "rows": rows}, indent=1))
    print(f"{out}: {len(rows)} lesion cases, mean Dice {np.mean([r['dice'] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
