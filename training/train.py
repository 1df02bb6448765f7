"""Train a UML network: config -> data -> model -> schedule -> loop -> checkpoint.

Examples (from the repository root):
    python -m training.train --config training/configs/synthetic-small.json --out runs/small
    python -m training.train --config training/configs/refuge.json --data refuge:/data/REFUGE --out runs/refuge
    python -m training.train --out runs/small --resume              # continue from runs/small/last.*

``--data`` is ``synthetic`` (the generator) or ``KIND:PATH``, a dataset folder (:mod:`training.data`): a dataset run
writes its split (``OUT/split.json``, or ``--split FILE``'s) and what its data is (``OUT/dataset.json``, for the
card). ``cache_cases`` bounds the cases held in memory: a window of that many slides through the training cases,
``new_cases_per_epoch`` of them replaced each epoch by cases loaded while the epoch before trains.

The same command runs under ``torchrun`` (several GPUs or machines; :mod:`training.distributed`): each process
trains on its shard of the training cases with ``batch_size / processes`` samples a step, the gradients averaged,
and the first process alone validates and writes (``cache_cases`` then counts per process):
    torchrun --nproc_per_node 4 -m training.train --config training/configs/refuge.json --data refuge:/data/REFUGE

Every setting is a field of :class:`TrainConfig`: a JSON config in ``training/configs/`` gives them, flags
override it, and the run's settings are saved as ``OUT/train_config.json``. ``--resume`` continues from the last
finished epoch with the saved optimiser state and settings (flags still override them; one that would change the
architecture is refused); a larger ``--epochs`` stretches the cosine schedule over the new total.
Checkpoints are safetensors (no pickle): ``best.safetensors`` (the best validation score), ``last.safetensors``
+ ``last_optim.safetensors`` + ``last.json`` (for ``--resume``); ``log.csv`` gets one row per epoch. ``max_minutes``
stops a run after the epoch that crosses a time budget, ``stop_after_epoch`` after a given epoch (the learning-rate
schedule still planned over ``epochs``), so a run can be continued with ``--resume``.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from umlcore import metrics
from umlcore.bundle import load_bundle
from umlcore.card import Normalization
from umlcore.config import UMLConfig
from umlcore.errors import UMLInputError
from umlcore.evidential import opinion
from umlcore.fusion import fuse_slice_opinions
from umlcore.losses import DiceMode, LossWeights, kl_annealing, uml_loss
from umlcore.network import UMLNet
from umlcore.predictor import strict_fp32
from umlcore.synthetic import generate_case

from . import distributed
from .config import check_shape, config_parser, parse_config, run_tool
from .data import (SYNTHETIC_INFO, DataSpec, DatasetInfo, Preparation, SliceLabel, SliceMode, StreamedCases, checked,
                   describe, load_case, resolve_split)
from .datasets import read_split
from .slices import LesionSampling, SliceSampler, VolumeCase, case_from_synthetic, predict_volume
from .splits import seeds
from .workers import ordered_map



# ----------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """All settings of a training run (saved beside the weights as JSON)."""

    out: str = "runs/uml-small"
    data: str = "synthetic"  # synthetic, or KIND:PATH (folder, ispy1, refuge, isic2017: training.data)
    # dataset runs: a split file to reuse ("" = split the dataset: patient-level, stratified, these fractions and seed)
    split: str = ""
    split_fractions: tuple[float, ...] = (0.7, 0.1, 0.2)
    split_seed: int = 0
    target_size: tuple[int, ...] = ()  # (rows, columns) every slice is resized to (the card's input.target_size)
    slices: SliceMode = "all"  # train on every slice, or on the segmented ones nearest the largest cross-section
    lesion_slices: int = 10  # with slices "largest-lesion": how many (the UML paper keeps 10 for I-SPY1)
    slice_label: SliceLabel = "lesion"  # a slice's class: the case's on slices with a segment ("lesion") or all ("case")
    cache_cases: int = 0  # dataset cases held in memory (0 = all); with fewer, new_cases_per_epoch slide through
    preset: Literal["small", "medium", "paper"] = "small"
    cls_pool: Literal["preset", "avg", "avg+max", "avg+max+lesion"] = "preset"  # the instructor's pooling
    init: str = ""  # start from these weights (a bundle folder / zip, or a .safetensors of the same architecture)
    # 2.5D: neighbouring slices on each side as extra input channels (0 = 2D; the bundle's input.context_slices)
    context_slices: int = 0
    # synthetic data: training seeds [seed_base, seed_base + train_cases) (with new_cases_per_epoch: a window of
    # that many seeds, see below), the first val_cases seeds of the validation split (training.splits)
    train_cases: int = 240
    # a sliding window of training seeds: each epoch the oldest N cases give way to N new ones, generated by the
    # workers while the epoch before trains (epoch e trains on seeds seed_base + e * N onwards); 0 = one fixed set
    new_cases_per_epoch: int = 0
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
    stop_after_epoch: int = 0  # stop after this epoch, the schedule still planned over `epochs` (0 = run them all)


def build_parser():
    return config_parser(TrainConfig, "python -m training.train", __doc__,
                         extra=[("--resume", {"action": "store_true", "help": "continue from OUT/last.* if present"})])


def parse_args(argv: Optional[list[str]] = None) -> tuple[TrainConfig, bool]:
    """The run's settings (``--config`` or, with ``--resume``, the run's own, then the flags) and ``--resume``."""

    def own_settings(args) -> Optional[Path]:
        path = Path(args.out or TrainConfig.out) / "train_config.json"
        return path if args.resume and path.exists() else None

    p = build_parser()
    cfg, args = parse_config(TrainConfig, argv, p, saved=own_settings)
    check_shape(p, "--case-shape", cfg.case_shape)
    if min(cfg.train_cases, cfg.val_cases, cfg.epochs, cfg.steps_per_epoch, cfg.batch_size) < 1:
        p.error("--train-cases, --val-cases, --epochs, --steps-per-epoch and --batch-size must be at least 1")
    if cfg.init and not Path(cfg.init).exists():
        p.error(f"--init {cfg.init} does not exist: give a bundle folder or .zip, or a .safetensors of this architecture")
    if not 0 <= cfg.stop_after_epoch <= cfg.epochs:
        p.error(f"--stop-after-epoch must be from 0 (every epoch) to --epochs ({cfg.epochs}), got {cfg.stop_after_epoch}")
    if cfg.crop % 8:
        p.error(f"--crop must be a multiple of 8, got {cfg.crop}")
    _check_data(p, cfg)
    if not 0 <= cfg.context_slices <= 8:
        p.error(f"--context-slices must be from 0 (2D) to 8, got {cfg.context_slices}")
    return cfg, args.resume


def _check_data(p, cfg: TrainConfig) -> None:
    """Refuse data settings that cannot work, before anything is read."""
    try:
        spec = DataSpec.parse(cfg.data)
    except UMLInputError as exc:
        p.error(str(exc))
    window = cfg.train_cases if spec.kind == "synthetic" else cfg.cache_cases
    if window and not 0 <= cfg.new_cases_per_epoch <= window:
        p.error(f"--new-cases-per-epoch must be from 0 (a fixed set) to the cases held ({window}: --train-cases for "
                f"synthetic data, --cache-cases for a dataset), got {cfg.new_cases_per_epoch}")
    if spec.kind != "synthetic" and cfg.cache_cases and not cfg.new_cases_per_epoch:
        p.error("--cache-cases holds a window of the training cases: give --new-cases-per-epoch (how many it replaces "
                "each epoch)")
    if cfg.target_size and (len(cfg.target_size) != 2 or min(cfg.target_size) < 8):
        p.error(f"--target-size must be two sizes (rows, columns) of at least 8, got {' '.join(map(str, cfg.target_size))}")
    if len(cfg.split_fractions) != 3 or min(cfg.split_fractions) < 0 or abs(sum(cfg.split_fractions) - 1) > 1e-6:
        p.error(f"--split-fractions must be 3 fractions (train, val, test) summing to 1, got {cfg.split_fractions}")
    if cfg.lesion_slices < 1 or min(cfg.cache_cases, cfg.split_seed) < 0:
        p.error("--lesion-slices must be at least 1, --cache-cases and --split-seed at least 0")


# ------------------------------------------------------------------------------------------------- data
NORM = Normalization()  # the shipped bundle's input normalisation (percentile 0.5 / 99.5 -> [0, 1])


def _make_case(args: tuple[int, tuple[int, int, int], float]) -> VolumeCase:
    seed, shape, noise = args
    return case_from_synthetic(generate_case(seed, shape=shape, label_noise=noise), NORM)


def synthetic_cases(case_seeds: range, shape: tuple[int, int, int], noise: float, workers: int) -> list[VolumeCase]:
    """The cases of ``case_seeds``, generated and normalised in ``workers`` processes."""
    return list(ordered_map(_make_case, [(s, shape, noise) for s in case_seeds], workers))


def case_stream(first_seed: int, shape: tuple[int, int, int], noise: float, workers: int,
                ahead: int) -> Iterator[VolumeCase]:
    """Cases of seeds ``first_seed, first_seed + 1, ...`` without end; the workers keep ``ahead`` cases in work
    beyond those taken, so the next epoch's new cases are made while this one trains."""
    return ordered_map(_make_case, ((s, shape, noise) for s in itertools.count(first_seed)), workers, ahead=ahead)


