"""The two refiner variants of docs/model.md on the crops train_refiner.py cached (runs/refcrops), one thread each.

Run from the repository root: python docs/model-eval/refiner/variants.py 0.02 1000 3e-3   (prior clamped to [0.02, 0.98])
                              python docs/model-eval/refiner/variants.py none 1000 3e-3   (no prior in the output)
Both were stopped after 400 steps (about 8 minutes each, side by side).
"""
import sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
import train_refiner as t
from umlcore.refiner import LesionRefiner, RefinerConfig

variant, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
cache = Path("runs/refcrops")
train = [t._read(cache / f"{s}.npz") for s in range(3000000, 3000500)]
val = [t._read(cache / f"{s}.npz") for s in range(1000000, 1000100)]
xs = [x for c in train for x in c["x"]]; ys = [y for c in train for y in c["y"]]

class Net(LesionRefiner):
    def forward(self, x):
        e0 = self.enc0(x); e1 = self.enc1(e0); e2 = self.enc2(e1)
        d1 = self.dec1(torch.cat([e1, self.up2(e2)], 1)); d0 = self.dec0(torch.cat([e0, self.up1(d1)], 1))
        if variant == "none":
            return self.out(d0)
        eps = float(variant)
        prior = x[:, 3:4].clamp(eps, 1 - eps)
        return self.out(d0) + torch.log(prior) - torch.log1p(-prior)

net = Net(5, 8)
if variant == "none":
    torch.nn.init.normal_(net.out.weight, std=0.01); torch.nn.init.constant_(net.out.bias, -3.0)
cfg = RefinerConfig()
opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
rng = np.random.default_rng(0); run = []; t0 = time.time()
for step in range(1, steps + 1):
    idx = rng.integers(0, len(xs), 8)
    pairs = [t.augment(xs[i], ys[i], rng) for i in idx]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])); y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    loss = t.loss_fn(net(x), y); opt.zero_grad(); loss.backward(); opt.step(); sched.step(); run.append(loss.item())
    if step % 200 == 0:
        print(variant, step, round(np.mean(run), 4), t.validate(net, val, cfg), round(time.time() - t0), flush=True); run = []

