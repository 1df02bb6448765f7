"""Benchmarks (not tests): FLOPs / parameters per preset, slice throughput, and peak memory of `uml predict`.

    python benchmarks/bench_predict.py                       # CPU (and CUDA when available)
    python benchmarks/bench_predict.py --model Resources/Models/uml-breast-dce-small --runs 5

Prints one line per figure. Architectures: the ``small`` preset (shipped), ``small`` with 2.5D input
(``--context-slices 1``: 9 channels), ``medium`` and ``paper`` (FLOPs and parameters only).
Throughput: median over ``--runs`` timed runs of ``--slices`` 256x256 slices after one warm-up run, for small,
small 2.5D and medium, under ``torch.inference_mode`` (fp32 on CPU; on CUDA both of the predictor's precisions:
fp32 with TF32 convolutions off, its default, and ``mixed`` = bf16 autocast).
Stages: median seconds per stage (``summary.json`` ``timings_s``) of the bundle's predictor on a three-phase synthetic
case of 24x256x256 with the card's motion correction and without it (one process, the machine's threads).
Peak memory: maximum resident set size of a separate ``uml predict`` process on a 256x256x96 volume
(``resource.getrusage(RUSAGE_CHILDREN)``), and peak CUDA memory when run on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.flop_counter import FlopCounterMode

from umlcore.bundle import load_bundle
from umlcore.card import MotionCorrection
from umlcore.config import UMLConfig
from umlcore.network import UMLNet
from umlcore.predictor import Predictor
from umlcore.synthetic import generate_case


#: (label, preset, input channels): 3 DCE phases, or 3 phases x 3 slices for 2.5D input (context 1)
ARCHITECTURES = (("small", "small", 3), ("small 2.5D", "small", 9), ("medium", "medium", 3), ("paper", "paper", 3))


def flops_and_params() -> None:
    for label, name, channels in ARCHITECTURES:
        net = UMLNet(UMLConfig.preset(name, in_channels=channels)).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros(1, channels, 256, 256))
        params = sum(p.numel() for p in net.parameters())
        print(f"preset {label}: {counter.get_total_flops() / 1e9:.2f} GFLOP per 256x256 slice, {params / 1e6:.2f} M "
              f"parameters ({params * 4 / 1e6:.1f} MB of fp32 weights)")


def throughput(device: str, slices: int, runs: int, batch: int, precision: str = "fp32",
               label: str = "small", preset: str = "small", channels: int = 3) -> None:
    net = UMLNet(UMLConfig.preset(preset, in_channels=channels)).eval().to(device)
    x = torch.randn(batch, channels, 256, 256, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and precision == "mixed")
    torch.backends.cudnn.allow_tf32 = False  # as the predictor: fp32 convolutions in IEEE fp32, not TF32
    times = []
    with torch.inference_mode(), autocast:
        for r in range(runs + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(slices // batch):
                net(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                times.append(time.perf_counter() - t0)
    rates = [slices // batch * batch / t for t in times]
    print(f"{device} {precision}: {label} preset {statistics.median(rates):.1f} slices/s at 256x256 (batch {batch}, median of {runs}; "
          f"min {min(rates):.1f}, max {max(rates):.1f}; torch threads {torch.get_num_threads()})")


def stage_times(model: str, device: str, runs: int) -> None:
    bundle = load_bundle(model)
    images = generate_case(1_000_003, shape=(24, 256, 256)).to_sitk()  # a validation case whose phases moved
    rules = {f"motion correction {bundle.card.input.motion_correction.mode}": bundle.card.input.motion_correction}
    if bundle.card.input.motion_correction.mode != "none":
        rules["motion correction none"] = MotionCorrection()
    for label, rule in rules.items():
        card = dataclasses.replace(bundle.card, input=dataclasses.replace(bundle.card.input, motion_correction=rule))
        predictor = Predictor(dataclasses.replace(bundle, card=card), device=device)
        timings = [predictor.predict(images).summary["timings_s"] for _ in range(runs + 1)][1:]  # after a warm-up
        stages = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
        print(f"{bundle.card.id} {bundle.card.version} on {device}, 3 phases of 24x256x256, {label}: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()) + f" (median of {runs})")


def peak_memory(model: str, device: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        img = sitk.GetImageFromArray((rng.random((96, 256, 256)) * 1000).astype(np.float32))
        img.SetSpacing((0.7, 0.7, 2.0))
        src = Path(tmp) / "vol.nii.gz"
        sitk.WriteImage(img, str(src))
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([sys.executable, "-m", "umlcore", "predict", str(src), "-o", str(Path(tmp) / "out"),
                               "--model", model, "--device", device, "--progress", "none"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode:
            print(f"uml predict failed: {proc.stderr.strip()}")
            return
        print(f"uml predict 256x256x96 on {device}: {wall:.1f} s wall, peak RSS {max(peak, before) / 1024:.0f} MiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="bundle for the `uml predict` memory run (default: shipped model)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    flops_and_params()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for label, preset, channels in ARCHITECTURES[:3]:  # the paper preset is too slow for a CPU run
        for d, precision in [("cpu", "fp32")] + [("cuda", "fp32"), ("cuda", "mixed")] * ("cuda" in devices):
            throughput(d, args.slices, args.runs, args.batch, precision, label, preset, channels)
    model = args.model or str(Path(__file__).resolve().parents[1] / "Resources" / "Models" / "uml-breast-dce-small")
    for d in devices:
        stage_times(model, d, args.runs)
        peak_memory(model, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
