"""Benchmarks (not tests): what inference costs and how much of the hardware it uses (docs/performance.md).

    python benchmarks/bench_predict.py                    # CPU (and CUDA when available), 3 runs each
    python benchmarks/bench_predict.py --runs 5 --equivalence 5

Prints one line per figure:

- FLOPs and parameters per preset (``small`` is shipped; ``paper`` is the official network's size);
- the **matmul ceiling**: fp32 GFLOP/s of a 2048 x 2048 matmul with this process's threads (median of ``--runs``);
- **network throughput**: slices/s of the shipped ``small`` preset on 256 x 256 slices per batch size, its GFLOP/s
  and the ratio to the ceiling (``torch.inference_mode``, after a warm-up; the allocator tuned as ``uml`` tunes it);
- **end to end**: median wall seconds of separate ``uml predict`` processes (process start included) on a synthetic
  256 x 256 x 96 case given as one volume and as three phases (motion correction on), with the median seconds per
  stage (``summary.json`` ``timings_s``) and the peak resident memory;
- ``--peers`` (needs ``pip install monai``): network-only seconds for one 256 x 256 x 96 volume on one thread, the
  shipped network against MONAI's 2D UNet slice by slice and MONAI's 3D UNet with a 96^3 sliding window;
- ``--equivalence N``: the outputs of ``batch_size="auto"`` against batch 8 on the shipped sample and ``N`` held-out
  synthetic cases (test seeds): labelmap Dice and identical voxels, the largest uncertainty difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.flop_counter import FlopCounterMode

from umlcore.allocator import tune_allocator
from umlcore.bundle import load_bundle
from umlcore.config import UMLConfig
from umlcore.io import read_case
from umlcore.network import UMLNet
from umlcore.predictor import Predictor
from umlcore.synthetic import generate_case

REPO = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 2_000_000  # the first test seed of training/splits.py: never trained or validated on
MODEL = REPO / "Resources" / "Models" / "uml-breast-dce-small"
SAMPLE = REPO / "UMLSegmentation" / "Resources" / "SampleData"
#: (label, preset, input channels): 3 DCE phases, or 3 phases x 3 slices for 2.5D input (context 1)
ARCHITECTURES = (("small", "small", 3), ("small 2.5D", "small", 9), ("medium", "medium", 3), ("paper", "paper", 3))


def slice_flops(preset: str = "small", channels: int = 3, net: Optional[torch.nn.Module] = None) -> tuple[float, int]:
    """(FLOPs of one 256 x 256 slice, parameters) of a preset, or of ``net``."""
    net = (net or UMLNet(UMLConfig.preset(preset, in_channels=channels))).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, channels, 256, 256))
    return counter.get_total_flops(), sum(p.numel() for p in net.parameters())


def matmul_ceiling(runs: int, n: int = 2048) -> float:
    """fp32 GFLOP/s of an n x n matmul (median)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        rates.append(5 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def throughput(net: torch.nn.Module, device: str, batch: int, runs: int, slices: int = 32, precision: str = "fp32") -> float:
    """Slices/s of the network on 256 x 256 slices (median of ``runs``)."""
    net = net.eval().to(device)
    x = torch.randn(batch, 3, 256, 256, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and precision == "mixed")
    torch.backends.cudnn.allow_tf32 = False  # as the predictor: fp32 convolutions in IEEE fp32, not TF32
    rates = []
    with torch.inference_mode(), autocast:
        for r in range(runs + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(max(1, slices // batch)):
                net(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                rates.append(max(1, slices // batch) * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def write_case(folder: Path) -> list[Path]:
    """A held-out synthetic 96 x 256 x 256 case as three NIfTI files."""
    case = generate_case(HELD_OUT_SEED + 7, shape=(96, 256, 256))
    paths = []
    for i, image in enumerate(case.to_sitk()):
        paths.append(folder / f"phase{i}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return paths


def high_water_mib(pid: int) -> float:
    """``VmHWM`` of a running process (Linux), 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0.0


def end_to_end(label: str, inputs: list[Path], device: str, runs: int, tmp: Path, flops: float, ceiling: float) -> None:
    """Median wall time, stages and peak RSS of separate ``uml predict`` processes, and the inference stage's
    GFLOP/s (the network's FLOPs per slice times the slices over the stage's seconds) against the ceiling."""
    walls, stages, peaks = [], [], []
    for r in range(runs):
        out = tmp / f"out-{label}-{r}"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "umlcore", "predict", ",".join(map(str, inputs)), "-o", str(out),
                                 "--model", str(MODEL), "--device", device, "--progress", "none"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = 0.0
        while proc.poll() is None:  # the child's own high-water mark (its rusage would count this process's pages)
            peak = max(peak, high_water_mib(proc.pid))
            time.sleep(0.05)
        walls.append(time.perf_counter() - t0)
        peaks.append(peak)
        error = proc.stderr.read()
        proc.stderr.close()
        if proc.returncode:
            print(f"uml predict failed: {error.strip()}")
            return
        stages.append(json.loads(next(out.glob("*/summary.json")).read_text())["timings_s"])
    per_stage = ", ".join(f"{k} {statistics.median(s[k] for s in stages):.2f}" for k in stages[0])
    rate = 96 * flops / statistics.median(s["inference"] for s in stages) / 1e9
    print(f"end to end, {label}, {device}: median {statistics.median(walls):.2f} s wall (min {min(walls):.2f}, "
          f"max {max(walls):.2f}, {runs} runs); stages s: {per_stage}; peak RSS {statistics.median(peaks):.0f} MiB; "
          f"inference stage {rate:.1f} GFLOP/s = {100 * rate / ceiling:.0f} % of the matmul ceiling")


def equivalence(cases: int) -> None:
    """``batch_size="auto"`` against batch 8: the same labelmap and uncertainty, up to float rounding."""
    bundle = load_bundle(MODEL)
    inputs = [("sample", read_case(sorted(SAMPLE.glob("*.nrrd"), key=lambda p: ("pre", "early", "late").index(
        p.stem.split("-")[-1]))))]
    inputs += [(f"seed {HELD_OUT_SEED + i}", generate_case(HELD_OUT_SEED + i, shape=(32, 192, 192)).to_sitk())
               for i in range(cases)]
    auto, eight = Predictor(bundle, device="cpu"), Predictor(bundle, device="cpu", batch_size=8)
    for name, volumes in inputs:
        a, b = auto.predict(volumes), eight.predict(volumes)
        la, lb = sitk.GetArrayFromImage(a.labelmap) > 0, sitk.GetArrayFromImage(b.labelmap) > 0
        dice = 1.0 if not (la.any() or lb.any()) else 2 * (la & lb).sum() / (la.sum() + lb.sum())
        same = (sitk.GetArrayFromImage(a.labelmap) == sitk.GetArrayFromImage(b.labelmap)).mean()
        du = np.abs(sitk.GetArrayFromImage(a.uncertainty) - sitk.GetArrayFromImage(b.uncertainty)).max()
        dp = abs(a.summary["classification"]["positive_probability"] - b.summary["classification"]["positive_probability"])
        print(f"equivalence {name}: batch {auto.batch_size} vs 8: lesion Dice {dice:.4f}, identical labels "
              f"{100 * same:.3f} %, max |uncertainty difference| {du:.2e}, |case probability difference| {dp:.2e}")


def peers(runs: int) -> None:
    """One thread, network only, one 256 x 256 x 96 volume: ours against MONAI's 2D and 3D UNets (median of runs)."""
    try:
        from monai.inferers import sliding_window_inference
        from monai.networks.nets import UNet
    except ImportError:
        print("peers: pip install monai to measure MONAI's networks")
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    volume = torch.randn(96, 3, 256, 256)
    unet = dict(in_channels=3, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    nets = {"ours (shipped, 2D slices)": (load_bundle(MODEL).model.eval(), lambda n: [n(s[None]) for s in volume]),
            "MONAI UNet 2D (slices)": (UNet(spatial_dims=2, **unet).eval(), lambda n: [n(s[None]) for s in volume]),
            "MONAI UNet 3D (96^3 window)": (UNet(spatial_dims=3, **unet).eval(), lambda n: sliding_window_inference(
                volume.permute(1, 0, 2, 3)[None], (96, 96, 96), 1, n, overlap=0.25))}
    with torch.inference_mode():
        for name, (net, run) in nets.items():
            params = sum(p.numel() for p in net.parameters()) / 1e6
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                run(net)
                times.append(time.perf_counter() - t0)
            print(f"peer {name}: {params:.2f} M parameters, median {statistics.median(times):.1f} s for 256x256x96 "
                  f"on 1 thread ({runs} runs)")
    torch.set_num_threads(threads)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--equivalence", type=int, default=0, metavar="N", help="also compare outputs on N synthetic cases")
    p.add_argument("--peers", action="store_true", help="also time MONAI's 2D and 3D UNets (needs monai)")
    args = p.parse_args()
    tune_allocator()
    for label, preset, channels in ARCHITECTURES:
        flops, params = slice_flops(preset, channels)
        print(f"preset {label}: {flops / 1e9:.2f} GFLOP per 256x256 slice, {params / 1e6:.2f} M parameters")
    net = load_bundle(MODEL).model
    flops = slice_flops(net=net)[0]
    print(f"shipped network ({MODEL.name}): {flops / 1e9:.2f} GFLOP per 256x256 slice")
    ceiling = matmul_ceiling(args.runs)
    print(f"matmul ceiling (fp32 2048x2048, {torch.get_num_threads()} threads): {ceiling:.1f} GFLOP/s")
    for batch in (1, 2, 4, 8):
        rate = throughput(net, "cpu", batch, args.runs)
        print(f"network cpu batch {batch}: {rate:.1f} slices/s, {rate * flops / 1e9:.1f} GFLOP/s, "
              f"{100 * rate * flops / 1e9 / ceiling:.0f} % of the matmul ceiling")
    if torch.cuda.is_available():
        for precision in ("fp32", "mixed"):
            print(f"network cuda {precision} batch 8: {throughput(net, 'cuda', 8, args.runs, 256, precision):.1f} slices/s")
            net.to("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        phases = write_case(Path(tmp))
        for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
            end_to_end("256x256x96 one volume", phases[1:2], device, args.runs, Path(tmp), flops, ceiling)
            end_to_end("256x256x96 three phases", phases, device, args.runs, Path(tmp), flops, ceiling)
    if args.peers:
        peers(args.runs)
    if args.equivalence:
        equivalence(args.equivalence)
    return 0


if __name__ == "__main__":
    sys.exit(main())
