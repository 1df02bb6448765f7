"""Benchmark (not a test): seconds per training step of each architecture, to plan a training run.

    python benchmarks/bench_train_step.py                      # CPU, batch 16 of 128x128 crops
    python benchmarks/bench_train_step.py --device cuda --batch 32 --crop 192 --amp

One step = forward, the UML loss, backward and an AdamW update, as ``python -m training.train`` runs it (bf16 autocast on
CUDA with ``--amp``). Prints the median of ``--steps`` timed steps after two warm-up steps for the ``small`` preset,
``small`` with 2.5D input (3 phases x 3 slices = 9 channels) and ``medium``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from umlcore.config import UMLConfig
from umlcore.losses import uml_loss
from umlcore.network import UMLNet

ARCHITECTURES = (("small", "small", 3), ("small 2.5D", "small", 9), ("medium", "medium", 3))


def step_seconds(preset: str, channels: int, device: str, batch: int, crop: int, steps: int, amp: bool) -> list[float]:
    torch.manual_seed(0)
    net = UMLNet(UMLConfig.preset(preset, in_channels=channels)).train().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.rand(batch, channels, crop, crop, device=device)
    seg = (torch.rand(batch, crop, crop, device=device) > 0.95).long()
    cls = torch.randint(0, 2, (batch,), device=device)
    times = []
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp and device == "cuda"):
            out = net(x)
        out = type(out)(*(o.float() if torch.is_tensor(o) else tuple(t.float() for t in o) for o in out))
        loss = uml_loss(out, cls, seg, 1.0)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only), as train.py does there")
    args = p.parse_args()
    for label, preset, channels in ARCHITECTURES:
        t = step_seconds(preset, channels, args.device, args.batch, args.crop, args.steps, args.amp)
        print(f"{args.device}: {label} {statistics.median(t):.3f} s/step ({1 / statistics.median(t):.2f} steps/s) "
              f"at batch {args.batch} x {args.crop}x{args.crop} (median of {len(t)}; min {min(t):.3f}, max {max(t):.3f}; "
              f"torch threads {torch.get_num_threads()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