# ------------------------------------------------------------------------------------------- validation
def validate(model: UMLNet, cases: Iterable[VolumeCase], device: torch.device, context_slices: int = 0) -> dict[str, float]:
    """Volume-level Dice (mean over the segments a case has), case accuracy / AUC (two classes) / ECE from fused
    slice opinions."""
    model.eval()
    dices, probs, labels, u_case = [], [], [], []
    pix_counts = np.zeros((2, metrics.UNCERTAINTY_BINS), dtype=np.int64)  # does a high u flag the wrong voxels?
    for case in cases:
        with strict_fp32():  # as the predictor runs by default: no TF32 convolutions on CUDA
            seg_alpha, cls_alpha, labelmap = predict_volume(model, case.channels, batch_size=32, device=device,
                                                            context_slices=context_slices)
        present = [k for k in range(1, seg_alpha.shape[1]) if (case.mask == k).any()]
        if present:
            dices.append(float(np.mean([metrics.dice(labelmap, case.mask, label=k) for k in present])))
        pix_counts += metrics.uncertainty_error_counts(seg_alpha.shape[1] / seg_alpha.sum(1), labelmap != case.mask)
        lesion_voxels = (labelmap > 0).reshape(labelmap.shape[0], -1).sum(1)
        alpha = fuse_slice_opinions(cls_alpha, lesion_voxels)
        op = opinion(torch.from_numpy(alpha)[None])
        probs.append(op.probability[0].double().numpy())
        u_case.append(float(op.uncertainty[0, 0]))
        labels.append(case.label)
    probs_a, labels_a = np.array(probs), np.array(labels)
    probs_a /= probs_a.sum(axis=1, keepdims=True)
    return {
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "accuracy": metrics.accuracy(probs_a, labels_a),
        "auc": metrics.roc_auc(probs_a, labels_a) if probs_a.shape[1] == 2 else float("nan"),
        "ece": metrics.expected_calibration_error(probs_a, labels_a),
        "case_uncertainty": float(np.mean(u_case)),
        "pixel_u_auroc": metrics.histogram_auroc(*pix_counts),
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
        raise UMLInputError(f"--init {path} has architecture {arch}, but this run builds {model.config}: pick the "
                            "bundle's preset and channels, or train from scratch")
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


def model_config(cfg: TrainConfig, info: DatasetInfo = SYNTHETIC_INFO) -> UMLConfig:
    """The run's architecture: its preset, with ``--cls-pool`` unless that is ``preset``, taking the data's channels
    at ``2 * context_slices + 1`` slices each, predicting its classes and segments."""
    pool = {} if cfg.cls_pool == "preset" else {"cls_pool": cfg.cls_pool}
    return UMLConfig.preset(cfg.preset, in_channels=len(info.channels) * (2 * cfg.context_slices + 1),
                            num_classes=len(info.classes), num_seg_labels=1 + len(info.segments), **pool)


def check_resume(out: Path, cfg: TrainConfig) -> None:
    """Refuse, before anything in ``out`` is overwritten, a resume that would build another architecture."""
    saved = out / "model_config.json"
    if not ((out / "last.json").exists() and saved.exists()):
        return
    before = UMLConfig.from_json(saved.read_text())
    info = DatasetInfo.from_json((out / "dataset.json").read_text()) if (out / "dataset.json").exists() else SYNTHETIC_INFO
    now = model_config(cfg, info)
    if now != before:
        raise UMLInputError(f"{out} was trained with architecture {before}, but this resume builds {now}: resume "
                            f"with --config {out / 'train_config.json'} (or the run's --preset, --cls-pool and "
                            "--context-slices)")


# ------------------------------------------------------------------------------------------------- the run
LOG_FIELDS = ["epoch", "step", "lr", "kl_weight", "loss", "cls", "seg", "mutual", "dice", "accuracy", "auc", "ece",
              "case_uncertainty", "pixel_u_auroc", "seconds"]


@dataclass
class Run:
    """A run in progress: its settings, where it writes, the device, and ``state`` (saved as ``last.json``)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    use_amp: bool
    first_epoch: int
    ranks: distributed.Ranks = distributed.Ranks()
    state: dict = dataclasses.field(default_factory=lambda: {
        "epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "best_metrics": {}})
    skipped: int = 0  # updates skipped for a non-finite loss or gradient
    compiled: bool = False  # the steps run a torch.compile'd network


def start(cfg: TrainConfig, resume: bool, argv: Optional[list[str]]) -> Run:
    """Refuse a resume of another architecture, write the run's command and settings, seed, pick the device, join
    the other processes of a ``torchrun`` run."""
    out, ranks = Path(cfg.out), distributed.from_launcher()
    if cfg.batch_size % ranks.world:
        raise UMLInputError(f"--batch-size {cfg.batch_size} must be a multiple of the {ranks.world} processes")
    resuming = resume and (out / "last.json").exists()
    if resume:
        check_resume(out, cfg)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "commands.txt", "a") as f:  # every invocation, so a resumed run's history is complete
            f.write("python -m training.train " + " ".join(sys.argv[1:] if argv is None else argv) + "\n")
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local)
    distributed.start(ranks, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed crop size: let cuDNN pick its fastest kernels
    first_epoch = json.loads((out / "last.json").read_text())["epoch"] if resuming else 0
    return Run(cfg, out, device, cfg.amp == "auto" and device.type == "cuda", first_epoch, ranks)


@dataclass
class Data:
    """What a run trains and validates on: the data's description (for the card), the training sampler, the
    validation cases, and the stream of new training cases of a sliding window (``None``: one fixed set)."""

    info: DatasetInfo
    sampler: SliceSampler
    validation: Iterable[VolumeCase]
    stream: Optional[Iterator[VolumeCase]]


def load_data(run: Run) -> Data:
    """The run's data (synthetic or a dataset), described in ``OUT/dataset.json``."""
    cfg, t0 = run.cfg, time.time()
    spec = DataSpec.parse(cfg.data)
    info, train, validation, stream, source = (_synthetic_data(run) if spec.kind == "synthetic"
                                               else _dataset_data(run, spec))
    if run.ranks.main:
        (run.out / "dataset.json").write_text(info.to_json())
    sampler = SliceSampler(train, cfg.crop, cfg.lesion_fraction, cfg.single_volume_prob, seed=cfg.seed + run.ranks.rank,
                           device=run.device, channel_jitter=cfg.channel_jitter, noise_max=cfg.noise_max,
                           lesion_sampling=cfg.lesion_sampling, context_slices=cfg.context_slices)
    shard = f" (process {run.ranks.rank + 1} of {run.ranks.world})" if run.ranks.world > 1 else ""
    print(f"data{shard}: {len(train)} train cases ({source}) / {len(validation)} val cases, {len(sampler.all_slices)} "
          f"train slices ({len(sampler.lesion_slices)} with a segment) in {time.time() - t0:.1f}s"
          + (f"; {cfg.new_cases_per_epoch} new cases each epoch" if stream else ""), flush=True)
    return Data(info, sampler, validation, stream)


def _synthetic_data(run: Run):
    """Generated cases: the validation seeds, and the training seeds (or a sliding window of them)."""
    cfg = run.cfg
    if run.ranks.world > 1 and cfg.new_cases_per_epoch:
        raise UMLInputError("a sliding window of synthetic cases (--new-cases-per-epoch) runs in one process: drop "
                            "it, or run without torchrun")
    val_cases = (synthetic_cases(seeds("validation", cfg.val_cases), cfg.case_shape, cfg.label_noise, cfg.workers)
                 if run.ranks.main else [])
    window = seeds("train", cfg.train_cases, cfg.seed_base + run.first_epoch * cfg.new_cases_per_epoch)
    stream = None
    if run.ranks.world > 1:
        train_cases = synthetic_cases(distributed.shard(window, run.ranks), cfg.case_shape, cfg.label_noise, cfg.workers)
    elif cfg.new_cases_per_epoch:
        stream = case_stream(window.start, cfg.case_shape, cfg.label_noise, cfg.workers, cfg.new_cases_per_epoch)
        train_cases = list(itertools.islice(stream, cfg.train_cases))
    else:
        train_cases = synthetic_cases(window, cfg.case_shape, cfg.label_noise, cfg.workers)
    return SYNTHETIC_INFO, train_cases, val_cases, stream, f"seeds {window.start}-{window.stop - 1}"


def _dataset_data(run: Run, spec: DataSpec):
    """A dataset's cases, loaded by the workers: all of them, or a window that slides through the training cases."""
    cfg = run.cfg
    if run.ranks.main:
        resolve_split(spec, cfg.split, cfg.split_fractions, cfg.split_seed, run.out)
    distributed.barrier(run.ranks)  # the others read the split the first process wrote
    split = read_split(run.out / "split.json")
    info = describe(spec, split, run.out / "split.json")
    prep = Preparation(NORM, tuple(cfg.target_size), cfg.slices, cfg.lesion_slices, cfg.slice_label)
    ids = distributed.shard([str(c) for c in np.random.default_rng(cfg.seed).permutation(split["train"])], run.ranks)
    val_jobs = [(spec, c, prep, False) for c in (split["val"] if run.ranks.main else [])]
    window = min(cfg.cache_cases or len(ids), len(ids))
    if window == len(ids):
        train = list(checked(ordered_map(load_case, [(spec, c, prep, True) for c in ids], cfg.workers), info))
        return info, train, list(checked(ordered_map(load_case, val_jobs, cfg.workers), info)), None, str(spec)
    first = run.first_epoch * cfg.new_cases_per_epoch
    order = (ids[(first + i) % len(ids)] for i in itertools.count())
    stream = checked(ordered_map(load_case, ((spec, c, prep, True) for c in order), cfg.workers,
                                 ahead=cfg.new_cases_per_epoch), info)
    train = list(itertools.islice(stream, window))
    return info, train, StreamedCases(val_jobs, cfg.workers, info), stream, f"{spec}, {window} of {len(ids)} held"


def build_model(run: Run, info: DatasetInfo) -> tuple[UMLNet, torch.nn.Module, torch.optim.Optimizer]:
    """The network (from ``init`` or the resumed checkpoint), the module the steps run (compiled on CUDA when asked:
    it fuses the many small element-wise ops of this narrow network), and AdamW."""
    cfg = run.cfg
    model_cfg = model_config(cfg, info)
    model = UMLNet(model_cfg).to(run.device)
    if run.ranks.main:
        (run.out / "model_config.json").write_text(model_cfg.to_json())  # first, so any checkpoint can be exported
    print(f"model: preset {cfg.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{model_cfg.in_channels} input channels{f' (2.5D, +-{cfg.context_slices} slices)' if cfg.context_slices else ''}, "
          f"device {run.device}{' (bf16 autocast)' if run.use_amp else ''}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if run.first_epoch:
        run.state = load_checkpoint(run.out, model, opt)
        print(f"resumed from epoch {run.state['epoch']}", flush=True)
    elif cfg.init:
        notes = init_weights(cfg.init, model)
        print(f"initialised from {cfg.init}" + (f" ({'; '.join(notes)})" if notes else ""), flush=True)
    if run.ranks.world > 1:  # gradients averaged over the processes at every step
        step_model = DistributedDataParallel(model, device_ids=[run.device] if run.device.type == "cuda" else None)
    else:
        run.compiled = cfg.compile == "auto" and run.device.type == "cuda"
        step_model = torch.compile(model) if run.compiled else model
    return model, step_model, opt


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay over all the planned steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.epochs * cfg.steps_per_epoch - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_epoch(run: Run, model: UMLNet, step_model: torch.nn.Module, opt: torch.optim.Optimizer,
                sampler: SliceSampler, epoch: int) -> tuple[dict[str, float], torch.nn.Module]:
    """One epoch of steps; the mean losses, and the module to run next (the plain one if compiling failed)."""
    cfg, model = run.cfg, model.train()
    kl_weight = kl_annealing(epoch, cfg.kl_anneal_epochs)
    sums = {k: torch.zeros((), device=run.device) for k in ("total", "cls", "seg", "mutual")}  # summed on the device
    for i in range(cfg.steps_per_epoch):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, run.state["step"])
        x, seg, cls = sampler.batch(cfg.batch_size // run.ranks.world)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
            try:
                out = step_model(x)
            except Exception as exc:  # a compile failure surfaces at the first call: go on uncompiled
                if not run.compiled:
                    raise
                run.compiled = False
                print(f"\ntorch.compile failed ({type(exc).__name__}: {exc}); training uncompiled", flush=True)
                step_model, out = model, model(x)
        out = type(out)(*(o.float() if torch.is_tensor(o) else tuple(t.float() for t in o) for o in out))
        losses = uml_loss(out, cls, seg, kl_weight, LossWeights(), cfg.dice_mode)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        run.state["step"] += 1
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)):
            run.skipped += 1  # a non-finite loss or gradient: skip the update, keep the weights
            if run.skipped > 20:
                raise UMLInputError(f"{run.skipped} steps with a non-finite loss or gradient (last at step "
                               f"{run.state['step'] - 1}): lower --lr or use --amp off")
            continue
        opt.step()
        for k in sums:
            sums[k] += losses[k].detach()
        if run.ranks.main and ((i + 1) % 50 == 0 or i + 1 == cfg.steps_per_epoch):  # reading waits for the device
            print(f"\repoch {epoch + 1}/{cfg.epochs} [{'#' * int(20 * (i + 1) / cfg.steps_per_epoch):<20}] "
                  f"loss {sums['total'] / (i + 1):.4f}", end="", flush=True)
    sums = {k: distributed.mean(run.ranks, v) for k, v in sums.items()}  # the losses of the whole batch
    return {k: float(v) / cfg.steps_per_epoch for k, v in sums.items()} | {"kl_weight": kl_weight}, step_model


