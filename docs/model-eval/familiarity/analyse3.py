import sys, numpy as np
from collections import defaultdict
sys.path.insert(0, "docs/model-eval/familiarity")
from analyse import load, vec, kind, SETS, fit
fk, ff = load("runs/ood/fit-1000000.npz"); tk, tf = load("runs/ood/test-2008000.npz"); ok, of = load("runs/ood/foreign-.npz")
def d2(m, X):
    mu, sd, P = m; Z = (X - mu) / sd
    return np.einsum("ij,jk,ik->i", Z, P, Z) / len(mu)
for setname in ("all", "enc", "deep"):
    layers = SETS[setname]
    models = {kd: fit(np.concatenate([vec(ff[c], layers) for c in fk if kind(c) == kd]), 0.1) for kd in ("phases", "single")}
    for q in (0.5, 0.75, 0.9, 1.0):
        by = defaultdict(list)
        for c in tk:
            if "noise" in c: continue
            by[c.split(":")[1]].append(np.quantile(d2(models[kind(c)], vec(tf[c], layers)), q))
        fo = {c: np.quantile(d2(models["single"], vec(of[c], layers)), q) for c in ok}
        allmax = max(max(v) for v in by.values())
        print(f"{setname} q={q}: breast max {allmax:.1f} (" + " ".join(f"{m[:5]} {max(v):.1f}" for m, v in by.items()) + ") | foreign " + " ".join(f"{c[:6]} {v:.1f}" for c, v in fo.items()))
