"""Paired lesion Dice of validation cases: the shipped 1.10.0 predictor reading each slice once, as it is and
mirrored left-right (h = flip_w), and in 4 mirrored views (hv = flip_hw), the views' alphas averaged.

Written before the card rule existed (it wraps the network; umlcore.predictor.forward_views does the same).
Run from the repository root, two processes of 60 seeds each (1 thread; about 30 s a case for the three):
    python docs/model-eval/tta/validation_probe.py 1000000 1000060 runs/tta/a.json
    python docs/model-eval/tta/validation_probe.py 1000060 1000120 runs/tta/b.json
(stopped after 56 lesion cases, seeds 1,000,000-096: their rows are validation-rows.jsonl)
"""
import sys, json
import numpy as np, SimpleITK as sitk, torch
from umlcore import load_bundle, Predictor, metrics
from umlcore.network import UMLOutput
from umlcore.synthetic import generate_case

class Flipped(torch.nn.Module):
    def __init__(self, net, flips):
        super().__init__()
        self.net, self.flips, self.config = net, flips, net.config
    def forward(self, x):
        outs = []
        for dims in self.flips:
            o = self.net(torch.flip(x, dims) if dims else x)
            outs.append((torch.flip(o.seg_alpha, dims) if dims else o.seg_alpha,
                         torch.flip(o.mutual_alpha, dims) if dims else o.mutual_alpha, o.cls_alpha))
        mean = [torch.stack(t).mean(0) for t in zip(*outs)]
        return UMLOutput(seg_alpha=mean[0], mutual_alpha=mean[1], deep_logits=(), cls_alpha=mean[2])

VARIANTS = {"plain": [()], "h": [(), (3,)], "hv": [(), (3,), (2,), (2, 3)]}

def main():
    lo, hi, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    bundle = load_bundle("Resources/Models/uml-breast-dce-small")
    net = bundle.model
    pred = Predictor(bundle, device="cpu")
    rows = []
    for seed in range(lo, hi):
        case = generate_case(seed, shape=(24, 256, 256), label_noise=0.02)
        if not case.mask.any():
            continue
        row = {"seed": seed, "voxels": int(case.mask.sum())}
        for name, flips in VARIANTS.items():
            bundle.model = Flipped(net, flips) if name != "plain" else net
            p = pred.predict(case.to_sitk())
            lab = sitk.GetArrayFromImage(p.labelmap)
            row[name] = metrics.dice(lab, case.mask)
            row[name + "_p"] = p.summary["classification"]["positive_probability"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    json.dump(rows, open(out, "w"))

if __name__ == "__main__":
    main()
