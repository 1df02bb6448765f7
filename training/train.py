"""Train a UML network: config -> data -> model -> schedule -> loop -> checkpoint.

Examples:
    python training/train.py --out runs/small                       # synthetic breast DCE-MRI, small preset
    python training/train.py --config runs/small/train_config.json  # same settings from a JSON file
    python training/train.py --out runs/small --resume              # continue from runs/small/last.*

``--resume`` continues from the last finished epoch with the saved optimiser state and the run's saved
``train_config.json`` (flags override it; one that would change the architecture is refused). Giving a larger ``--epochs``
with ``--resume`` stretches the cosine schedule over the new total, i.e. a warm restart from the learning rate
the longer schedule has at that step.

Everything a run needs is in the typed :class:`TrainConfig`; it is saved as ``train_config.json`` beside
the checkpoints. Checkpoints are safetensors (no pickle): ``best.safetensors`` (model weights of the best
validation score), ``last.safetensors`` + ``last_optim.safetensors`` + ``last.json`` (for ``--resume``).
A CSV log ``log.csv`` gets one row per epoch (and TensorBoard events when tensorboard is installed).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slices import LesionSampling, SliceSampler, VolumeCase, case_from_synthetic, predict_volume  # noqa: E402
from workers import ordered_map  # noqa: E402
from umlcore import metrics  # noqa: E402
from umlcore.bundle import Normalization, load_bundle  # noqa: E402
from umlcore.config import UMLConfig  # noqa: E402
from umlcore.evidential import opinion  # noqa: E402
from umlcore.fusion import fuse_slice_opinions  # noqa: E402
from umlcore.losses import DiceMode, LossWeights, kl_annealing, uml_loss  # noqa: E402
from umlcore.network import UMLNet  # noqa: E402
from umlcore.predictor import strict_fp32  # noqa: E402
from umlcore.synthetic import generate_case  # noqa: E402

VAL_SEED_BASE = 1_000_000  # validation seeds; the test seeds of evaluate.py start at 2_000_000


# ----------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """All settings of a training run (saved beside the weights as JSON)."""

    out: str = "runs/uml-small"
    data: Literal["synthetic"] = "synthetic"
    preset: Literal["small", "medium", "paper"] = "small"
    cls_pool: Literal["preset", "avg", "avg+max", "avg+max+lesion"] = "preset"  # the instructor's pooling
    init: str = ""  # start from these weights (a bundle folder / zip, or a .safetensors of the same architecture)
    # 2.5D: neighbouring slices on each side as extra input channels (0 = 2D; the bundle's input.context_slices)
    context_slices: int = 0
    # synthetic data: training seeds [seed_base, seed_base + train_cases), validation seeds from VAL_SEED_BASE
    train_cases: int = 240
    val_cases: int = 40
    case_shape: tuple[int, int, int] = (32, 128, 128)
    label_noise: float = 0.02
    seed_base: int = 0
    # schedule
    epochs: int = 30
    steps_per_epoch: int = 100
    batch_size: int = 16
    crop: int = 96
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    kl_anneal_epochs: float = 10.0
    single_volume_prob: float = 0.3
    lesion_fraction: float = 0.5
    channel_jitter: float = 0.03  # per-channel intensity jitter on top of the shared gamma / contrast (+-3 %)
    noise_max: float = 0.03  # per-sample Gaussian noise sigma ~ U[0, noise_max] (normalised units; eval tests 0.2)
    # the lesion share of a batch: every lesion slice equally likely ("slice") or every lesion ("lesion")
    lesion_sampling: LesionSampling = "slice"
    dice_mode: DiceMode = "batch"  # log-Dice over the whole batch or one per sample (small lesions weigh more)
    # runtime
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off"] = "auto"  # auto: bf16 autocast on CUDA only, never on CPU
    # auto: torch.compile the training forward on CUDA only. Off by default: the one compiled H100 run
    # (torch 2.11, bf16) gave non-finite class evidence within its first 500 steps, the eager run did not
    compile: Literal["auto", "off"] = "off"
    workers: int = 2  # processes generating the synthetic cases
    threads: int = 0  # torch CPU threads; 0 = torch default
    max_minutes: float = 0.0  # stop after the epoch that crosses this wall-clock budget (0 = no limit)

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SystemExit(f"train.py: error: unknown fields {unknown} in {path}; known: {sorted(known)}")
        if "case_shape" in data:
            data["case_shape"] = tuple(data["case_shape"])
        return cls(**data)


def parse_args(argv: Optional[list[str]] = None) -> tuple[TrainConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file with TrainConfig fields (command-line flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.* if present")
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = type(getattr(defaults, f.name))
        flag = f"--{f.name.replace('_', '-')}"
        if kind is tuple:
            p.add_argument(flag, type=int, nargs=3, default=None)
        elif typing.get_origin(hints[f.name]) is Literal:  # a mode: argparse names the choices on a typo
            p.add_argument(flag, type=kind, choices=typing.get_args(hints[f.name]), default=None)
        else:
            p.add_argument(flag, type=kind, default=None)
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    saved = Path(overrides.get("out", defaults.out)) / "train_config.json"
    if args.config:
        cfg = TrainConfig.from_json(args.config)
    elif args.resume and saved.exists():  # resume the run as it was configured; flags still override
        cfg = TrainConfig.from_json(str(saved))
    else:
        cfg = TrainConfig()
    if "case_shape" in overrides:
        overrides["case_shape"] = tuple(overrides["case_shape"])
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.crop % 8:
        p.error(f"--crop must be a multiple of 8, got {cfg.crop}")
    if not 0 <= cfg.context_slices <= 8:
        p.error(f"--context-slices must be from 0 (2D) to 8, got {cfg.context_slices}")
    for name, hint in hints.items():  # modes read from a --config file are checked here
        if typing.get_origin(hint) is Literal and getattr(cfg, name) not in typing.get_args(hint):
            p.error(f"--{name.replace('_', '-')} must be one of {', '.join(typing.get_args(hint))}, "
                    f"got {getattr(cfg, name)!r}")
    return cfg, args.resume


# ------------------------------------------------------------------------------------------------- data
NORM = Normalization()  # the shipped bundle's input normalisation (percentile 0.5 / 99.5 -> [0, 1])
PHASES = ("pre", "early", "late")  # the synthetic cases' channels, as the exported card names them


def _make_case(args: tuple[int, tuple[int, int, int], float]) -> VolumeCase:
    seed, shape, noise = args
    return case_from_synthetic(generate_case(seed, shape=shape, label_noise=noise), NORM)


def synthetic_cases(seeds: range, shape: tuple[int, int, int], noise: float, workers: int) -> list[VolumeCase]:
    return list(ordered_map(_make_case, [(s, shape, noise) for s in seeds], workers))


# ------------------------------------------------------------------------------------------- validation
def validate(model: UMLNet, cases: list[VolumeCase], device: torch.device, context_slices: int = 0) -> dict[str, float]:
    """Volume-level Dice (cases with a lesion), case accuracy / AUC / ECE from fused slice opinions."""
    model.eval()
    dices, probs, labels, u_case, pix_u, pix_err = [], [], [], [], [], []
    rng = np.random.default_rng(0)
    for case in cases:
        with strict_fp32():  # as the predictor runs by default: no TF32 convolutions on CUDA
            seg_alpha, cls_alpha, labelmap = predict_volume(model, case.channels, batch_size=32, device=device,
                                                            context_slices=context_slices)
        if case.mask.any():
            dices.append(metrics.dice(labelmap, case.mask))
        sel = rng.random(labelmap.size) < 0.05  # 5 % of the voxels: does a high u flag the wrong ones?
        pix_u.append((seg_alpha.shape[1] / seg_alpha.sum(1)).ravel()[sel])
        pix_err.append((labelmap != case.mask).ravel()[sel])
        lesion_voxels = (labelmap > 0).reshape(labelmap.shape[0], -1).sum(1)
        alpha = fuse_slice_opinions(cls_alpha, lesion_voxels)
        op = opinion(torch.from_numpy(alpha)[None])
        probs.append(float(op.probability[0, 1]))
        u_case.append(float(op.uncertainty[0, 0]))
        labels.append(case.label)
    probs_a, labels_a = np.array(probs), np.array(labels)
    return {
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "accuracy": metrics.accuracy(probs_a, labels_a),
        "auc": metrics.roc_auc(probs_a, labels_a),
        "ece": metrics.expected_calibration_error(probs_a, labels_a),
        "case_uncertainty": float(np.mean(u_case)),
        "pixel_u_auroc": metrics.uncertainty_error_auroc(np.concatenate(pix_u), np.concatenate(pix_err)),
    }


def score(m: dict[str, float]) -> float:
    """Best-checkpoint criterion: Dice + AUC - ECE (higher is better); a metric a small validation set cannot
    give (no lesion: Dice; one class: AUC) counts 0."""
    return float(np.nan_to_num(m["dice"]) + np.nan_to_num(m["auc"]) - np.nan_to_num(m["ece"]))


# ------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(out: Path, model: UMLNet, opt: torch.optim.Optimizer, state: dict) -> None:
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "last.safetensors"))
    optim = {}
    for pid, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            optim[f"{pid}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().contiguous()
    save_file(optim, str(out / "last_optim.safetensors"))
    (out / "last.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(out: Path, model: UMLNet, opt: torch.optim.Optimizer) -> dict:
    model.load_state_dict(load_file(str(out / "last.safetensors")))
    flat = load_file(str(out / "last_optim.safetensors"))
    sd = opt.state_dict()
    state: dict = {}
    for key, value in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)
    return json.loads((out / "last.json").read_text())


def init_weights(path: str, model: UMLNet) -> list[str]:
    """Load the weights to start from into ``model``; returns notes on the tensors not loaded as they were.

    ``path`` is a ``.safetensors`` of the run's architecture, or a model bundle whose architecture equals the
    run's or differs from it only in ``cls_pool`` and, for a 2D bundle, in the 2.5D input channels. Both are
    extended so that the warm-started network's outputs equal the bundle's:

    - the pooled vector is ordered avg, max, lesion, so a bundle with fewer pools gives the first columns of the
      instructor's linear layer and the new ones start at zero;
    - a 2D bundle (``context_slices`` 0) starting a 2.5D run (``2k + 1`` slices per channel): the two encoder stems'
      weights for channel ``c`` go to that channel's centre slice, ``c * (2k + 1) + k``, and the neighbours'
      weights start at zero.
    """
    if path.endswith(".safetensors"):
        model.load_state_dict(load_file(path))
        return []
    bundle = load_bundle(path)
    arch, k_bundle = bundle.card.architecture, bundle.card.input.context_slices
    ratio = model.config.in_channels // arch.in_channels
    inflate = k_bundle == 0 and ratio > 1 and ratio % 2 == 1 and ratio * arch.in_channels == model.config.in_channels
    same = dataclasses.replace(arch, cls_pool=model.config.cls_pool, in_channels=model.config.in_channels)
    if same != model.config or (arch.in_channels != model.config.in_channels and not inflate):
        raise SystemExit(f"train.py: error: --init {path} has architecture {arch}, but this run "
                         f"builds {model.config}; pick the bundle's preset and channels, or train from scratch")
    state, notes = model.state_dict(), []
    for name, value in bundle.model.state_dict().items():
        if value.shape == state[name].shape:
            state[name] = value.detach().clone()
        elif name == "instructor.fc.weight" and value.shape[1] < state[name].shape[1]:
            state[name] = torch.zeros_like(state[name])
            state[name][:, :value.shape[1]] = value
            notes.append(f"{name}: {value.shape[1]} -> {state[name].shape[1]} inputs, the new ones at 0")
        elif inflate and name.endswith("stem.0.weight") and value.shape[1] == arch.in_channels:
            state[name] = torch.zeros_like(state[name])
            state[name][:, ratio // 2::ratio] = value  # channel c -> c * (2k + 1) + k, the centre slice
            notes.append(f"{name}: {value.shape[1]} -> {state[name].shape[1]} input channels (2.5D), "
                         "the neighbouring slices' at 0")
        else:
            notes.append(f"{name}: fresh")
    model.load_state_dict(state)
    return notes


def model_config(cfg: TrainConfig, n_phases: int = len(PHASES)) -> UMLConfig:
    """The run's architecture: its preset, with ``--cls-pool`` unless that is ``preset``, taking ``n_phases``
    input volumes at ``2 * context_slices + 1`` slices each."""
    pool = {} if cfg.cls_pool == "preset" else {"cls_pool": cfg.cls_pool}
    return UMLConfig.preset(cfg.preset, in_channels=n_phases * (2 * cfg.context_slices + 1), **pool)


def check_resume(out: Path, cfg: TrainConfig) -> None:
    """Refuse, before anything in ``out`` is overwritten, a resume that would build another architecture."""
    saved = out / "model_config.json"
    if not ((out / "last.json").exists() and saved.exists()):
        return
    before = UMLConfig.from_json(saved.read_text())
    now = model_config(cfg)
    if now != before:
        raise SystemExit(f"train.py: error: {out} was trained with architecture {before}, but this resume builds "
                         f"{now}; resume with --config {out / 'train_config.json'} (or the run's --preset, "
                         "--cls-pool and --context-slices)")


# ------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict:
    cfg, resume = parse_args(argv)
    t_start = time.time()  # --max-minutes counts from here (data generation included)
    out = Path(cfg.out)
    if resume:
        check_resume(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.txt", "a") as f:  # every invocation, so a resumed run's history is complete
        f.write("python training/train.py " + " ".join(sys.argv[1:] if argv is None else argv) + "\n")
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    use_amp = cfg.amp == "auto" and device.type == "cuda"
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed crop size: let cuDNN pick its fastest kernels

    # data
    t0 = time.time()
    train_cases = synthetic_cases(range(cfg.seed_base, cfg.seed_base + cfg.train_cases), cfg.case_shape,
                                  cfg.label_noise, cfg.workers)
    val_cases = synthetic_cases(range(VAL_SEED_BASE, VAL_SEED_BASE + cfg.val_cases), cfg.case_shape,
                                cfg.label_noise, cfg.workers)
    sampler = SliceSampler(train_cases, cfg.crop, cfg.lesion_fraction, cfg.single_volume_prob, seed=cfg.seed,
                           device=device, channel_jitter=cfg.channel_jitter, noise_max=cfg.noise_max,
                           lesion_sampling=cfg.lesion_sampling, context_slices=cfg.context_slices)
    print(f"data: {len(train_cases)} train / {len(val_cases)} val cases, {len(sampler.all_slices)} train slices "
          f"({len(sampler.lesion_slices)} with lesion) in {time.time() - t0:.1f}s", flush=True)

    # model
    model_cfg = model_config(cfg, train_cases[0].channels.shape[0])
    model = UMLNet(model_cfg).to(device)
    (out / "model_config.json").write_text(model_cfg.to_json())  # written first, so any checkpoint can be exported
    print(f"model: preset {cfg.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{model_cfg.in_channels} input channels{f' (2.5D, +-{cfg.context_slices} slices)' if cfg.context_slices else ''}, "
          f"device {device}{' (bf16 autocast)' if use_amp else ''}", flush=True)

    # the training forward runs compiled on CUDA (fuses the many small element-wise ops of this narrow network);
    # validation and the checkpoints use the plain module, which shares its parameters
    step_model = torch.compile(model) if cfg.compile == "auto" and device.type == "cuda" else model

    # schedule: AdamW, linear warm-up then cosine decay over all steps; KL weight annealed per epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * cfg.steps_per_epoch

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    state = {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "best_metrics": {}}
    if cfg.init and not (resume and (out / "last.json").exists()):
        notes = init_weights(cfg.init, model)
        print(f"initialised from {cfg.init}" + (f" ({'; '.join(notes)})" if notes else ""), flush=True)
    if resume and (out / "last.json").exists():
        state = load_checkpoint(out, model, opt)
        sampler.reseed(cfg.seed + state["step"])
        print(f"resumed from epoch {state['epoch']}", flush=True)

    log_path = out / "log.csv"
    fields = ["epoch", "step", "lr", "kl_weight", "loss", "cls", "seg", "mutual", "dice", "accuracy", "auc", "ece",
              "case_uncertainty", "pixel_u_auroc", "seconds"]
    if not (resume and log_path.exists()):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional
        tb = SummaryWriter(str(out / "tensorboard"))
    except Exception:
        tb = None

    # loop
    weights = LossWeights()
    skipped = 0  # updates skipped for a non-finite gradient (reported per epoch)
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        kl_weight = kl_annealing(epoch, cfg.kl_anneal_epochs)
        t_epoch = time.time()
        sums = {k: torch.zeros((), device=device) for k in ("total", "cls", "seg", "mutual")}  # summed on the device
        for i in range(cfg.steps_per_epoch):
            step = state["step"]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            x, seg, cls = sampler.batch(cfg.batch_size)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                try:
                    out_ = step_model(x)
                except Exception as exc:  # a compile failure surfaces at the first call: go on uncompiled
                    if step_model is model:
                        raise
                    print(f"\ntorch.compile failed ({type(exc).__name__}: {exc}); training uncompiled", flush=True)
                    step_model = model
                    out_ = model(x)
            out_ = type(out_)(*(o.float() if torch.is_tensor(o) else tuple(t.float() for t in o) for o in out_))
            losses = uml_loss(out_, cls, seg, kl_weight, weights, cfg.dice_mode)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            if not torch.isfinite(grad_norm):  # a non-finite loss or gradient: skip the update, keep the weights
                skipped += 1
                if skipped > 20:
                    raise SystemExit(f"train.py: error: {skipped} steps with a non-finite loss or gradient "
                                     f"(last at step {step}); lower --lr or use --amp off")
                state["step"] = step + 1
                continue
            opt.step()
            state["step"] = step + 1
            for k in sums:
                sums[k] += losses[k].detach()
            if (i + 1) % 50 == 0 or i + 1 == cfg.steps_per_epoch:  # reading the loss waits for the device
                done = (i + 1) / cfg.steps_per_epoch
                bar = "#" * int(done * 20)
                print(f"\repoch {epoch + 1}/{cfg.epochs} [{bar:<20}] loss {sums['total'] / (i + 1):.4f}",
                      end="", flush=True)
        sums = {k: float(v) for k, v in sums.items()}
        train_seconds = time.time() - t_epoch
        val = validate(model, val_cases, device, cfg.context_slices)
        row = {"epoch": epoch + 1, "step": state["step"], "lr": lr_at(state["step"]), "kl_weight": kl_weight,
               "loss": sums["total"] / cfg.steps_per_epoch,
               **{k: sums[k] / cfg.steps_per_epoch for k in ("cls", "seg", "mutual")}, **val,
               "seconds": time.time() - t_epoch}
        print(f"\repoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} | val dice {val['dice']:.3f} "
              f"acc {val['accuracy']:.3f} auc {val['auc']:.3f} ece {val['ece']:.3f} u {val['case_uncertainty']:.3f} "
              f"pix-u-auroc {val['pixel_u_auroc']:.3f} | {row['seconds']:.0f}s "
              f"({cfg.steps_per_epoch / train_seconds:.1f} steps/s, {skipped} skipped)", flush=True)
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in fields])
        if tb is not None:
            for k, v in row.items():
                tb.add_scalar(k, v, epoch + 1)
        if score(val) > state["best_score"]:
            state.update(best_score=score(val), best_epoch=epoch + 1, best_metrics=val)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(out / "best.safetensors"))
        state["epoch"] = epoch + 1
        save_checkpoint(out, model, opt, state)
        if cfg.max_minutes and time.time() - t_start > 60 * cfg.max_minutes and epoch + 1 < cfg.epochs:
            print(f"stopping after epoch {epoch + 1}: --max-minutes {cfg.max_minutes} reached "
                  f"(continue with --resume)", flush=True)
            break

    print(f"best epoch {state['best_epoch']}: {state['best_metrics']}", flush=True)
    return state


if __name__ == "__main__":
    main()
