"""Which of a trained network's features carry the lesion's margin and kinetics? A linear probe, no training.

For each synthetic case the bundle's network runs slice by slice (frozen, fp32); per slice it pools
- ``instructor``: the instructor's own pooled vector (average, max and lesion-weighted average of ``F'`` at H/8);
- ``nav_lesion``: the navigator's full-resolution top features averaged with the foreground probability as weights;
- ``nav_edge``: the same features averaged over the lesion's edge (weights ``4 p (1 - p)``, p the foreground
  probability), where a spiculated margin differs from a smooth one;
- ``*_ring``: the same features averaged over a ring of :data:`RING` pixels just outside the segmented lesion
  (the foreground probability's 13x13 maximum minus itself), where spicules the mask misses would lie;
- ``seg0_*`` / ``seg1_*``: the segmentation encoder's features at H and H/2, pooled the same ways (the weights
  averaged down to H/2); ``input_*``: the input channels themselves (pre, early, late intensities).
A case's vector is the average of its slices' vectors weighted by the predicted lesion voxels per slice (zeros
when nothing is segmented). An L2-regularised logistic regression fitted on ``--fit-cases`` validation cases
(seeds from 1,000,000) is scored on ``--test-cases`` test cases (seeds from 2,000,000) for three targets: the
reported case label (all cases), and "has a spiculated lesion" and "has a washout lesion" (the cases with a
lesion). If a pool separates spiculated margins where the instructor's does not, a classifier reading that pool
can beat the instructor. For comparison, without any fit: how well the irregularity (``1 - solidity``) of the
largest lesion separates spiculated margins, in the network's predicted mask and in the true mask, by the true
lesion size (voxels).

Example:
    python training/probe_features.py --model Resources/Models/uml-breast-dce-small --out runs/probe \
        --fit-cases 140 --test-cases 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from umlcore import metrics
from umlcore.bundle import load_bundle
from umlcore.network import UMLNet
from umlcore.preprocess import pad_to_multiple
from umlcore.synthetic import generate_case

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slices import case_from_synthetic, phases_as_read  # noqa: E402

FIT_SEED, TEST_SEED = 1_000_000, 2_000_000
POOLS = ("instructor", "nav_lesion", "nav_edge", "nav_ring", "seg0_lesion", "seg0_edge", "seg0_ring", "seg1_lesion",
         "seg1_edge", "seg1_ring", "input_lesion", "input_ring")
RING = 6  # pixels (about 8 mm at the cases' 1.3 mm): the ring just outside the segmented lesion


def _wavg(f: torch.Tensor, w: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``(B, C, H, W)`` features averaged with ``(B, 1, h, w)`` weights (pooled to ``H, W``) -> ``(B, C)``."""
    w = F.adaptive_avg_pool2d(w, f.shape[-2:])
    return (f * w).sum(dim=(2, 3)) / (w.sum(dim=(2, 3)) + eps)


