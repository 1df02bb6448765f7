import sys, numpy as np
from collections import defaultdict
sys.path.insert(0, "docs/model-eval/familiarity")
from analyse import load, vec, kind, SETS  # noqa (analyse runs on import; silence)

def pca_fit(X, k):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    V = Vt[:k].T
    var = (s[:k] ** 2) / len(Z)
    R = Z - Z @ V @ V.T
    rmean = (R ** 2).sum(1).mean()
    return mu, sd, V, var, rmean

def pca_score(m, X):
    mu, sd, V, var, rmean = m
    Z = (X - mu) / sd
    P = Z @ V
    a = ((P ** 2) / var).sum(1) / V.shape[1]
    r = ((Z - P @ V.T) ** 2).sum(1) / rmean
    return float(np.median(a)), float(np.median(r))

fk, ff = load("runs/ood/fit-1000000.npz")
tk, tf = load("runs/ood/test-2008000.npz")
ok, of = load("runs/ood/foreign-.npz")
for setname, layers in SETS.items():
    for k in (5, 10, 20):
        models = {kd: pca_fit(np.concatenate([vec(ff[c], layers) for c in fk if kind(c) == kd]), k) for kd in ("phases", "single")}
        by = defaultdict(list)
        for c in tk:
            by[c.split(":")[1]].append(pca_score(models[kind(c)], vec(tf[c], layers)))
        fo = {c: pca_score(models["single"], vec(of[c], layers)) for c in ok}
        for j, nm in ((0, "mahal"), (1, "resid")):
            print(f"{setname:8s} k={k:2d} {nm}: test " + " ".join(f"{m[:5]} {np.median([v[j] for v in vs]):.1f}/{max(v[j] for v in vs):.1f}" for m, vs in by.items())
                  + " | foreign " + " ".join(f"{c[:6]} {v[j]:.1f}" for c, v in fo.items()))
