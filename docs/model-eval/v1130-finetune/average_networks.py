"""Uniform average of network state dicts of one architecture (a "model soup" of fine-tunes from one start).

    python docs/model-eval/v1130-finetune/average_networks.py OUT.safetensors A.safetensors B.safetensors [...]

Every floating-point tensor is averaged with equal weights (BatchNorm running statistics included); integer tensors
(BatchNorm's ``num_batches_tracked``) are taken from the first file. Run from the repository root (the .venv).
"""
import sys

import torch
from safetensors.torch import load_file, save_file


def main(out: str, paths: list[str]) -> None:
    dicts = [load_file(p) for p in paths]
    keys = set(dicts[0])
    for p, d in zip(paths[1:], dicts[1:]):
        if set(d) != keys or any(d[k].shape != dicts[0][k].shape for k in keys):
            sys.exit(f"{p} holds another architecture than {paths[0]}: average networks of one model_config only")
    avg = {k: (torch.stack([d[k].double() for d in dicts]).mean(0).to(dicts[0][k].dtype)
               if dicts[0][k].is_floating_point() else dicts[0][k].clone()) for k in dicts[0]}
    save_file(avg, out)
    print(f"{out}: mean of {len(paths)} networks ({len(avg)} tensors)")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