@torch.inference_mode()
def slice_features(net: UMLNet, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features per slice of ``x (B, C, H, W)`` and the predicted lesion mask ``(B, H, W)`` (bool).

    One ordinary forward pass; hooks pick up the segmentation encoder's features, the navigator's top features
    and the vector the instructor's linear layer reads, so nothing of the network is re-implemented here.
    """
    seen: dict[str, object] = {}
    hooks = [
        net.seg_encoder.register_forward_hook(lambda m, i, o: seen.__setitem__("seg", o)),
        net.navigator.register_forward_hook(lambda m, i, o: seen.__setitem__("nav_top", o[2])),
        net.instructor.fc.register_forward_pre_hook(lambda m, i: seen.__setitem__("instructor", i[0])),
    ]
    try:
        out = net(x)
    finally:
        for hook in hooks:
            hook.remove()
    seg, nav_top = seen["seg"], seen["nav_top"]
    fg = 1.0 - out.seg_alpha[:, :1] / out.seg_alpha.sum(dim=1, keepdim=True)
    edge = 4.0 * fg * (1.0 - fg)
    ring = (F.max_pool2d(fg, 2 * RING + 1, stride=1, padding=RING) - fg).clamp(min=0)
    pooled = {"instructor": seen["instructor"]}
    for name, features in (("nav", nav_top), ("seg0", seg[0]), ("seg1", seg[1]), ("input", x)):
        for where, weights in (("lesion", fg), ("edge", edge), ("ring", ring)):
            if f"{name}_{where}" in POOLS:
                pooled[f"{name}_{where}"] = _wavg(features, weights)
    return {k: v.numpy() for k, v in pooled.items()}, (out.seg_alpha.argmax(dim=1) > 0).numpy()


def irregularity(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """``1 - solidity`` (volume over convex-hull volume) of the largest 3D component of ``mask``; 0 if empty.

    A smooth or lobulated lesion is nearly convex; spicules leave most of its hull empty. The hull is that of the
    voxel centres, which lies inside the voxels: a lesion of one or two slices has a hull flatter than its voxels
    and scores 0 (so does anything under 8 voxels).
    """
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0.0
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    points = np.argwhere(labels == largest) * np.asarray(spacing_zyx)
    if len(points) < 8:
        return 0.0
    jitter = np.random.default_rng(0).normal(0.0, 1e-3, points.shape)  # flat (one-slice) lesions have a hull too
    try:
        hull = ConvexHull(points + jitter)
    except QhullError:
        return 0.0
    return float(max(0.0, 1.0 - len(points) * np.prod(spacing_zyx) / hull.volume))


def phenotype(case) -> tuple[int, int]:
    """``(spiculated, washout)`` of a synthetic case: 1 where any of its lesions has that margin / kinetics."""
    return (int(any(les["margin"] == "spiculated" for les in case.lesions)),
            int(any(les["kinetics"] == "washout" for les in case.lesions)))


def case_vector(net: UMLNet, bundle, seed: int, shape: tuple[int, int, int], batch: int) -> dict:
    case = generate_case(seed, shape=shape, label_noise=0.02)
    vol = case_from_synthetic(phases_as_read(case, bundle.card.input), bundle.card.input.normalization)
    stack = np.moveaxis(vol.channels, 0, 1)  # (Z, C, H, W)
    per_slice: dict[str, list] = {k: [] for k in POOLS}
    masks = []
    h, w = stack.shape[-2:]
    for s in range(0, stack.shape[0], batch):
        x = pad_to_multiple(torch.from_numpy(np.ascontiguousarray(stack[s:s + batch])), 8)
        pooled, mask = slice_features(net, x)
        for k in POOLS:
            per_slice[k].append(pooled[k])
        masks.append(mask[:, :h, :w])
    predicted = np.concatenate(masks)
    weights = predicted.reshape(len(predicted), -1).sum(axis=1).astype(np.float64)
    spacing_zyx = vol.spacing[::-1]
    out = {"seed": seed, "label": case.label, "voxels": float(weights.sum()),
           "true_voxels": float((vol.mask > 0).sum()),
           "irregularity_predicted": irregularity(predicted, spacing_zyx),
           "irregularity_true": irregularity(vol.mask > 0, spacing_zyx),
           **dict(zip(("spiculated", "washout"), phenotype(case))),
           "lesion": int(bool(case.lesions))}
    for k in POOLS:
        f = np.concatenate(per_slice[k])
        out[k] = (weights @ f / weights.sum()) if weights.sum() > 0 else np.zeros(f.shape[1], np.float32)
    return out


def _auc(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """The AUC rounded to 4 places; ``None`` (JSON null) when the cases hold one class only."""
    auc = metrics.roc_auc(scores, labels) if len(labels) else float("nan")
    return None if np.isnan(auc) else round(float(auc), 4)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> Callable[[np.ndarray], np.ndarray]:
    """Standardise ``x (N, D)``, fit ``sigmoid(x w + b)`` to ``y (N,)`` in {0, 1} with an L2 penalty ``l2 |w|^2``
    (LBFGS, full batch); returns the fitted ``predict(x) -> (N,)`` probabilities."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: torch.sigmoid(torch.tensor((z - mu) / sd, dtype=torch.float64) @ w + b).numpy()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle folder / zip")
    p.add_argument("--out", required=True, help="folder for features.npz and probe.json")
    p.add_argument("--fit-cases", type=int, default=140, help="validation cases the probes are fitted on")
    p.add_argument("--test-cases", type=int, default=100, help="test cases the probes are scored on")
    p.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--l2", type=float, nargs="+", default=(0.01, 0.1, 1.0), help="L2 penalties tried")
    args = p.parse_args(argv)
    if min(args.fit_cases, args.test_cases) < 20:
        p.error("--fit-cases and --test-cases must be at least 20 each: an AUC needs cases of both kinds")
    bundle = load_bundle(args.model)
    net = bundle.model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "features.npz"
    seeds = [FIT_SEED + i for i in range(args.fit_cases)] + [TEST_SEED + i for i in range(args.test_cases)]
    # features of the same weights, case shape and seeds are reused; anything else is computed afresh
    key = {"sha256": np.array(bundle.sha256), "shape": np.array(args.shape), "seed": np.array(seeds)}
    data = dict(np.load(cache)) if cache.is_file() else {}
    if not (set(key) | set(POOLS) <= set(data) and all(np.array_equal(data[k], v) for k, v in key.items())):
        t0, rows = time.time(), []
        for n, seed in enumerate(seeds):
            rows.append(case_vector(net, bundle, seed, tuple(args.shape), args.batch))
            if (n + 1) % 20 == 0:
                print(f"{n + 1}/{len(seeds)} cases, {time.time() - t0:.0f} s", flush=True)
        data = {**{k: np.array([r[k] for r in rows]) for k in rows[0]}, **key}
        partial = out / "features.partial.npz"
        np.savez(partial, **data)
        partial.replace(cache)  # an interrupted run leaves no half-written cache
    fit = data["seed"] < TEST_SEED
    test = ~fit
    results = {}
    sets = {name: [name] for name in POOLS}
    for extra in POOLS[1:]:
        sets[f"instructor+{extra}"] = ["instructor", extra]
    sets["all"] = list(POOLS)
    for target in ("label", "spiculated", "washout"):
        y = data[target].astype(float)
        # the phenotype targets among the cases with a lesion, so that finding a lesion is not credited as
        # reading its margin or kinetics
        keep = np.ones_like(fit) if target == "label" else data["lesion"].astype(bool)
        f, t = fit & keep, test & keep
        for name, pools in sets.items():
            x = np.concatenate([data[k] for k in pools], axis=1)
            for l2 in args.l2:
                auc = _auc(fit_logistic(x[f], y[f], l2)(x[t]), y[t])
                results.setdefault(target, {}).setdefault(name, {})[str(l2)] = auc
            print(f"{target:>10}  {name:<34} test AUC " +
                  "  ".join(f"l2={k}: {v}" for k, v in results[target][name].items()), flush=True)
    # the margin read from the shape of the largest lesion alone (no fit): the network's mask and the true one
    lesion = test & (data["lesion"] > 0)
    shape = {}
    for source in ("predicted", "true"):
        score = data[f"irregularity_{source}"]
        rows = {"all": lesion}
        for lo, hi in ((0, 100), (100, 1000), (1000, np.inf)):
            rows[f"{lo}-{hi}"] = lesion & (data["true_voxels"] >= lo) & (data["true_voxels"] < hi)
        shape[source] = {name: {"cases": int(m.sum()), "auc": _auc(score[m], data["spiculated"][m])}
                         for name, m in rows.items()}
        print(f"spiculated  1 - solidity of the {source} mask: " +
              "  ".join(f"{k} ({v['cases']}): {v['auc']}" for k, v in shape[source].items()), flush=True)
    (out / "probe.json").write_text(json.dumps({"fit_cases": int(fit.sum()), "test_cases": int(test.sum()),
                                                "test_cases_with_lesion": int(lesion.sum()),
                                                "test_auc": results, "shape_auc": shape}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
