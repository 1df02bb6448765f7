"""Train the lesion refiner (``umlcore.refiner``) on the crops a bundle's predictor really makes it redraw.

1. **Crops.** The bundle's predictor runs end to end on synthetic cases (training seeds from ``--train-from``,
   validation seeds from ``--val-from``); around each component of the labelmap it writes that
   :func:`umlcore.refiner.component_boxes` picks, the crop of the normalised phases, the network's foreground
   probability, the component and the true mask is kept, ``JITTER`` voxels larger on each side so training can
   shift it. About 3 s a case on a 2-core CPU with 2 workers; cached per case under ``--cache``.
2. **Training.** AdamW, binary cross-entropy + soft Dice per crop, random shifts, flips of every axis and
   in-plane transposes.
3. **Validation.** On the validation cases: Dice of each crop's component against the true mask in its crop,
   before and after, and the case lesion Dice with every crop's component replaced as the predictor replaces it
   (from the crops' counts; crops that overlap another component are counted as if they did not), beside that of
   an oracle that replaces each component by the true lesions it touches.
4. **Output.** ``--out``: ``refiner.safetensors``, ``refiner.json`` (the card section with its training record)
   and ``log.csv``; ``training/add_refiner.py`` puts them into a bundle.

Example:
    python training/train_refiner.py --model Resources/Models/uml-breast-dce-small --out runs/refiner \
        --train-cases 500 --val-cases 100 --steps 1500
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from umlcore.bundle import load_bundle
from umlcore.predictor import Predictor
from umlcore.preprocess import normalize, slice_axis_index, to_slices
from umlcore.refiner import LesionRefiner, RefinerConfig, component_boxes, crop_inputs, cut_crop, touching
from umlcore.synthetic import generate_case

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slices import phases_as_read  # noqa: E402
from workers import ordered_map  # noqa: E402

TRAIN_SEED, VAL_SEED = 3_000_000, 1_000_000
SHAPE = (24, 256, 256)
LABEL_NOISE = 0.02
#: Extra voxels cut on each side of a crop (slices, rows, columns), for random shifts in training.
JITTER = (1, 4, 4)

_PREDICTORS: dict[str, Predictor] = {}


def predicted_slices(seed: int, model: str) -> dict[str, np.ndarray]:
    """Synthetic case ``seed`` (``SHAPE``) through ``model``'s predictor (one per process, one CPU thread), in the
    predictor's slice order: ``stack`` ``(S, 3, H, W)`` normalised phases, ``fg`` foreground probability,
    ``labels`` the labelmap written, ``truth`` the true mask."""
    torch.set_num_threads(1)
    if model not in _PREDICTORS:
        _PREDICTORS[model] = Predictor(load_bundle(model), device="cpu")
    predictor = _PREDICTORS[model]
    case = generate_case(seed, shape=SHAPE, label_noise=LABEL_NOISE)
    images = case.to_sitk()
    pred = predictor.predict(images, case_id=f"synthetic-{seed}")
    axis = slice_axis_index(images[0].GetDirection(), predictor.card.input.slicing_axis)
    norm = predictor.card.input.normalization
    phases = phases_as_read(case, predictor.card.input, pred.summary).phases  # as the predictor read them
    return {"stack": np.stack([to_slices(normalize(p.astype(np.float32), norm), axis) for p in phases], axis=1),
            "fg": to_slices(sitk.GetArrayFromImage(pred.probability), axis),
            "labels": to_slices(sitk.GetArrayFromImage(pred.labelmap), axis),
            "truth": to_slices(case.mask, axis)}


def case_slices(seed: int, model: str, cfg: RefinerConfig) -> dict:
    """One case through ``model``'s predictor: its refiner crops (``JITTER`` larger) and the case's counts."""
    a = predicted_slices(seed, model)
    stack, fg, labels, truth = a["stack"], a["fg"], a["labels"], a["truth"]
    components, boxes = component_boxes(labels, cfg)
    crops = []
    for cid, box in boxes:
        big = tuple(slice(b.start - j, b.stop + j) for b, j in zip(box, JITTER))
        own = components == cid
        crops.append({"x": crop_inputs(stack, fg, own, big).astype(np.float16),
                      "y": cut_crop(truth, big).astype(np.uint8),
                      "voxels": int(own.sum()), "hit": bool(truth[own].any())})
    pred_mask, true_mask = labels > 0, truth > 0
    return {"seed": seed, "crops": crops, "truth": int(true_mask.sum()), "predicted": int(pred_mask.sum()),
            "overlap": int((pred_mask & true_mask).sum())}


def load_cases(seeds: range, model: str, cfg: RefinerConfig, cache: Path, workers: int) -> list[dict]:
    """:func:`case_slices` of every seed, from ``cache/<seed>.npz`` where it is there."""
    cache.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (cache / f"{s}.npz").exists()]
    t0 = time.perf_counter()
    for i, res in enumerate(ordered_map(_mine, [(s, model, cfg, str(cache)) for s in todo], workers)):
        if (i + 1) % 50 == 0 or i + 1 == len(todo):
            print(f"  crops: {i + 1}/{len(todo)} cases, {time.perf_counter() - t0:.0f} s", flush=True)
    return [_read(cache / f"{s}.npz") for s in seeds]


def _mine(job) -> int:
    seed, model, cfg, cache = job
    res = case_slices(seed, model, cfg)
    path = Path(cache) / f"{seed}.npz"
    tmp = path.with_suffix(".tmp.npz")
    c = res["crops"]
    np.savez(tmp, x=np.stack([k["x"] for k in c]) if c else np.zeros((0,), np.float16),
             y=np.stack([k["y"] for k in c]) if c else np.zeros((0,), np.uint8),
             voxels=np.array([k["voxels"] for k in c], np.int64), hit=np.array([k["hit"] for k in c], bool),
             counts=np.array([res["truth"], res["predicted"], res["overlap"]], np.int64))
    tmp.replace(path)
    return seed


def _read(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def center(a: np.ndarray) -> np.ndarray:
    """The un-shifted crop of a ``JITTER``-enlarged crop (last three axes)."""
    return a[(Ellipsis, *(slice(j, a.shape[-3 + i] - j) for i, j in enumerate(JITTER)))]


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random shift within ``JITTER``, flips of every axis and an in-plane transpose (square crops)."""
    off = [int(rng.integers(0, 2 * j + 1)) for j in JITTER]
    sl = tuple(slice(o, x.shape[-3 + i] - 2 * JITTER[i] + o) for i, o in enumerate(off))
    x, y = x[(Ellipsis, *sl)], y[sl]
    for ax in range(3):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis=ax + 1), np.flip(y, axis=ax)
    if x.shape[-1] == x.shape[-2] and rng.random() < 0.5:
        x, y = x.swapaxes(-1, -2), y.swapaxes(-1, -2)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.float32)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice (per crop; a crop without lesion counts through the cross-entropy only)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    has = t.sum(1) > 0
    dice = 1 - (2 * inter + 1) / (total + 1)
    return bce + (dice[has].mean() if has.any() else 0.0 * dice.sum())


