"""Can a small CNN read a lesion's margin and kinetics from an image patch around it? A CPU experiment.

The linear probes (``probe_features.py``) found that the shipped network's features carry washout kinetics but not
spiculated margins, and that the case AUC target needs both. This script asks whether the margin is readable at
all from the images at the cases' resolution, by a network small enough to train on a 2-core CPU in minutes:

1. **Patches.** Around each lesion (3D component of the true mask, up to ``MAX_ROIS`` per case) of the training
   cases (seeds 0..), an axial patch of ``--size`` x ``--size`` pixels of 1 mm, resampled bilinearly, centred on the
   component's centroid in its largest slice, with ``--context`` slices on either side: ``3 x (2 context + 1)``
   channels (pre, early, late), normalised as the bundle's predictor normalises them. Lesion-free cases add one
   patch centred on a strongly enhancing pixel (the kind of place a network puts a false lesion) as a negative.
   ``--hard-cases N`` adds the patches the shipped predictor really makes the reader read: the bundle's predictor
   runs end to end on the first ``N`` training cases, and each of its ``--components`` largest predicted lesions
   becomes a patch, a negative where it touches no true lesion (vessels, heart, parenchyma the network took for a
   lesion), a lesion patch centred where the network put it where at least half of it is lesion (those in
   between are left out; about 3 s a case on the CPU; cached, and a cached smaller ``N`` is extended).
2. **Network.** Three conv stages (16-32-64 channels), global average + max pool, three logits: "a lesion is at
   the centre", "spiculated", "washout" (the last two trained on lesion patches only). Dihedral flips, +-4 px
   shifts, a shared gamma and per-phase +-3 % intensity jitter, Gaussian noise up to 0.03 (``--noise-max``: up to
   that for half the patches).
3. **Test.** On test cases (seeds 2,000,000..) the bundle's predictor runs end to end; the patches of its
   ``--components`` largest predicted lesions are scored, and a case's score is the most suspicious one's
   ``p_lesion * (1 - (1 - p_spiculated) (1 - p_washout))`` (the generator's label rule); where nothing was
   segmented the bundle's own case probability stands. It is compared with the bundle's probability, alone and
   averaged with it (no fit), and so is the patch of the largest *true* lesion (a reference that knows where the
   lesion is).

Example:
    python training/probe_roi.py --model Resources/Models/uml-breast-dce-small --out runs/roi \
        --train-cases 1000 --val-cases 200 --test-cases 200    # CPU: about 27 + 25 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from umlcore.bundle import ModelBundle, Normalization, load_bundle
from umlcore.predictor import Predictor, label_components
from umlcore.reader import READER_TARGETS, LesionReader, component_centres, cut_patch, suspicion
from umlcore.preprocess import slice_axis_index, to_slices
from umlcore.synthetic import generate_case

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_features import _auc, phenotype  # noqa: E402  (_auc: the AUC, null for one class)
from slices import case_from_synthetic, phases_as_read  # noqa: E402
from workers import ordered_map  # noqa: E402

VAL_SEED, TEST_SEED = 1_000_000, 2_000_000
MAX_ROIS = 4  # lesion patches per training case


def patch(channels: np.ndarray, z: int, y: float, x: float, spacing: float, size: int, context: int) -> np.ndarray:
    """:func:`umlcore.reader.cut_patch` of 1 mm pixels from a synthetic case's ``(C, S, H, W)`` channels, whose
    in-plane pixels are square (``spacing`` mm)."""
    return cut_patch(channels, z, y, x, (spacing, spacing), size, context)


def training_patches(job: tuple) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Patches of one generated case with their targets ``(lesion, spiculated, washout)`` and the voxels."""
    seed, shape, norm, size, context = job
    case = generate_case(seed, shape=shape, label_noise=0.02)
    vol = case_from_synthetic(case, norm)
    spacing = float(vol.spacing[0])
    spic, wash = phenotype(case)
    out = []
    for voxels, z, y, x in component_centres(vol.mask, MAX_ROIS):
        out.append((patch(vol.channels, z, y, x, spacing, size, context), np.array([1, spic, wash]), voxels))
    if not case.lesions:  # a negative where a network is tempted: a strongly enhancing pixel
        sub = vol.channels[1] - vol.channels[0]
        rng = np.random.default_rng(seed)
        top = np.flatnonzero(sub.ravel() >= np.quantile(sub, 0.998))
        z, y, x = np.unravel_index(int(top[rng.integers(top.size)]), sub.shape)
        out.append((patch(vol.channels, int(z), float(y), float(x), spacing, size, context), np.zeros(3, int), 0))
    return out


