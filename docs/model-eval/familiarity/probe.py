"""Probe: per-slice pooled features of the shipped network for breast (synthetic) and foreign scans.

Run from the repository root: ``probe.py foreign [DIR]`` (nibabel's test scans and the .nii.gz files in DIR, e.g.
the MNI152 T1 template and image_10426.nii.gz unzipped from ``pip download nilearn --no-deps``),
``probe.py fit|test FIRST_SEED END_SEED MODES`` (synthetic cases, MODES from phases, pre, early, late,
subtraction, noiseSIGMA); each writes runs/ood/<which>-<first seed>.npz for analyse*.py.
"""
import sys, json, time
from pathlib import Path
import numpy as np, SimpleITK as sitk, torch, nibabel as nib
sys.path.insert(0, "training")
from umlcore import load_bundle, Predictor
from umlcore.synthetic import generate_case
from umlcore.preprocess import normalize, to_slices, slice_axis_index, with_context
from evaluate import input_views, add_noise, SINGLE_VOLUME_MODES

MODEL = "Resources/Models/uml-breast-dce-small"

def hooks(model, store):
    def grab(name):
        def f(mod, inp, out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for i, o in enumerate(outs):
                o = o.float()
                store.setdefault(f"{name}{i}", []).append(torch.cat([o.mean((2, 3)), o.std((2, 3))], 1).cpu().numpy())
        return f
    model.cls_encoder.register_forward_hook(grab("cls"))
    model.seg_encoder.register_forward_hook(grab("seg"))
    for i, m in enumerate(model.mixers):
        m.register_forward_hook(grab(f"mix{i}_"))
    model.instructor.feat.register_forward_hook(grab("ins"))

def features(pred, volumes):
    store = {}
    channels, source = pred.channel_volumes(volumes)
    spec = pred.card.input
    axis = slice_axis_index(channels[0].GetDirection(), spec.slicing_axis)
    norm = {}
    for s in source:
        if s not in norm:
            a = sitk.GetArrayFromImage(channels[source.index(s)]).astype(np.float32)
            norm[s] = to_slices(normalize(a, spec.normalization), axis)
    stack = np.ascontiguousarray(np.stack([norm[s] for s in source], 1))
    pred._store.clear()
    out_u = []
    for b in range(0, len(stack), 8):
        lab, unc, fg, ca = pred._forward(with_context(stack, b, min(b + 8, len(stack)), spec.context_slices), stack.shape[-2:])
        out_u.append(unc.mean((1, 2)))
    f = {k: np.concatenate(v) for k, v in pred._store.items()}
    return f, np.concatenate(out_u)

def nib_volume(path, index=0):
    img = nib.load(path)
    a = np.asarray(img.dataobj, dtype=np.float32)
    while a.ndim > 3:
        a = a[..., index]
    z = img.header.get_zooms()[:3]
    im = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))
    im.SetSpacing(tuple(float(v) for v in z))
    return im

def main():
    which = sys.argv[1]
    torch.set_num_threads(1)
    pred = Predictor(load_bundle(MODEL), device="cpu")
    pred._store = {}
    hooks(pred.bundle.model, pred._store)
    out = {}
    if which == "foreign":
        import glob
        nd = Path(nib.__file__).parent / "tests/data"
        items = [(str(nd / n), 0) for n in ("anatomical.nii", "reoriented_anat_moved.nii", "resampled_anat_moved.nii",
                  "example4d.nii.gz", "functional.nii", "standard.nii.gz", "test.mgz", "minc1_1_scale.mnc", "small.mnc",
                  "phantom_EPI_asc_CLEAR_2_1.PAR")]
        extra = sys.argv[2] if len(sys.argv) > 2 else None
        items += [(p, 0) for p in sorted(glob.glob(f"{extra}/*.nii.gz"))] if extra else []
        for p, i in items:
            try:
                v = nib_volume(p, i)
                f, u = features(pred, [v])
                out[Path(p).name] = (f, u)
                print(Path(p).name, v.GetSize(), "ok", flush=True)
            except Exception as e:
                print(Path(p).name, "failed", type(e).__name__, str(e)[:150], flush=True)
    else:
        lo, hi, modes = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
        rng = np.random.default_rng(0)
        for seed in range(lo, hi):
            case = generate_case(seed, shape=(24, 256, 256), label_noise=0.02)
            imgs = case.to_sitk()
            for m in modes:
                if m.startswith("noise"):
                    v = add_noise(input_views(imgs, "phases"), float(m[5:]), rng)
                else:
                    v = input_views(imgs, m)
                f, u = features(pred, v)
                out[f"{seed}:{m}"] = (f, u)
            print(seed, flush=True)
    keys = sorted(out)
    Path("runs/ood").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(f"runs/ood/{which}-{sys.argv[2] if len(sys.argv) > 2 and which != 'foreign' else ''}.npz",
                        keys=np.array(keys), **{f"{k}|{n}": v for k in keys for n, v in out[k][0].items()},
                        **{f"{k}|u": out[k][1] for k in keys})

if __name__ == "__main__":
    main()
