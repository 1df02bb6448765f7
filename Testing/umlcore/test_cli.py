"""The ``uml`` command line: success paths, the progress protocol, and bad inputs (exit 2, one line, nothing created).

Most cases run in-process through ``umlcore.cli.main(argv)``; a handful run as real subprocesses
(``python -m umlcore``).
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import umlcore.catalogue
import umlcore.cli
from umlcore.bundle import CARD_FILE, WEIGHTS_FILE, load_bundle
from umlcore.card import card_digest
from umlcore.cli import main

STAGES = {"read", "preprocess", "inference", "postprocess", "write", "done", "error"}


# ----------------------------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with (sha256, mtime_ns) for files: detects created, changed or touched files."""
    state = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            state[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            state[str(p)] = "dir" if p.is_dir() else "other"
    return state


def run_uml(*args, cwd):
    return subprocess.run([sys.executable, "-m", "umlcore", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def write(path: Path, image: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def work(tmp_path, make_volume, tiny_bundle_dir, picture_bundle_dir):
    """Inputs in ``tmp_path/in``; ``out`` (absent) is the output folder; ``bundle`` the shared tiny bundle,
    ``picture_bundle`` the shared RGB picture bundle."""
    inp = tmp_path / "in"
    inp.mkdir()
    def small_volume(**kw):  # small by default to keep the runs fast
        return make_volume(**{"size": (24, 16, 4), **kw})

    good = write(inp / "good.nii.gz", small_volume())
    phases = [write(inp / f"phase{i}.nrrd", small_volume(seed=i, scale=60.0 * (i + 1))) for i in range(3)]
    return SimpleNamespace(root=tmp_path, dir=inp, good=good, phases=phases, bundle=tiny_bundle_dir,
                           picture_bundle=picture_bundle_dir, out=tmp_path / "out", make_volume=small_volume)


def copy_bundle(w) -> Path:
    return Path(shutil.copytree(w.bundle, w.dir / "model"))


def edit_card(w, edit) -> Path:
    b = copy_bundle(w)
    card = json.loads((b / CARD_FILE).read_text())
    edit(card)
    card["weights"]["card_sha256"] = card_digest(card)  # resealed: these tests reach the card's other checks
    (b / CARD_FILE).write_text(json.dumps(card))
    return b


def predict_argv(w, *inputs, model=None, extra=()):
    return ["predict", *map(str, inputs), "-o", str(w.out), "--model", str(model or w.bundle), *extra]


def commas(*paths):
    return ",".join(map(str, paths))


# ----------------------------------------------------------------------------------------------- bad inputs


def _truncated_mha(w):
    path = write(w.dir / "cut.mha", w.make_volume())
    path.write_bytes(path.read_bytes()[:-200])
    return predict_argv(w, path)


def _truncated_gzip(w):
    data = w.good.read_bytes()
    (w.dir / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return predict_argv(w, w.dir / "cut.nii.gz")


def _truncated_nii(w):
    write(w.dir / "full.nii", w.make_volume())
    (w.dir / "cut.nii").write_bytes((w.dir / "full.nii").read_bytes()[:-2000])
    return predict_argv(w, w.dir / "cut.nii")


def _array_file(w, name, array, **kw):
    return predict_argv(w, write(w.dir / name, sitk.GetImageFromArray(array, **kw)))


def _nan(w):
    a = sitk.GetArrayFromImage(w.make_volume())
    a[2, 5, 5] = np.nan
    return _array_file(w, "nan.nii.gz", a)


def _inf(w):
    a = sitk.GetArrayFromImage(w.make_volume())
    a[1, 3, 3] = -np.inf
    return _array_file(w, "inf.nrrd", a)


def _folder(w, name, files=()):
    d = w.dir / name
    d.mkdir()
    for f in files:
        (d / f).write_text("not DICOM")
    return d


def _two_dicom_series(w, dicom_writer):
    d = w.dir / "mixed"
    for uid, sub in (("1.2.3.4.1", "a"), ("1.2.3.4.2", "b")):
        dicom_writer(w.make_volume(), w.root / "tmpdicom" / sub, series_uid=uid)
        for f in (w.root / "tmpdicom" / sub).iterdir():
            d.mkdir(exist_ok=True)
            f.rename(d / f"{sub}-{f.name}")
    shutil.rmtree(w.root / "tmpdicom")
    return predict_argv(w, d)


def _outputs_exist(w):
    (w.out / "good").mkdir(parents=True)
    (w.out / "good" / "segmentation.nii.gz").write_bytes(b"an older result")
    (w.out / "good" / ".uml-output").write_text(json.dumps({"written_by": "uml predict"}))  # uml wrote it
    return predict_argv(w, w.good)


def _foreign_folder(w):
    (w.out / "good").mkdir(parents=True)
    (w.out / "good" / "thesis.tex").write_text("the user's own")  # not uml's: never replaced
    return predict_argv(w, w.good, extra=["--overwrite"])


def _tampered(w):
    b = copy_bundle(w)
    data = bytearray((b / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x55
    (b / WEIGHTS_FILE).write_bytes(bytes(data))
    return predict_argv(w, w.good, model=b)


def _no_card(w):
    b = copy_bundle(w)
    (b / CARD_FILE).unlink()
    return predict_argv(w, w.good, model=b)


def _invalid_json(w):
    b = copy_bundle(w)
    (b / CARD_FILE).write_text("{ not json")
    return predict_argv(w, w.good, model=b)


def _outdir_not_writable(w):
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders (outdir_under_file covers an unwritable OUTDIR)")
    parent = w.root / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    w.out = parent / "out"
    return predict_argv(w, w.good)


def _cuda(w):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available")
    return predict_argv(w, w.good, extra=["--device", "cuda"])


BAD_INPUTS = {
    "missing file": (lambda w: predict_argv(w, w.dir / "missing.nii.gz"), "does not exist"),
    "empty folder": (lambda w: predict_argv(w, _folder(w, "empty")), "holds no DICOM series"),
    "folder without DICOM": (lambda w: predict_argv(w, _folder(w, "notes", ["a.txt", "b.csv"])), "holds no DICOM series"),
    "two DICOM series in one folder": (None, "holds 2 DICOM series"),
    "non-image file": (lambda w: ((w.dir / "notes.txt").write_text("hello"), predict_argv(w, w.dir / "notes.txt"))[1], "not an image file"),
    "text file named .nii.gz": (lambda w: ((w.dir / "fake.nii.gz").write_text("hello"), predict_argv(w, w.dir / "fake.nii.gz"))[1], "not a valid gzip file"),
    "truncated gzip": (_truncated_gzip, "truncated gzip"),
    "truncated nii": (_truncated_nii, "is truncated"),
    "truncated .mha": (_truncated_mha, "cannot be read"),
    "NaN voxels": (_nan, "NaN/Inf voxels"),
    "Inf voxels": (_inf, "NaN/Inf voxels"),
    "constant image": (lambda w: _array_file(w, "flat.nii.gz", np.full((4, 16, 24), 5, np.int16)), "constant image"),
    "3x3x1 volume": (lambda w: _array_file(w, "tiny.nrrd", np.arange(9, dtype=np.float32).reshape(1, 3, 3)), "too small"),
    "thin axial slices": (lambda w: predict_argv(w, write(w.dir / "thin.mha", w.make_volume(size=(24, 4, 16), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))), "smaller than 8x8"),
    "2D image": (lambda w: _array_file(w, "photo.nii.gz", np.arange(1024, dtype=np.float32).reshape(32, 32)),
                 "model 'test-model' reads 3D volumes (pre, early, late), but got a 2D picture or single slice of 32x32 pixels"),
    "RGB pixels": (lambda w: _array_file(w, "rgb.nrrd", np.random.default_rng(0).random((4, 16, 24, 3)).astype(np.float32), isVector=True), "RGB/vector"),
    "two phases": (lambda w: predict_argv(w, commas(*w.phases[:2])), "got 2 volumes"),
    "four phases": (lambda w: predict_argv(w, commas(*w.phases, w.phases[0])), "got 4 volumes"),
    "4D of the wrong length": (lambda w: predict_argv(w, write(w.dir / "dce.nii.gz", sitk.JoinSeries([w.make_volume(), w.make_volume(seed=1)]))), "got 2 volumes"),
    "4D plus a volume": (lambda w: predict_argv(w, commas(write(w.dir / "dce.nii.gz", sitk.JoinSeries([w.make_volume()] * 3)), w.good)), "one 4D image or several 3D volumes"),
    "volumes on different grids": (lambda w: predict_argv(w, commas(w.phases[0], w.phases[1], write(w.dir / "moved.nrrd", w.make_volume(origin=(0.0, 0.0, 0.0))))), "not on the same voxel grid"),
    "bad second case": (lambda w: predict_argv(w, w.good, w.dir / "missing.nrrd"), "does not exist"),
    "empty item in a comma list": (lambda w: predict_argv(w, commas(w.phases[0], "")), "empty item"),
    "duplicate case names": (lambda w: predict_argv(w, w.good, write(w.dir / "sub" / "good.nrrd", w.make_volume())), "both give the case name"),
    "model missing": (lambda w: predict_argv(w, w.good, model=w.dir / "no-model"), "does not exist"),
    "model unknown id": (lambda w: predict_argv(w, w.good, model="no-such-model"), "no model with id 'no-such-model'"),
    "model folder without model.json": (_no_card, "has no model.json"),
    "model.json not JSON": (_invalid_json, "is not valid JSON"),
    "model tampered weights": (_tampered, "does not match the sha256"),
    "model.json missing fields": (lambda w: predict_argv(w, w.good, model=edit_card(w, lambda c: c.pop("classes"))), "missing required field"),
    "model unknown schema version": (lambda w: predict_argv(w, w.good, model=edit_card(w, lambda c: c.update(schema_version=7))), "schema_version 7"),
    "output folder under a file": (lambda w: predict_argv(w, w.good)[:3] + [str(w.good / "out")] + predict_argv(w, w.good)[4:], "is a file, not a folder"),
    "output folder is a file": (lambda w: predict_argv(w, w.good)[:3] + [str(w.phases[0])] + predict_argv(w, w.good)[4:], "is a file, not a folder"),
    "output folder not writable": (_outdir_not_writable, "not writable"),
    "outputs exist without --overwrite": (_outputs_exist, "already exists: pass --overwrite"),
    "--overwrite of a folder uml did not write": (_foreign_folder, "was not written by uml"),
    "unknown --format": (lambda w: predict_argv(w, w.good, extra=["--format", "jpg"]), "argument --format: invalid choice: 'jpg'"),
    "batch size 0": (lambda w: predict_argv(w, w.good, extra=["--batch-size", "0"]), "batch size must be a positive integer"),
    "batch size not a number": (lambda w: predict_argv(w, w.good, extra=["--batch-size", "many"]), "batch size must be a positive integer"),
    "unknown --device": (lambda w: predict_argv(w, w.good, extra=["--device", "tpu"]), "argument --device: invalid choice"),
    "cuda without a GPU": (_cuda, "no CUDA GPU"),
    "missing -o": (lambda w: ["predict", str(w.good), "--model", str(w.bundle)], "the following arguments are required: -o/--output"),
    "unknown command": (lambda w: ["segment", str(w.good)], "invalid choice: 'segment'"),
}


# -- the hostile inputs and faults of the "nothing lost, nothing silent" issue


def _data_folder(w):
    """``data/case01/case01.nrrd`` with a sibling ``notes.txt``: what ``-o data --overwrite`` once deleted."""
    case = w.root / "data" / "case01"
    case.mkdir(parents=True)
    (case / "notes.txt").write_text("the user's notes")
    return write(case / "case01.nrrd", w.make_volume())


def _output_holds_the_input(w):
    scan = _data_folder(w)
    return ["predict", str(scan), "-o", str(w.root / "data"), "--model", str(w.bundle), "--overwrite"]


def _output_is_the_dicom_input(w, dicom_writer):
    series = dicom_writer(w.make_volume(), w.root / "data" / "case02")
    return ["predict", str(series), "-o", str(w.root / "data"), "--model", str(w.bundle), "--overwrite"]


def _tampered_card(w):
    """The card's review threshold edited, the weights untouched: the card's own hash no longer matches."""
    b = copy_bundle(w)
    card = json.loads((b / CARD_FILE).read_text())
    card["review_uncertainty"] = 0.99
    (b / CARD_FILE).write_text(json.dumps(card))
    return predict_argv(w, w.good, model=b)


def _nifti(w, name, data, affine=None):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine), str(w.dir / name))
    return predict_argv(w, w.dir / name, extra=["--preview"])


def _zero_pixdim(w):
    """A NIfTI whose stored pixdim[2] is 0 (nibabel and ITK read it as 1 mm): patched into the header's bytes."""
    import struct

    import nibabel as nib

    img = nib.Nifti1Image(np.random.default_rng(0).random((24, 16, 4)).astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0]))
    img.set_sform(None, code=0)
    path = w.dir / "flat.nii"
    nib.save(img, str(path))
    data = bytearray(path.read_bytes())
    data[84:88] = struct.pack("<f", 0.0)  # pixdim[2] of a NIfTI-1 header
    path.write_bytes(bytes(data))
    return predict_argv(w, path)


def _complex(w):
    rng = np.random.default_rng(0)
    return _nifti(w, "complex.nii.gz", (rng.random((24, 16, 4)) + 1j * rng.random((24, 16, 4))).astype(np.complex64))


def _sheared(w):
    affine = np.array([[0.8, 0.3, 0.0, 0.0], [0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0, 0, 0, 1.0]])
    return _nifti(w, "sheared.nii.gz", np.random.default_rng(0).random((24, 16, 4)).astype(np.float32), affine)


def _blank_late_phase(w):
    blank = np.zeros((4, 16, 24), np.float32)
    blank[2, 8, 12] = 100.0  # blank but for one voxel
    image = sitk.GetImageFromArray(blank)
    image.CopyInformation(sitk.ReadImage(str(w.phases[0])))
    return predict_argv(w, commas(w.phases[0], w.phases[1], write(w.dir / "late.nrrd", image)))


def _dicom_gap(w, dicom_writer):
    series = dicom_writer(w.make_volume(size=(24, 16, 6)), w.dir / "gap")
    (series / "slice003.dcm").unlink()  # the middle slice is missing
    return predict_argv(w, series)


def _dicom_truncated(w, dicom_writer):
    series = dicom_writer(w.make_volume(size=(24, 16, 6)), w.dir / "cut")
    data = (series / "slice002.dcm").read_bytes()
    (series / "slice002.dcm").write_bytes(data[: len(data) // 3])
    return predict_argv(w, series)


def _zero_spacing_mha(w):
    path = write(w.dir / "flat.mha", w.make_volume())
    path.write_bytes(re.sub(rb"ElementSpacing = \S+", b"ElementSpacing = 0", path.read_bytes(), count=1))
    return predict_argv(w, path)


def _spacing_in_metres(w):
    bundle = edit_card(w, lambda card: card["input"].update(spacing_mm=[0.2, 8.0]))
    scan = w.make_volume()
    scan.SetSpacing((0.0008, 0.0008, 0.002))
    return predict_argv(w, write(w.dir / "metres.nii.gz", scan), model=bundle)


def _symlink_loop(w):
    loop = w.dir / "loop.nii.gz"
    loop.symlink_to(loop)
    return predict_argv(w, loop)


def _nhdr_without_data(w):
    header = w.dir / "scan.nhdr"
    sitk.WriteImage(w.make_volume(), str(header))
    data = [p for p in w.dir.iterdir() if p.name.startswith("scan.") and p.suffix != ".nhdr"]
    for p in data:
        p.unlink()
    return predict_argv(w, header)


def _too_big(w):
    return predict_argv(w, write(w.dir / "big.nrrd", w.make_volume(size=(1024, 1024, 2))), extra=["--max-memory-gb", "0.3"])


BAD_INPUTS.update({
    "output folder holds the input (--overwrite)": (_output_holds_the_input, "would hold the input"),
    "model.json edited after export": (_tampered_card, "was changed after the bundle was exported"),
    "complex voxels (with --preview)": (_complex, "complex-valued voxels"),
    "pixdim 0": (_zero_pixdim, "voxel size (pixdim) of 0.8 x 0 x 2 mm"),
    "sheared NIfTI": (_sheared, "sheared or non-orthogonal voxel grid"),
    "late phase blank but for one voxel": (_blank_late_phase, "is blank: all but 1 of its 1536 voxels are 0"),
    "DICOM series with a missing slice": ("dicom", "uneven slice spacing"),
    "DICOM series with a truncated file": ("dicom", "cannot be read (truncated or damaged)"),
    "zero spacing in a .mha": (_zero_spacing_mha, "voxel spacing of 0 x 0.9"),
    "symbolic link loop": (_symlink_loop, "loops back on itself"),
    "spacing in metres": (_spacing_in_metres, "metres or microns"),
    ".nhdr whose data file is missing": (_nhdr_without_data, "names its voxel data file"),
    "empty -o": (lambda w: ["predict", str(w.good), "-o", "", "--model", str(w.bundle)], "the output folder (-o/--output) is empty"),
    "too big for the memory limit": (_too_big, "needs about"),
})


def _picture(w, name, array, mode=None):
    """A picture file written with Pillow (``array`` uint8/uint16, ``(H, W)`` or ``(H, W, C)``)."""
    from PIL import Image

    path = w.dir / name
    Image.fromarray(array, mode).save(path)
    return path


def _rgb(h=30, w=40, seed=0):
    """A small deterministic RGB picture: a bright red disc on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = 120 * np.exp(-((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (h * w / 20))
    noise = rng.integers(0, 60, (h, w, 3))
    return np.clip(noise + np.stack([disc + 60, disc / 2 + 30, 0 * disc + 20], axis=-1), 0, 255).astype(np.uint8)


BAD_INPUTS.update({
    "a picture for a volume model": (lambda w: predict_argv(w, _picture(w, "fundus.png", _rgb())),
                                     "model 'test-model' reads 3D volumes (pre, early, late), but got a 2D picture or "
                                     "single slice of 40x30 pixels: give the whole volume"),
    "a volume for a picture model": (lambda w: predict_argv(w, w.good, model=w.picture_bundle),
                                     "model 'test-picture-model' reads 2D pictures (red, green, blue), but got a 3D "
                                     "volume of 24x16x4 voxels: give a picture (PNG, JPEG, BMP, TIFF)"),
    "--format png for a volume": (lambda w: predict_argv(w, w.good, extra=["--format", "png"]),
                                  "has 4 slices (24x16x4 voxels) but a PNG holds one 2D picture"),
    "a constant picture": (lambda w: predict_argv(w, _picture(w, "flat.png", np.full((30, 40, 3), 90, np.uint8)),
                                                  model=w.picture_bundle), "flat.png (red) is a constant image"),
    "a colour picture with other inputs": (lambda w: predict_argv(w, commas(_picture(w, "a.png", _rgb()), w.good),
                                                                  model=w.picture_bundle), "one of them is a colour picture"),
    "four grey pictures for an RGB model": (lambda w: predict_argv(w, commas(*(_picture(w, f"g{i}.png", _rgb(seed=i)[..., 0])
                                                                               for i in range(4))), model=w.picture_bundle),
                                            "got a picture of 4 channel(s) but model 'test-picture-model' takes 1"),
})
DICOM_BUILDERS = {"DICOM series with a missing slice": _dicom_gap, "DICOM series with a truncated file": _dicom_truncated,
                  "output folder is the DICOM input (--overwrite)": _output_is_the_dicom_input}
BAD_INPUTS["output folder is the DICOM input (--overwrite)"] = ("dicom", "is the input")


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_creates_nothing(name, work, capsys, dicom_writer):
    build, phrase = BAD_INPUTS[name]
    if build == "dicom":
        argv = DICOM_BUILDERS[name](work, dicom_writer)
    else:
        argv = _two_dicom_series(work, dicom_writer) if build is None else build(work)
    before = snapshot(work.root)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("uml: error: "), err
    assert phrase in lines[0]
    assert "Traceback" not in err and out == ""
    assert snapshot(work.root) == before  # nothing created, inputs untouched (bytes and mtime)


def test_enough_distinct_bad_inputs():
    assert len(BAD_INPUTS) >= 20


@pytest.mark.parametrize("name", ["missing file", "model tampered weights", "batch size 0", "zero spacing in a .mha",
                                  "truncated .mha", "complex voxels (with --preview)"])
def test_bad_input_through_a_real_process(name, work):
    """Through a real process, so that what C++ libraries write to stderr (MetaIO, ITK) is seen too: one line."""
    argv = BAD_INPUTS[name][0](work)
    before = snapshot(work.root)
    proc = run_uml(*argv, "--progress", "json", cwd=work.root) if argv[0] == "predict" and "--batch-size" not in argv else run_uml(*argv, cwd=work.root)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("uml: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert BAD_INPUTS[name][1] in proc.stderr
    if "--progress" in proc.args:
        last = json.loads(proc.stdout.splitlines()[-1])
        assert last["stage"] == "error" and BAD_INPUTS[name][1] in last["message"]
    assert snapshot(work.root) == before


# ----------------------------------------------------------------------------------------------- success


def test_predict_in_a_real_process_with_json_progress(work):
    before = {str(p): snapshot(work.dir)[str(p)] for p in [work.good, *work.phases]}
    proc = run_uml(*predict_argv(work, work.good, commas(*work.phases), extra=["--progress", "json", "--batch-size", "4"]), cwd=work.root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(set(line) == {"stage", "case", "fraction", "message"} for line in lines)
    assert {line["stage"] for line in lines} == STAGES - {"error"}
    fractions = [line["fraction"] for line in lines]
    assert all(0.0 <= f <= 1.0 for f in fractions) and all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert lines[-1]["stage"] == "done" and lines[-1]["fraction"] == 1.0
    assert {line["case"] for line in lines} == {"good", "phase0", None}
    assert sorted(p.name for p in work.out.iterdir()) == ["good", "phase0"]
    for case, ref in (("good", work.good), ("phase0", work.phases[0])):
        folder = work.out / case
        assert sorted(p.name for p in folder.iterdir()) == [".uml-output", "segmentation.nii.gz", "summary.json", "uncertainty.nii.gz"]
        seg = sitk.ReadImage(str(folder / "segmentation.nii.gz"))
        unc = sitk.ReadImage(str(folder / "uncertainty.nii.gz"))
        (src,) = umlcore.io.read_case([ref])
        for image in (seg, unc):
            assert image.GetSize() == src.GetSize()
            np.testing.assert_allclose(image.GetSpacing(), src.GetSpacing(), atol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), src.GetOrigin(), atol=1e-5)
            np.testing.assert_allclose(image.GetDirection(), src.GetDirection(), atol=1e-6)
        assert seg.GetPixelID() == sitk.sitkUInt8 and unc.GetPixelID() == sitk.sitkFloat32
        u = sitk.GetArrayFromImage(unc)
        assert 0 < u.min() and u.max() <= 1
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["schema_version"] == 2 and summary["case_id"] == case
        assert summary["outputs"] == {"segmentation": "segmentation.nii.gz", "uncertainty": "uncertainty.nii.gz", "summary": "summary.json"}
        assert summary["timings_s"]["read"] > 0
        assert summary["timings_s"]["total"] == pytest.approx(sum(v for k, v in summary["timings_s"].items() if k != "total"))
    inputs = json.loads((work.out / "phase0" / "summary.json").read_text())["inputs"]
    assert [i["path"] for i in inputs] == [str(p) for p in work.phases]
    inputs = json.loads((work.out / "good" / "summary.json").read_text())["inputs"]
    assert [i["path"] for i in inputs] == [str(work.good)] * 3
    assert {str(p): snapshot(work.dir)[str(p)] for p in [work.good, *work.phases]} == before
    assert not [p for p in work.out.rglob(".*") if p.name != ".uml-output"]  # no temporary files or locks left


def test_predict_nrrd_dicom_and_4d_in_process(work, dicom_writer, capsys):
    series = dicom_writer(work.make_volume(), work.dir / "Series 7")
    dce = write(work.dir / "dce.nii.gz", sitk.JoinSeries([sitk.ReadImage(str(p)) for p in work.phases]))
    assert main(predict_argv(work, series, dce, extra=["--format", "nrrd", "--progress", "none"])) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert sorted(p.name for p in work.out.iterdir()) == ["Series 7", "dce"]
    for case in ("Series 7", "dce"):
        assert sorted(p.name for p in (work.out / case).iterdir()) == [".uml-output", "segmentation.nrrd", "summary.json",
                                                                      "uncertainty.nrrd"]
    (src,) = umlcore.io.read_case([series])
    seg = sitk.ReadImage(str(work.out / "Series 7" / "segmentation.nrrd"))
    assert seg.GetSize() == src.GetSize() and np.allclose(seg.GetDirection(), src.GetDirection(), atol=1e-12)
    assert np.allclose(seg.GetOrigin(), src.GetOrigin(), atol=1e-9) and np.allclose(seg.GetSpacing(), src.GetSpacing(), atol=1e-12)
    summary = json.loads((work.out / "dce" / "summary.json").read_text())
    assert [i["volume"] for i in summary["inputs"]] == [0, 1, 2] and summary["inputs"][0]["path"] == str(dce)


def test_overwrite_replaces_only_with_the_flag(work, capsys):
    assert main(predict_argv(work, work.good)) == 0
    summary = work.out / "good" / "summary.json"
    assert json.loads(summary.read_text())["timings_s"]["read"] > 0  # one case: read once, timed
    (work.out / "good" / "note.txt").write_text("user file")
    first = snapshot(work.out)
    assert main(predict_argv(work, work.good, work.phases[1])) == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(work.out) == first
    assert main(predict_argv(work, work.good, work.phases[1], extra=["--overwrite", "--batch-size", "2"])) == 0
    assert sorted(p.name for p in work.out.iterdir()) == ["good", "phase1"]
    assert sorted(p.name for p in (work.out / "good").iterdir()) == [".uml-output", "segmentation.nii.gz", "summary.json",
                                                                     "uncertainty.nii.gz"]
    assert json.loads(summary.read_text())["case_id"] == "good"


@pytest.mark.parametrize("failure, code, phrase, outdir_exists", [
    (RuntimeError("disk on fire"), 1, "uml: internal error: RuntimeError: disk on fire (rerun with --debug", False),
    (KeyboardInterrupt(), 130, "uml: cancelled", True),
])
def test_failure_while_writing_leaves_nothing(work, capsys, monkeypatch, failure, code, phrase, outdir_exists):
    calls = []
    real = umlcore.cli.write_image_atomic

    def flaky(image, path):
        calls.append(path)
        if len(calls) == 3:  # the first case is written, the second fails half-way
            raise failure
        return real(image, path)

    monkeypatch.setattr(umlcore.cli, "write_image_atomic", flaky)
    if outdir_exists:
        work.out.mkdir()
    before = snapshot(work.root)
    assert main(predict_argv(work, work.good, work.phases[2])) == code
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(phrase)
    assert len(calls) == 3
    assert snapshot(work.root) == before


def test_debug_prints_the_traceback(work, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(umlcore.cli, "write_image_atomic", boom)
    assert main(predict_argv(work, work.good, extra=["--debug"])) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("uml: internal error: ZeroDivisionError: oops")
    assert not work.out.exists()


def test_no_model_and_none_shipped(work, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(umlcore.catalogue, "shipped_models_dir", lambda: tmp_path / "none-shipped")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["predict", str(work.good), "-o", str(work.out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uml: error: no model given and no shipped model found") and "pass --model" in err


def test_info_and_models(work, capsys, monkeypatch, tmp_path):
    assert main(["info", str(work.bundle)]) == 0
    text = capsys.readouterr().out
    assert "test-model 0.0.1" in text and "(verified)" in text and "no pCR, pCR (positive: pCR)" in text
    assert "postprocess:" not in text and "calibration:" not in text  # the test bundle sets neither
    assert "lesion reader:" not in text and "changelog:" not in text
    card = json.loads((work.bundle / "model.json").read_text())
    logged = tmp_path / "logged"
    shutil.copytree(work.bundle, logged)
    logged_card = {**card, "changelog": {"0.0.1": "first", "0.0.0": "none"}}
    logged_card["weights"] = {**card["weights"], "card_sha256": card_digest(logged_card)}
    (logged / "model.json").write_text(json.dumps(logged_card))
    assert main(["info", str(logged)]) == 0
    assert "  changelog:     0.0.1: first (and 1 earlier versions)\n" in capsys.readouterr().out

    assert main(["info", str(work.bundle), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["id"] == "test-model" and card["schema_version"] == 2 and card["path"] == str(work.bundle)
    assert main(["info", str(work.dir / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("uml: error: ")

    home = tmp_path / "home"
    shutil.copytree(work.bundle, home / ".uml" / "models" / "mine")
    monkeypatch.setenv("HOME", str(home))
    assert main(["models"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert ["test-model", "0.0.1", str(home / ".uml" / "models" / "mine"), "user"] in rows
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"id": "test-model", "version": "0.0.1", "path": str(home / ".uml" / "models" / "mine"), "shipped": False, "error": None} in listed
    shipped = [e["shipped"] for e in listed]
    assert shipped == sorted(shipped, reverse=True)  # shipped ones first
    # a model id from the user folder works for info
    assert main(["info", "test-model"]) == 0


def test_help_and_progress_bar(work, capsys):
    assert main(["--help"]) == 0
    assert "predict" in capsys.readouterr().out
    assert main(predict_argv(work, work.good, extra=["--progress", "bar"])) == 0
    out, err = capsys.readouterr()
    assert out == "" and "100.0% done" in err and err.endswith("\n")


def test_sigterm_cancels_cleanly(work):
    """SIGTERM (how the Slicer module cancels) mid-run: exit 130, no output folder, inputs untouched."""
    big = write(work.dir / "big.nrrd", work.make_volume(size=(64, 64, 40)))
    before = snapshot(work.root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "umlcore", *predict_argv(work, big, extra=["--progress", "json", "--batch-size", "1"])],
        cwd=work.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stdout:
            if json.loads(line)["stage"] == "preprocess":  # the output folder exists by now
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err == "uml: cancelled: nothing was written\n"
    assert json.loads(rest.splitlines()[-1])["stage"] == "error"
    assert snapshot(work.root) == before


def test_info_shows_the_shipped_cards_post_processing_and_calibration(capsys):
    assert main(["info", "uml-breast-dce-small"]) == 0
    text = capsys.readouterr().out
    card = load_bundle(umlcore.catalogue.resolve_model("uml-breast-dce-small")).card
    assert f"classifier pool {card.architecture.cls_pool}\n" in text
    assert card.component_max_uncertainty is not None
    assert f"postprocess:   drop segmentation components with mean uncertainty > {card.component_max_uncertainty:g}" in text
    assert card.case_calibration is None and card.single_volume_calibration is not None
    assert "  calibration:   one volume given: Platt slope" in text
    assert card.reader is not None and "lesion reader: 73,555 parameters, 80 x 80 patches of 1 mm" in text
    assert "each read in its 8 flips and transposes" in text
    terms = ", ".join(f"{t} {v:+.3f}" for t, v in card.reader.stacking.items())
    assert f"case opinion: the 3 largest lesions kept, stacked rule {terms}" in text
    assert f"keeps those of the 8 largest components it reads as lesions with p >= {card.reader.segmentation_min_lesion}" in text


def test_info_shows_the_cards_motion_correction(bundle_factory, capsys):
    from umlcore.card import MotionCorrection

    plain = bundle_factory()
    assert main(["info", str(plain)]) == 0
    assert "  motion:        phases read as given\n" in capsys.readouterr().out
    spec = dataclasses.replace(load_bundle(plain).card.input, motion_correction=MotionCorrection("translation", "early", 8))
    moved = bundle_factory(input=spec)
    assert main(["info", str(moved)]) == 0
    assert ("  motion:        the other phases of a multi-phase case moved onto the early phase by a 3D translation "
            "(up to 8 mm)\n") in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- the output folder
def test_a_full_disk_exits_2_with_one_line_and_leaves_nothing(work):
    """A real process whose file size limit (RLIMIT_FSIZE) stands in for a full disk: writes fail with EFBIG."""
    import resource

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))

    before = snapshot(work.root)
    proc = subprocess.run([sys.executable, "-B", "-m", "umlcore", *predict_argv(work, work.good)], cwd=work.root,
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files_only)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("uml: error: no space left on the device while writing"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert snapshot(work.root) == before


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(work, capsys):
    work.out.mkdir()
    (work.out / ".good.uml-lock").write_text(f"{os.getpid()}\n")  # a live process holds the case
    before = snapshot(work.root)
    assert main(predict_argv(work, work.good)) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"uml: error: another uml run (process {os.getpid()}) is writing {work.out / 'good'}: wait "
                           "for it to finish, or choose another -o")
    assert snapshot(work.root) == before


def test_the_leftovers_of_a_killed_run_are_cleaned_by_the_next(work):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work.out.mkdir()
    (work.out / f".uml-tmp-{dead.pid}-x1" / "good").mkdir(parents=True)
    (work.out / ".good.uml-lock").write_text(f"{dead.pid}\n")
    assert main(predict_argv(work, work.good)) == 0
    assert sorted(p.name for p in work.out.iterdir()) == ["good"]


def test_the_memory_plan_refuses_before_any_voxel_is_read(work, capsys, monkeypatch):
    def never(paths):
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(umlcore.cli, "read_case", never)
    argv = _too_big(work)
    before = snapshot(work.root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "--max-memory-gb" in err and err.count("\n") == 1
    assert snapshot(work.root) == before


def test_a_closed_stdout_stops_quietly(work):
    """`uml info MODEL --json | head -1`: the reader goes away; no traceback, no 'Exception ignored' line."""
    proc = subprocess.Popen([sys.executable, "-m", "umlcore", "info", str(work.bundle), "--json"], cwd=work.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before uml writes anything
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err == b"", err


# ----------------------------------------------------------------------------------------------- pictures


def _pictures(w):
    """The same picture as RGB PNG, JPEG, BMP and TIFF, a grey PNG, an RGBA PNG and a grey + alpha PNG."""
    rgb = _rgb()
    alpha = np.full(rgb.shape[:2], 200, np.uint8)
    return {"fundus.png": _picture(w, "fundus.png", rgb), "photo.jpg": _picture(w, "photo.jpg", rgb),
            "scan.bmp": _picture(w, "scan.bmp", rgb), "slide.tiff": _picture(w, "slide.tiff", rgb),
            "grey.png": _picture(w, "grey.png", rgb[..., 0]), "rgba.png": _picture(w, "rgba.png", np.dstack([rgb, alpha])),
            "grey-alpha.png": _picture(w, "grey-alpha.png", np.dstack([rgb[..., 0], alpha]), "LA")}


def test_pictures_give_png_outputs_on_their_pixel_grid(work, capsys):
    pictures = _pictures(work)
    before = snapshot(work.dir)
    assert main(predict_argv(work, *pictures.values(), model=work.picture_bundle, extra=["--preview"])) == 0
    assert capsys.readouterr().err == ""
    assert snapshot(work.dir) == before
    for name in pictures:
        case = name.split(".")[0]
        folder = work.out / case
        assert sorted(p.name for p in folder.iterdir()) == [".uml-output", "preview.png", "segmentation.png",
                                                            "summary.json", "uncertainty.png"]
        seg, unc = (sitk.ReadImage(str(folder / f)) for f in ("segmentation.png", "uncertainty.png"))
        assert seg.GetSize() == unc.GetSize() == (40, 30)
        assert seg.GetPixelID() == sitk.sitkUInt8 and unc.GetPixelID() == sitk.sitkUInt16
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1} and sitk.GetArrayFromImage(unc).min() > 0
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["case_id"] == case and summary["geometry"]["size"] == [40, 30, 1]
        assert summary["slicing"]["count"] == 1 and len(summary["slices"]) == 1
        assert summary["outputs"] == {"segmentation": "segmentation.png", "uncertainty": "uncertainty.png",
                                      "summary": "summary.json", "preview": "preview.png"}
        grey = case.startswith("grey")
        assert [i["volume"] for i in summary["inputs"]] == ([0, 0, 0] if grey else [0, 1, 2])
    rgba = json.loads((work.out / "rgba" / "summary.json").read_text())
    png = json.loads((work.out / "fundus" / "summary.json").read_text())
    assert rgba["classification"] == png["classification"]  # the alpha channel is dropped
    grey = json.loads((work.out / "grey-alpha" / "summary.json").read_text())
    assert grey["classification"] == json.loads((work.out / "grey" / "summary.json").read_text())["classification"]


def test_the_uncertainty_png_is_the_uncertainty_times_65535(work):
    picture = _picture(work, "fundus.png", _rgb())
    assert main(predict_argv(work, picture, model=work.picture_bundle, extra=["--format", "nrrd"])) == 0
    seg = sitk.ReadImage(str(work.out / "fundus" / "segmentation.nrrd"))
    unc = sitk.ReadImage(str(work.out / "fundus" / "uncertainty.nrrd"))
    assert seg.GetSize() == unc.GetSize() == (40, 30, 1) and unc.GetPixelID() == sitk.sitkFloat32
    assert main(predict_argv(work, picture, model=work.picture_bundle, extra=["--overwrite"])) == 0
    scaled = sitk.GetArrayFromImage(sitk.ReadImage(str(work.out / "fundus" / "uncertainty.png")))
    np.testing.assert_array_equal(scaled, np.round(sitk.GetArrayFromImage(unc)[0].astype(np.float64) * 65535))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(work.out / "fundus" / "segmentation.png")))
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(seg)[0])


def test_a_picture_slicer_saved_as_a_vector_nrrd_is_read_as_its_colours(work):
    """3D Slicer saves a colour picture loaded as a vector volume as a single-slice vector NRRD, on its own grid."""
    vector = sitk.GetImageFromArray(_rgb()[None], isVector=True)
    vector.SetSpacing((0.02, 0.02, 1.0))
    vector.SetOrigin((-3.0, 4.5, 0.0))
    vector.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = write(work.dir / "fundus-vector.nrrd", vector)
    assert main(predict_argv(work, path, _picture(work, "fundus.png", _rgb()), model=work.picture_bundle)) == 0
    seg = sitk.ReadImage(str(work.out / "fundus-vector" / "segmentation.nii.gz"))  # auto: not a picture file
    assert seg.GetSize() == (40, 30, 1)
    np.testing.assert_allclose(seg.GetSpacing(), (0.02, 0.02, 1.0), rtol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), (-3.0, 4.5, 0.0), atol=1e-6)
    summary = json.loads((work.out / "fundus-vector" / "summary.json").read_text())
    assert summary["classification"] == json.loads((work.out / "fundus" / "summary.json").read_text())["classification"]


def test_a_picture_in_a_real_process(work):
    picture = _picture(work, "ISIC_0000001.jpg", _rgb())
    proc = run_uml(*predict_argv(work, picture, model=work.picture_bundle, extra=["--preview", "--progress", "json"]),
                   cwd=work.root)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["stage"] == "done"
    folder = work.out / "ISIC_0000001"
    assert sitk.ReadImage(str(folder / "segmentation.png")).GetSize() == (40, 30)
    assert (folder / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mismatch = run_uml(*predict_argv(work, picture, extra=["--overwrite"]), cwd=work.root)
    assert mismatch.returncode == 2 and mismatch.stderr.count("\n") == 1
    assert "reads 3D volumes (pre, early, late), but got a 2D picture" in mismatch.stderr


def test_info_says_what_the_model_reads_and_its_size(work, capsys):
    assert main(["info", str(work.picture_bundle)]) == 0
    text = capsys.readouterr().out
    assert "  input:         2D pictures (PNG, JPEG, BMP, TIFF), channels red, green, blue" in text
    assert "  size:          every slice resized to 64 rows x 64 columns\n" in text
    assert main(["info", str(work.bundle)]) == 0
    text = capsys.readouterr().out
    assert "  input:         3D volumes in axial slices, channels pre, early, late" in text
    assert "  size:          native\n" in text
    assert main(["info", str(work.picture_bundle), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["input"]["kind"] == "picture" and card["input"]["target_size"] == [64, 64]