def build_patches(seeds: range, shape, norm: Normalization, size: int, context: int, workers: int) -> dict:
    jobs = [(s, tuple(shape), norm, size, context) for s in seeds]
    per_case = list(ordered_map(training_patches, jobs, workers))
    rows = [(s, *r) for s, rs in zip(seeds, per_case) for r in rs]
    return {"x": np.stack([r[1] for r in rows]), "y": np.stack([r[2] for r in rows]),
            "voxels": np.array([r[3] for r in rows]), "seed": np.array([r[0] for r in rows])}


def predicted_cases(bundle: ModelBundle, seeds: range, shape) -> Iterator[tuple]:
    """``(seed, case, prediction, normalised case, predicted labelmap (S, H, W) in slice order)`` for each seed: the
    bundle's predictor end to end on the generated case. The labelmap is the one whose components the case opinion
    reads (after the uncertainty filter), also for a card whose reader checks the written labelmap
    (``reader.segmentation_min_lesion``: that check is left out here, or it would hide the false lesions)."""
    reader = bundle.card.reader
    if reader is not None and reader.segmentation_min_lesion is not None:
        bundle = dataclasses.replace(bundle, card=dataclasses.replace(
            bundle.card, reader=dataclasses.replace(reader, segmentation_min_lesion=None)))
    predictor = Predictor(bundle, device="cpu", batch_size=8)
    norm = bundle.card.input.normalization
    for seed in seeds:
        case = generate_case(seed, shape=tuple(shape), label_noise=0.02)
        pred = predictor.predict(case.to_sitk(), case_id=f"synthetic-{seed}")
        vol = case_from_synthetic(phases_as_read(case, bundle.card.input, pred.summary), norm)  # as the predictor read
        yield seed, case, pred, vol, to_slices(sitk.GetArrayFromImage(pred.labelmap),
                                               slice_axis_index(case.direction, "axial"))


def predicted_patches(bundle: ModelBundle, seeds: range, shape, size: int, context: int, components: int,
                      log) -> dict:
    """Patches at the ``components`` largest lesions the bundle's predictor segments in each case of ``seeds``.

    A predicted component that overlaps no voxel of the true mask is a negative (targets ``(0, 0, 0)``); one at
    least half inside it is a lesion patch with the case's phenotype (as :func:`training_patches` labels every
    lesion of a case); one in between (e.g. a vessel grown into a lesion, centred off it) is left out.

    Returns:
        ``{"x": (N, C, size, size), "y": (N, 3), "voxels": (N,), "seed": (N,)}`` (``N`` may be 0).
    """
    channels = 3 * (2 * context + 1)
    rows: list[tuple] = []
    t0 = time.time()
    for n, (seed, case, _, vol, predicted) in enumerate(predicted_cases(bundle, seeds, shape)):
        comps, sizes, _ = label_components(predicted, np.zeros(predicted.shape, np.float32))
        spic, wash = phenotype(case)
        spacing = float(vol.spacing[0])
        for cid in (np.argsort(-sizes[1:], kind="stable")[:components] + 1):
            comp = comps == cid
            inside = float(vol.mask[comp].astype(bool).mean())
            if 0.0 < inside < 0.5:
                continue
            (voxels, z, y, x), = component_centres(comp, 1)
            target = np.array([1, spic, wash]) if inside else np.zeros(3, int)
            rows.append((seed, patch(vol.channels, z, y, x, spacing, size, context), target, voxels))
        if (n + 1) % 50 == 0:
            log(f"hard: {n + 1}/{len(seeds)} cases, {time.time() - t0:.0f} s")
    if not rows:
        return {"x": np.zeros((0, channels, size, size), np.float32), "y": np.zeros((0, 3), int),
                "voxels": np.zeros(0, int), "seed": np.zeros(0, int)}
    return {"x": np.stack([r[1] for r in rows]), "y": np.stack([r[2] for r in rows]),
            "voxels": np.array([r[3] for r in rows]), "seed": np.array([r[0] for r in rows])}