def finish_epoch(run: Run, model: UMLNet, opt: torch.optim.Optimizer, val_cases: Iterable[VolumeCase], epoch: int,
                 losses: dict[str, float], t_epoch: float) -> None:
    """Validate, log a row, keep the best weights, save the checkpoint."""
    cfg, train_seconds = run.cfg, time.time() - t_epoch
    val = validate(model, val_cases, run.device, cfg.context_slices)
    row = {"epoch": epoch + 1, "step": run.state["step"], "lr": lr_at(cfg, run.state["step"]),
           "kl_weight": losses["kl_weight"], "loss": losses["total"],
           **{k: losses[k] for k in ("cls", "seg", "mutual")}, **val, "seconds": time.time() - t_epoch}
    print(f"\repoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} | val dice {val['dice']:.3f} "
          f"acc {val['accuracy']:.3f} auc {val['auc']:.3f} ece {val['ece']:.3f} u {val['case_uncertainty']:.3f} "
          f"pix-u-auroc {val['pixel_u_auroc']:.3f} | {row['seconds']:.0f}s "
          f"({cfg.steps_per_epoch / train_seconds:.1f} steps/s, {run.skipped} skipped)", flush=True)
    with open(run.out / "log.csv", "a", newline="") as f:
        csv.writer(f).writerow([row[k] for k in LOG_FIELDS])
    if score(val) > run.state["best_score"]:
        run.state.update(best_score=score(val), best_epoch=epoch + 1, best_metrics=val)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(run.out / "best.safetensors"))
    run.state["epoch"] = epoch + 1
    save_checkpoint(run.out, model, opt, run.state)


