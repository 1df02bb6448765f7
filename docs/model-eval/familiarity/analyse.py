"""Mahalanobis distances of the pooled features saved by probe.py (runs/ood/*.npz): one Gaussian per input kind
(all three phases / one volume), fitted on the slices of 80 validation cases; printed for 40 fresh test cases and
the foreign scans. analyse2.py: the same in a PCA subspace and its residual; analyse3.py: other slice quantiles."""
import sys, numpy as np
from collections import defaultdict

def load(path):
    z = np.load(path)
    keys = list(z["keys"])
    feats = defaultdict(dict)
    for name in z.files:
        if "|" in name:
            k, n = name.split("|")
            feats[k][n] = z[name]
    return keys, feats

SETS = {
    "all": None,
    "deep": ["cls3", "seg3", "mix3_0", "ins0"],
    "ins": ["ins0"],
    "enc": ["cls0", "cls1", "cls2", "cls3", "seg0", "seg1", "seg2", "seg3"],
    "shallow": ["cls0", "cls1", "seg0", "seg1", "mix0_0", "mix1_0"],
}

def vec(f, layers):
    names = sorted(n for n in f if n != "u") if layers is None else layers
    return np.concatenate([f[n] for n in names], 1)

def kind(k):
    return "phases" if k.split(":")[1] in ("phases",) or k.split(":")[1].startswith("noise") else "single"

def fit(X, shrink):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    C = np.cov(Z, rowvar=False)
    D = C.shape[0]
    C = (1 - shrink) * C + shrink * np.eye(D) * np.trace(C) / D
    return mu, sd, np.linalg.inv(C)

def score(model, X, how="median"):
    mu, sd, P = model
    Z = (X - mu) / sd
    d2 = np.einsum("ij,jk,ik->i", Z, P, Z) / len(mu)
    return float(np.median(d2)) if how == "median" else float(np.mean(d2))

if __name__ == "__main__":
  fk, ff = load("runs/ood/fit-1000000.npz")
  tk, tf = load("runs/ood/test-2008000.npz")
  ok, of = load("runs/ood/foreign-.npz")
  for setname, layers in SETS.items():
      for shrink in (0.01, 0.1, 0.5):
          models = {}
          for kd in ("phases", "single"):
              X = np.concatenate([vec(ff[k], layers) for k in fk if kind(k) == kd])
              models[kd] = fit(X, shrink)
          # fit-case scores (in-sample) for threshold reference
          fit_scores = {kd: [score(models[kd], vec(ff[k], layers)) for k in fk if kind(k) == kd] for kd in models}
          by_mode = defaultdict(list)
          for k in tk:
              by_mode[k.split(":")[1]].append(score(models[kind(k)], vec(tf[k], layers)))
          foreign = {k: score(models["single"], vec(of[k], layers)) for k in ok}
          thr = {kd: max(v) for kd, v in fit_scores.items()}
          print(f"\n== {setname} (D={vec(ff[fk[0]], layers).shape[1]}) shrink {shrink}: fit max phases {thr['phases']:.2f} single {thr['single']:.2f}")
          print("   test  " + "  ".join(f"{m} med {np.median(v):.2f} max {max(v):.2f}" for m, v in by_mode.items()))
          print("   foreign " + "  ".join(f"{k[:14]} {v:.1f}" for k, v in foreign.items()))