def cached_hard_patches(bundle: ModelBundle, n: int, out: Path, key: str, shape, size: int, context: int,
                        components: int, log) -> dict:
    """:func:`predicted_patches` of training cases ``0..n-1``, cached in ``out`` as ``hard-{n}-...npz``.

    The cache file names the cases, patch settings, normalisation and the bundle's weights (``key`` and its
    sha256). Where only a shorter prefix ``hard-{m}-...npz`` (``m < n``) of the same settings is cached, it is
    extended by cases ``m..n-1`` instead of recomputed (about 3 s a case on the CPU).
    """
    suffix = f"-{components}-{key}-{bundle.sha256[:12]}.npz"
    path = out / f"hard-{n}{suffix}"
    if path.is_file():
        return dict(np.load(path))
    cached = [int(f.name[len("hard-"):-len(suffix)]) for f in out.glob(f"hard-*{suffix}")
              if f.name[len("hard-"):-len(suffix)].isdigit()]
    done = max((m for m in cached if m < n), default=0)
    t0 = time.time()
    data = predicted_patches(bundle, range(done, n), shape, size, context, components, log)
    if done:
        first = dict(np.load(out / f"hard-{done}{suffix}"))
        data = {k: np.concatenate([first[k], data[k]]) for k in data}
    np.savez(out / "partial.npz", **data)
    (out / "partial.npz").replace(path)
    log(f"hard: {len(data['x'])} patches ({int((data['y'][:, 0] == 0).sum())} negatives) from {n} cases "
        f"({n - done} new) in {time.time() - t0:.0f} s")
    return data


def augment(x: torch.Tensor, crop: int, phases: int, gen: torch.Generator, noise_max: float = 0.03) -> torch.Tensor:
    """Random crop (shift), dihedral flip, shared gamma, per-phase jitter and noise of a ``(B, C, S, S)`` batch.

    The noise's sigma is drawn up to 0.03 for half the patches and up to ``noise_max`` for the other half (the same
    when ``noise_max`` is 0.03), so a reader trained for noisy inputs still sees clean ones."""
    b, c, s, _ = x.shape
    out = torch.empty(b, c, crop, crop)
    for i in range(b):
        oy, ox = torch.randint(0, s - crop + 1, (2,), generator=gen).tolist()
        p = x[i, :, oy:oy + crop, ox:ox + crop]
        if torch.rand(1, generator=gen) < 0.5:
            p = p.flip(-1)
        if torch.rand(1, generator=gen) < 0.5:
            p = p.flip(-2)
        if torch.rand(1, generator=gen) < 0.5:
            p = p.transpose(-1, -2)
        gamma = float(torch.empty(1).uniform_(0.8, 1.25, generator=gen))
        scale = torch.empty(phases).uniform_(0.97, 1.03, generator=gen).repeat_interleave(c // phases)
        high = 0.03  # no extra random draw at the default, so 1.3.0's reader command still reproduces its weights
        if noise_max != 0.03 and torch.rand(1, generator=gen) < 0.5:
            high = noise_max
        sigma = float(torch.empty(1).uniform_(0.0, high, generator=gen))
        out[i] = p.clamp(min=0).pow(gamma) * scale[:, None, None] + sigma * torch.randn(p.shape, generator=gen)
    return out


def centre(x: torch.Tensor, crop: int) -> torch.Tensor:
    o = (x.shape[-1] - crop) // 2
    return x[..., o:o + crop, o:o + crop]


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.float()
    lesion = F.binary_cross_entropy_with_logits(logits[:, 0], y[:, 0])
    m = y[:, 0] > 0  # margin and kinetics only where there is a lesion
    pheno = F.binary_cross_entropy_with_logits(logits[m, 1:], y[m, 1:]) if m.any() else logits.sum() * 0
    return lesion + pheno


@torch.no_grad()
def predict(net: LesionReader, x: np.ndarray, crop: int) -> np.ndarray:
    net.eval()
    out = [torch.sigmoid(net(centre(torch.from_numpy(x[i:i + 256]), crop))) for i in range(0, len(x), 256)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(READER_TARGETS)))


def aucs(p: np.ndarray, y: np.ndarray) -> dict:
    """AUCs of patch probabilities ``p (N, 3)`` against targets ``y (N, 3)``; margin and kinetics on lesion patches."""
    les = y[:, 0] > 0
    return {"lesion": _auc(p[:, 0], y[:, 0]), "spiculated": _auc(p[les, 1], y[les, 1]),
            "washout": _auc(p[les, 2], y[les, 2])}