def main(argv: Optional[list[str]] = None) -> dict:
    cfg, resume = parse_args(argv)
    t_start = time.time()  # --max-minutes counts from here (data generation included)
    run = start(cfg, resume, argv)
    data = load_data(run)
    sampler, stream = data.sampler, data.stream
    model, step_model, opt = build_model(run, data.info)
    if run.first_epoch:  # the random streams go on from the step it continues at
        sampler.reseed(cfg.seed + run.ranks.rank + run.state["step"])
    elif run.ranks.main:
        with open(run.out / "log.csv", "w", newline="") as f:
            csv.writer(f).writerow(LOG_FIELDS)
    last = cfg.stop_after_epoch or cfg.epochs
    for epoch in range(run.state["epoch"], last):
        if stream is not None and epoch > run.first_epoch:  # slide the window (made while the last epoch trained)
            t_new = time.time()
            sampler.advance(list(itertools.islice(stream, cfg.new_cases_per_epoch)))
            first = cfg.seed_base + epoch * cfg.new_cases_per_epoch
            what = (f"seeds {first}-{first + cfg.train_cases - 1}" if data.info.data == "synthetic"
                    else f"{cfg.new_cases_per_epoch} new")
            print(f"cases: {what} (waited {time.time() - t_new:.1f}s for the new ones)", flush=True)
        t_epoch = time.time()
        losses, step_model = train_epoch(run, model, step_model, opt, sampler, epoch)
        if run.ranks.main:  # one process validates and writes the checkpoints
            finish_epoch(run, model, opt, data.validation, epoch, losses, t_epoch)
        out_of_time = bool(cfg.max_minutes) and time.time() - t_start > 60 * cfg.max_minutes
        if distributed.agree(run.ranks, out_of_time) and epoch + 1 < last:
            print(f"stopping after epoch {epoch + 1}: --max-minutes {cfg.max_minutes} reached (continue with "
                  "--resume)", flush=True)
            break
    if stream is not None:
        stream.close()  # cancels the cases not started and waits for the running ones
    distributed.barrier(run.ranks)
    distributed.finish(run.ranks)
    if run.ranks.main:
        print(f"best epoch {run.state['best_epoch']}: {run.state['best_metrics']}", flush=True)
    return run.state


def cli(argv: Optional[list[str]] = None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(cli, "python -m training.train"))