def replaced(own: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
    """What :func:`umlcore.refiner.refine_labels` writes in one crop for the component ``own``."""
    new = touching(prob >= threshold, own)
    return new if new.any() else own


def validate(net: LesionRefiner, cases: list[dict], cfg: RefinerConfig) -> dict:
    """Crop and case Dice before and after refinement (see the module docstring), and the case Dice of an oracle
    refiner that draws exactly the true lesions touching each component (the most any refiner could give)."""
    net.eval()
    before, after, case_before, case_after, case_oracle = [], [], [], [], []
    with torch.inference_mode():
        for c in cases:
            truth, predicted, overlap = (int(v) for v in c["counts"])
            new_pred, new_overlap = predicted, overlap
            best_pred, best_overlap = predicted, overlap
            for x, y in zip(c["x"], c["y"]):
                x, y = center(x.astype(np.float32)), center(y) > 0
                own = x[-1] > 0.5
                prob = torch.sigmoid(net(torch.from_numpy(x[None]))).numpy()[0, 0]
                new = replaced(own, prob, cfg.threshold)
                best = replaced(own, y.astype(np.float32), 0.5)
                if y.any():
                    before.append(2 * (own & y).sum() / (own.sum() + y.sum()))
                    after.append(2 * (new & y).sum() / (new.sum() + y.sum()))
                new_pred += int(new.sum()) - int(own.sum())
                new_overlap += int((new & y).sum()) - int((own & y).sum())
                best_pred += int(best.sum()) - int(own.sum())
                best_overlap += int((best & y).sum()) - int((own & y).sum())
            if truth:
                case_before.append(2 * overlap / (truth + predicted))
                case_after.append(2 * new_overlap / (truth + new_pred))
                case_oracle.append(2 * best_overlap / (truth + best_pred))
    net.train()
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {"crops_with_lesion": len(before), "crop_dice_before": mean(before), "crop_dice_after": mean(after),
            "lesion_cases": len(case_before), "case_dice_before": mean(case_before), "case_dice_after": mean(case_after),
            "case_dice_oracle": mean(case_oracle)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="bundle whose predictor makes the crops")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cache", type=Path, default=None, help="crop cache (default: <out>/crops)")
    ap.add_argument("--train-cases", type=int, default=500)
    ap.add_argument("--val-cases", type=int, default=100)
    ap.add_argument("--train-from", type=int, default=TRAIN_SEED)
    ap.add_argument("--val-from", type=int, default=VAL_SEED)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    problems = [f"--{k.replace('_', '-')} must be at least {lo}, got {getattr(args, k)}"
                for k, lo in (("train_cases", 1), ("val_cases", 1), ("steps", 1), ("batch", 1), ("width", 1),
                              ("val_every", 1), ("workers", 1), ("threads", 1)) if getattr(args, k) < lo]
    if problems:
        ap.error("; ".join(problems))
    cfg = RefinerConfig(width=args.width)
    cache = args.cache or args.out / "crops"
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"crops of {args.train_cases} training and {args.val_cases} validation cases", flush=True)
    train = load_cases(range(args.train_from, args.train_from + args.train_cases), args.model, cfg, cache, args.workers)
    val = load_cases(range(args.val_from, args.val_from + args.val_cases), args.model, cfg, cache, args.workers)
    xs = [x for c in train for x in c["x"]]
    ys = [y for c in train for y in c["y"]]
    hits = sum(int(h) for c in train for h in c["hit"])
    print(f"{len(xs)} training crops ({hits} on a lesion), {sum(len(c['x']) for c in val)} validation crops, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if not xs:
        raise SystemExit("no training crops: the predictor segmented nothing the refiner could redraw")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n_in = xs[0].shape[0]
    net = LesionRefiner(n_in, cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    log = [("step", "loss", "crop_dice_before", "crop_dice_after", "case_dice_before", "case_dice_after", "seconds")]
    res = validate(net, val, cfg)  # untrained: the network's own drawing
    log.append((0, None, res["crop_dice_before"], res["crop_dice_after"], res["case_dice_before"],
                res["case_dice_after"], 0.0))
    print(f"step 0: {res}", flush=True)
    running, t1 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(xs), args.batch)
        pairs = [augment(xs[i], ys[i], rng) for i in idx]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % args.val_every == 0 or step == args.steps:
            res = validate(net, val, cfg)
            log.append((step, float(np.mean(running)), res["crop_dice_before"], res["crop_dice_after"],
                        res["case_dice_before"], res["case_dice_after"], round(time.perf_counter() - t1, 1)))
            print(f"step {step}: loss {np.mean(running):.4f} {res} ({time.perf_counter() - t1:.0f} s)", flush=True)
            running = []
    record = {"data": f"crops of the labelmaps of {args.model} on synthetic cases, training seeds "
                      f"[{args.train_from}, {args.train_from + args.train_cases}), validation seeds "
                      f"[{args.val_from}, {args.val_from + args.val_cases}), shape {list(SHAPE)}",
              "command": "python training/train_refiner.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "training_crops": len(xs), "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "validation": res, "seconds": round(time.perf_counter() - t0, 1)}
    card = dataclasses.asdict(dataclasses.replace(cfg, training=record))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / "refiner.safetensors"))
    (args.out / "refiner.json").write_text(json.dumps(card, indent=2) + "\n")
    (args.out / "log.csv").write_text("\n".join(",".join("" if v is None else str(v) for v in row) for row in log) + "\n")
    print(f"wrote {args.out}/refiner.safetensors and refiner.json", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