def train(data: dict, val: dict, net: LesionReader, steps: int, batch: int, crop: int, seed: int, log,
          noise_max: float = 0.03) -> LesionReader:
    """``net`` trained on ``data``'s patches (``x (N, C, S, S)``, targets ``y (N, 3)``), reporting on ``val``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    t0 = time.time()
    for step in range(1, steps + 1):
        net.train()
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = loss_fn(net(augment(x[idx], crop, 3, gen, noise_max)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.3f}  val {aucs(predict(net, val['x'], crop), val['y'])}"
                f"  {time.time() - t0:.0f} s")
    return net


def test_rows(bundle: ModelBundle, seeds: range, shape, size: int, context: int, components: int, log) -> dict:
    """The bundle's predictor end to end on each test case; the patches at its ``components`` largest predicted
    lesions (zeros beyond those found) and at the largest true lesion."""
    rows = {k: [] for k in ("seed", "label", "lesion", "spiculated", "washout", "true_voxels", "predicted_components",
                            "bundle_p", "x_pred", "x_true")}
    t0 = time.time()
    for n, (seed, case, pred, vol, predicted) in enumerate(predicted_cases(bundle, seeds, shape)):
        spacing = float(vol.spacing[0])
        x = np.zeros((components + 1, len(vol.channels) * (2 * context + 1), size, size), np.float32)
        found = component_centres(predicted, components)
        for k, (_, z, y, x_) in enumerate(found):
            x[k] = patch(vol.channels, z, y, x_, spacing, size, context)
        for _, z, y, x_ in component_centres(vol.mask, 1):
            x[-1] = patch(vol.channels, z, y, x_, spacing, size, context)
        rows["x_pred"].append(x[:-1])
        rows["x_true"].append(x[-1])
        spic, wash = phenotype(case)
        for k, v in (("seed", seed), ("label", case.label), ("lesion", int(bool(case.lesions))), ("spiculated", spic),
                     ("washout", wash), ("true_voxels", int(case.mask.sum())), ("predicted_components", len(found)),
                     ("bundle_p", float(pred.summary["classification"]["positive_probability"]))):
            rows[k].append(v)
        if (n + 1) % 20 == 0:
            log(f"test {n + 1}/{len(seeds)} cases, {time.time() - t0:.0f} s")
    return {k: np.array(v) for k, v in rows.items()}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle folder / zip (its normalisation; its predictor at test)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train-cases", type=int, default=1000)
    p.add_argument("--val-cases", type=int, default=200)
    p.add_argument("--test-cases", type=int, default=200,
                   help="0: no test (evaluate.py tests the reader once add_reader.py put it in a bundle)")
    p.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256))
    p.add_argument("--size", type=int, default=88, help="patch side in 1 mm pixels (training crops --crop of it)")
    p.add_argument("--crop", type=int, default=80)
    p.add_argument("--context", type=int, default=1, help="slices on either side")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--noise-max", type=float, default=0.03,
                   help="training noise: sigma up to 0.03 for half the patches, up to this for the other half")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", type=int, default=3,
                   help="predicted lesions scored per test case (and per --hard-cases case)")
    p.add_argument("--hard-cases", type=int, default=0,
                   help="add the patches of the bundle's predicted lesions on the first N training cases (those "
                        "touching no true lesion as negatives): what the reader reads in the predictor")
    p.add_argument("--weights", type=Path, help="a roinet.safetensors of an earlier run with the same --context: "
                                                "test it (no training patches, no training)")
    args = p.parse_args(argv)
    if min(args.train_cases, args.val_cases) < 20 or 0 < args.test_cases < 20:
        p.error("--train-cases and --val-cases must be at least 20 each, --test-cases 0 (no test) or at least 20")
    if not 0.0 <= args.noise_max <= 1.0:
        p.error(f"--noise-max must lie in [0, 1] (a fraction of the normalised range), got {args.noise_max}")
    if args.hard_cases and args.weights:
        p.error("--hard-cases adds training patches, --weights trains nothing: give one of them")
    if not 0 <= args.hard_cases <= args.train_cases:
        p.error(f"--hard-cases must lie in [0, --train-cases={args.train_cases}] (they are training cases)")
    if not 8 <= args.crop <= args.size:
        p.error(f"--crop must lie in [8, --size={args.size}]")
    args.out.mkdir(parents=True, exist_ok=True)
    logf = (args.out / "log.txt").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    if args.weights and not args.weights.is_file():
        p.error(f"--weights {args.weights}: no such file; give the roinet.safetensors an earlier run wrote")
    torch.set_num_threads(args.workers)
    bundle = load_bundle(args.model)
    norm = bundle.card.input.normalization
    torch.manual_seed(args.seed)  # the reader's initial weights
    net = LesionReader(3 * (2 * args.context + 1))
    if args.weights:
        try:
            net.load_state_dict(load_file(str(args.weights)))
        except Exception as err:  # another --context, or not a reader's weights at all
            p.error(f"--weights {args.weights} does not fit a reader of --context {args.context}: {err}")
    # cached patches are reused only for the same cases, patch settings and normalisation (test: the same bundle)
    key = f"{'x'.join(map(str, args.shape))}-{args.size}-{args.context}-{norm.mode}{norm.lower}-{norm.upper}"
    sets = {}
    for name, base, n in (("train", 0, args.train_cases), ("val", VAL_SEED, args.val_cases)):
        path = args.out / f"{name}-{n}-{key}.npz"
        if name == "train" and args.weights:
            continue
        if not path.is_file():
            t0 = time.time()
            data = build_patches(range(base, base + n), args.shape, norm, args.size, args.context, args.workers)
            np.savez(args.out / "partial.npz", **data)
            (args.out / "partial.npz").replace(path)
            log(f"{name}: {len(data['x'])} patches from {n} cases in {time.time() - t0:.0f} s")
        sets[name] = dict(np.load(path))
    hard_stats = None
    if args.hard_cases and not args.weights:
        hard = cached_hard_patches(bundle, args.hard_cases, args.out, key, args.shape, args.size, args.context,
                                   args.components, log)
        hard_stats = {"hard_cases": args.hard_cases, "hard_patches": int(len(hard["x"])),
                      "hard_negatives": int((hard["y"][:, 0] == 0).sum())}
        sets["train"] = {k: np.concatenate([sets["train"][k], hard[k]]) for k in sets["train"]}
    test_path = args.out / f"test-{args.test_cases}-{args.components}-{key}-{bundle.sha256[:12]}.npz"
    if args.test_cases and not test_path.is_file():
        data = test_rows(bundle, range(TEST_SEED, TEST_SEED + args.test_cases), args.shape, args.size,
                         args.context, args.components, log)
        np.savez(args.out / "partial.npz", **data)
        (args.out / "partial.npz").replace(test_path)
    test = dict(np.load(test_path)) if args.test_cases else None

    if not args.weights:
        net = train(sets["train"], sets["val"], net, args.steps, args.batch, args.crop, args.seed, log,
                    args.noise_max)
        save_file(net.state_dict(), str(args.out / "roinet.safetensors"))
    report = {"val": aucs(predict(net, sets["val"]["x"], args.crop), sets["val"]["y"]),
              "val_patches": int(len(sets["val"]["x"])), "noise_max": args.noise_max, "steps": args.steps}
    if "train" in sets:
        report["train_patches"] = int(len(sets["train"]["x"]))
    if hard_stats is not None:  # the hard patches are counted in train_patches too
        report.update(hard_stats)
    if test is None:  # --test-cases 0: the reader is tested end to end by evaluate.py once it is in a bundle
        (args.out / "report.json").write_text(json.dumps(report, indent=2))
        return 0
    report["test_cases"] = int(len(test["seed"]))
    y_case = np.stack([test["lesion"], test["spiculated"], test["washout"]], axis=1)
    lesion, label, bundle_p = test["lesion"] > 0, test["label"], test["bundle_p"]
    n, k = test["x_pred"].shape[:2]
    p_pred = predict(net, test["x_pred"].reshape(n * k, *test["x_pred"].shape[2:]), args.crop).reshape(n, k, -1)
    found = np.arange(k)[None, :] < test["predicted_components"][:, None]
    score_pred = np.where(found, suspicion(p_pred), -1.0).max(axis=1)  # the most suspicious predicted lesion
    p_true = predict(net, test["x_true"], args.crop)
    # where nothing was found, the bundle's own probability stands
    sources = {"pred": (p_pred[:, 0], found[:, 0], score_pred), "true": (p_true, lesion, suspicion(p_true))}
    for source, (p_largest, has, score) in sources.items():
        roi = np.where(has, score, bundle_p)
        row = {"cases_with_a_patch": int(has.sum()),
               "patch_auc_lesion_cases": aucs(p_largest[lesion & has], y_case[lesion & has]),
               "label_auc_bundle": _auc(bundle_p, label), "label_auc_roi": _auc(roi, label),
               "label_auc_mean": _auc(np.where(has, 0.5 * (score + bundle_p), bundle_p), label)}
        for lo, hi in ((0, 100), (100, 1000), (1000, 10 ** 9)):
            m = lesion & has & (test["true_voxels"] >= lo) & (test["true_voxels"] < hi)
            row[f"spiculated_auc_{lo}-{hi}"] = [int(m.sum()), _auc(p_largest[m, 1], test["spiculated"][m])]
        report[source] = row
        log(f"{source} patches: {json.dumps(row)}")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
