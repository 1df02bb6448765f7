"""Train the lesion reader (:mod:`umlcore.reader`): a small CNN that reads a patch around a segmented lesion.

Example (from the repository root):
    python -m training.train_reader --model Resources/Models/uml-breast-dce-small --out runs/reader \\
        --train-cases 1000 --val-cases 200 --hard-cases 200

1. **Patches.** Around each lesion (3D component of the true mask, up to ``MAX_LESIONS`` a case) of the training
   cases, an axial patch of ``size`` x ``size`` pixels of 1 mm (bilinear), centred on the component's centroid in
   its widest slice, with ``context`` slices on either side of every phase, normalised as ``--model``'s card says.
   A lesion-free case adds one patch centred on a strongly enhancing pixel as a negative. With ``hard_cases`` N,
   ``--model``'s predictor also runs end to end on the first N training cases, and each of its ``components``
   largest components after the uncertainty filter becomes a patch of the phases as it read them: a negative where
   it touches no true lesion (vessels, heart, parenchyma the network took for a lesion), a lesion patch where at
   least half of it is lesion (those in between are left out). Patches are cached in ``--out`` per case set.
2. **Training.** Three targets: a lesion is at the centre; its margin is spiculated; its kinetics wash out (the last
   two on lesion patches only). AdamW with a one-cycle schedule; random crops of ``crop`` pixels, dihedral flips, a
   shared gamma, per-phase +-3 % intensity and Gaussian noise (sigma up to 0.03, or up to ``noise_max`` for half the
   patches).
3. **Output** in ``--out``: ``reader.safetensors``, ``reader.json`` (the card's ``reader`` section with the run's
   record and its validation AUCs), ``train_config.json`` and ``log.txt``. ``python -m training.export --reader``
   puts it into a bundle; ``python -m training.evaluate`` measures it there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from umlcore import metrics
from umlcore.bundle import ModelBundle, load_bundle
from umlcore.card import Normalization, ReaderConfig
from umlcore.components import component_centres, label_components
from umlcore.predictor import Predictor
from umlcore.preprocess import inplane_axes, slice_axis_index, to_slices
from umlcore.reader import READER_TARGETS, LesionReader, cut_patch
from umlcore.synthetic import SyntheticCase, generate_case

from .cases import PHASES
from .config import check_shape, config_parser, parse_config, run_tool
from .evaluate import card_settings
from .slices import case_from_synthetic
from .splits import seeds
from .workers import ordered_map

__all__ = ["ReaderTrainConfig", "main"]

MAX_LESIONS = 4  # lesion patches per training case


@dataclass
class ReaderTrainConfig:
    """The settings of a reader training run."""

    model: str = ""  # the bundle whose normalisation the patches take and whose predictor makes the hard cases
    out: str = "runs/reader"
    train_cases: int = 1000  # the first cases of the training split
    val_cases: int = 200  # the first cases of the validation split
    hard_cases: int = 0  # the first N training cases also give the predictor's own components (0: none)
    components: int = 3  # the predictor's largest components taken per hard case
    shape: tuple[int, int, int] = (24, 256, 256)
    size: int = 88  # patch side (1 mm pixels); training crops crop of it, the card reads crop
    crop: int = 80
    context: int = 1  # slices on either side
    steps: int = 4000
    batch: int = 32
    noise_max: float = 0.03
    seed: int = 0
    workers: int = 2


def _targets(case: SyntheticCase) -> np.ndarray:
    """A lesion patch's targets ``(1, spiculated, washout)``: 1 where any lesion of the case has that margin /
    kinetics (the generator's case label rule reads them so)."""
    return np.array([1, int(any(les["margin"] == "spiculated" for les in case.lesions)),
                     int(any(les["kinetics"] == "washout" for les in case.lesions))])


def training_patches(job: tuple) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Patches of one generated case with their targets and voxels (true lesions; else one enhancing negative)."""
    seed, shape, norm, size, context = job
    case = generate_case(seed, shape=shape, label_noise=0.02)
    vol = case_from_synthetic(case, norm)
    spacing = (float(vol.spacing[1]), float(vol.spacing[0]))
    out = [(cut_patch(vol.channels, z, y, x, spacing, size, context), _targets(case), voxels)
           for voxels, z, y, x in component_centres(vol.mask, MAX_LESIONS)]
    if not case.lesions:  # a negative where a network is tempted: a strongly enhancing pixel
        sub = vol.channels[1] - vol.channels[0]
        top = np.flatnonzero(sub.ravel() >= np.quantile(sub, 0.998))
        z, y, x = np.unravel_index(int(top[np.random.default_rng(seed).integers(top.size)]), sub.shape)
        out.append((cut_patch(vol.channels, int(z), float(y), float(x), spacing, size, context), np.zeros(3, int), 0))
    return out


def _stack(rows: list[tuple], channels: int, size: int) -> dict:
    """``{"x": (N, C, S, S), "y": (N, 3), "voxels": (N,), "seed": (N,)}`` of ``(seed, patch, target, voxels)`` rows."""
    if not rows:
        return {"x": np.zeros((0, channels, size, size), np.float32), "y": np.zeros((0, 3), int),
                "voxels": np.zeros(0, int), "seed": np.zeros(0, int)}
    return {"x": np.stack([r[1] for r in rows]).astype(np.float32), "y": np.stack([r[2] for r in rows]),
            "voxels": np.array([r[3] for r in rows]), "seed": np.array([r[0] for r in rows])}


def build_patches(cases: range, cfg: ReaderTrainConfig, norm: Normalization) -> dict:
    jobs = [(s, tuple(cfg.shape), norm, cfg.size, cfg.context) for s in cases]
    rows = [(s, *r) for s, rs in zip(cases, ordered_map(training_patches, jobs, cfg.workers)) for r in rs]
    return _stack(rows, len(PHASES) * (2 * cfg.context + 1), cfg.size)


def hard_patches(bundle: ModelBundle, cases: range, cfg: ReaderTrainConfig, log) -> list[tuple]:
    """Patches at the ``components`` largest components the bundle's predictor keeps after its uncertainty filter in
    each case (the phases as it read them): negatives where no true lesion is touched, lesion patches where at least
    half of the component is lesion."""
    predictor = Predictor(bundle, device="cpu")
    rows, t0 = [], time.time()
    for n, seed in enumerate(cases):
        case = generate_case(seed, shape=tuple(cfg.shape), label_noise=0.02)
        seen: dict = {}
        predictor.predict(case.to_sitk(), trace=seen.__setitem__)
        axis = slice_axis_index(case.direction, bundle.card.input.slicing_axis)
        channels, truth = seen["stack"].transpose(1, 0, 2, 3), to_slices(case.mask, axis) > 0
        w_axis, h_axis = inplane_axes(axis)
        spacing = (case.spacing[h_axis], case.spacing[w_axis])
        comps, sizes, _ = label_components(seen["filtered"], np.zeros(truth.shape, np.float32))
        for cid in np.argsort(-sizes[1:], kind="stable")[:cfg.components] + 1:
            comp = comps == cid
            inside = float(truth[comp].mean())
            if 0.0 < inside < 0.5:
                continue
            (voxels, z, y, x), = component_centres(comp, 1)
            target = _targets(case) if inside else np.zeros(3, int)
            rows.append((seed, cut_patch(channels, z, y, x, spacing, cfg.size, cfg.context), target, voxels))
        if (n + 1) % 50 == 0:
            log(f"hard: {n + 1}/{len(cases)} cases, {time.time() - t0:.0f} s")
    return rows


def cached(path: Path, make, log) -> dict:
    """``make()`` saved at ``path`` (atomically), or what an earlier run saved there."""
    if path.is_file():
        return dict(np.load(path))
    t0 = time.time()
    data = make()
    partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
    np.savez(partial, **data)
    partial.replace(path)
    log(f"{path.name}: {len(data['x'])} patches in {time.time() - t0:.0f} s")
    return data


def augment(x: torch.Tensor, crop: int, gen: torch.Generator, noise_max: float) -> torch.Tensor:
    """Random crop (shift), dihedral flip, shared gamma, per-phase +-3 % jitter and noise of a ``(B, C, S, S)`` batch;
    the noise's sigma is drawn up to 0.03 for half the patches and up to ``noise_max`` for the other half."""
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
        scale = torch.empty(len(PHASES)).uniform_(0.97, 1.03, generator=gen).repeat_interleave(c // len(PHASES))
        high = 0.03  # no extra random draw at the default, so runs with noise_max 0.03 reproduce earlier weights
        if noise_max != 0.03 and torch.rand(1, generator=gen) < 0.5:
            high = noise_max
        sigma = float(torch.empty(1).uniform_(0.0, high, generator=gen))
        out[i] = p.clamp(min=0).pow(gamma) * scale[:, None, None] + sigma * torch.randn(p.shape, generator=gen)
    return out


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.float()
    lesion = F.binary_cross_entropy_with_logits(logits[:, 0], y[:, 0])
    m = y[:, 0] > 0  # margin and kinetics only where there is a lesion
    phenotype = F.binary_cross_entropy_with_logits(logits[m, 1:], y[m, 1:]) if m.any() else logits.sum() * 0
    return lesion + phenotype


@torch.no_grad()
def predict(net: LesionReader, x: np.ndarray, crop: int) -> np.ndarray:
    """``(N, 3)`` probabilities of the centre crops of ``x``."""
    net.eval()
    o = (x.shape[-1] - crop) // 2
    out = [torch.sigmoid(net(torch.from_numpy(x[i:i + 256, :, o:o + crop, o:o + crop]))) for i in range(0, len(x), 256)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(READER_TARGETS)))


def aucs(p: np.ndarray, y: np.ndarray) -> dict:
    """AUCs of patch probabilities against targets; margin and kinetics on lesion patches (``None``: one class)."""
    les = y[:, 0] > 0

    def auc(scores, labels):
        value = metrics.roc_auc(scores, labels) if len(labels) else float("nan")
        return None if np.isnan(value) else round(float(value), 4)

    return {"lesion": auc(p[:, 0], y[:, 0]), "spiculated": auc(p[les, 1], y[les, 1]), "washout": auc(p[les, 2], y[les, 2])}


def train(data: dict, val: dict, net: LesionReader, cfg: ReaderTrainConfig, log) -> LesionReader:
    """``net`` trained on ``data``'s patches, reporting on ``val``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=cfg.steps, pct_start=0.1)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        net.train()
        idx = torch.randint(0, len(x), (cfg.batch,), generator=gen)
        loss = loss_fn(net(augment(x[idx], cfg.crop, gen, cfg.noise_max)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps}  loss {loss.item():.3f}  val {aucs(predict(net, val['x'], cfg.crop), val['y'])}"
                f"  {time.time() - t0:.0f} s")
    return net


def build_parser():
    return config_parser(ReaderTrainConfig, "python -m training.train_reader", __doc__)


def parse_args(argv: Optional[list[str]] = None) -> ReaderTrainConfig:
    p = build_parser()
    cfg, _ = parse_config(ReaderTrainConfig, argv, p)
    if not cfg.model:
        p.error("--model is required: the bundle whose normalisation the patches take (and whose predictor mines "
                "the hard cases)")
    if min(cfg.train_cases, cfg.val_cases, cfg.steps) < 20 or not 0 <= cfg.hard_cases <= cfg.train_cases:
        p.error("--train-cases, --val-cases and --steps must be at least 20, --hard-cases within [0, --train-cases]")
    if not 8 <= cfg.crop <= cfg.size or cfg.crop % 8 or not 0.0 <= cfg.noise_max <= 1.0:
        p.error("--crop must be a multiple of 8 in [8, --size]; --noise-max in [0, 1]")
    check_shape(p, "--shape", cfg.shape)
    return cfg


def patch_sets(cfg: ReaderTrainConfig, bundle: ModelBundle, out: Path, log) -> tuple[dict, dict, Optional[dict]]:
    """The training patches (with the hard cases'), the validation patches, and the hard cases' alone (``None``:
    none asked), each cached in ``out`` under a name of the cases, the patch settings and the normalisation (hard
    cases: also the bundle's weights and the card settings that decide its components)."""
    norm = bundle.card.input.normalization
    key = f"{'x'.join(map(str, cfg.shape))}-{cfg.size}-{cfg.context}-{norm.mode}{norm.lower}-{norm.upper}"
    data = cached(out / f"train-{cfg.train_cases}-{key}.npz",
                  lambda: build_patches(seeds("train", cfg.train_cases), cfg, norm), log)
    val = cached(out / f"val-{cfg.val_cases}-{key}.npz",
                 lambda: build_patches(seeds("validation", cfg.val_cases), cfg, norm), log)
    if not cfg.hard_cases:
        return data, val, None
    settings = hashlib.sha256(json.dumps(card_settings(bundle.card), sort_keys=True).encode()).hexdigest()[:8]
    hard = cached(out / f"hard-{cfg.hard_cases}-{cfg.components}-{key}-{bundle.sha256[:12]}-{settings}.npz",
                  lambda: _stack(hard_patches(bundle, seeds("train", cfg.hard_cases), cfg, log),
                                 len(PHASES) * (2 * cfg.context + 1), cfg.size), log)
    return {k: np.concatenate([data[k], hard[k]]) for k in data}, val, hard


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(argv)
    bundle = load_bundle(cfg.model)  # a bundle that cannot be used: one line, exit 2 (run_tool)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    with (out / "log.txt").open("a") as logf:
        def log(msg: str) -> None:
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        torch.set_num_threads(cfg.workers)
        data, val, hard = patch_sets(cfg, bundle, out, log)
        torch.manual_seed(cfg.seed)  # the reader's initial weights
        net = train(data, val, LesionReader(len(PHASES) * (2 * cfg.context + 1)), cfg, log)
        save_file(net.state_dict(), str(out / "reader.safetensors"))
        record = {"command": "python -m training.train_reader " + " ".join(sys.argv[1:] if argv is None else argv),
                  "config": dataclasses.asdict(cfg), "train_patches": int(len(data["x"])),
                  "val_patches": int(len(val["x"])), "val": aucs(predict(net, val["x"], cfg.crop), val["y"])}
        if hard is not None:
            record.update(hard_cases=cfg.hard_cases, hard_patches=int(len(hard["x"])),
                          hard_negatives=int((hard["y"][:, 0] == 0).sum()))
        section = ReaderConfig(width=16, context_slices=cfg.context, patch_size=cfg.crop, training=record)
        (out / "reader.json").write_text(json.dumps(dataclasses.asdict(section), indent=2) + "\n")
        log(f"validation AUCs {record['val']}; wrote {out / 'reader.safetensors'} and {out / 'reader.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "python -m training.train_reader"))
