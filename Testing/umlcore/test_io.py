"""umlcore.io: reading volumes and cases (geometry kept), refusing bad inputs, atomic writes."""

import gzip
import shutil
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from umlcore.errors import UMLInputError
from umlcore.io import (
    check_same_grid,
    check_volume,
    geometry,
    read_case,
    read_volume,
    same_grid,
    split_4d,
    strip_image_extension,
    write_image_atomic,
)


def assert_same_geometry(a, b, atol=0.0):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=atol)


def fingerprint(path):
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize("name, atol", [("v.nii.gz", 1e-5), ("v.nii", 1e-5), ("v.nrrd", 1e-12), ("v.mha", 1e-12)])
def test_files_keep_geometry_and_voxels(tmp_path, make_volume, name, atol):
    image = make_volume()
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    before = fingerprint(path)
    read = read_volume(path)
    assert_same_geometry(read, image, atol)  # NIfTI stores the geometry as float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert fingerprint(path) == before


def test_dicom_series_folder_keeps_geometry(tmp_path, make_volume, dicom_writer):
    image = make_volume()
    folder = dicom_writer(image, tmp_path / "series")
    read = read_volume(folder)
    assert_same_geometry(read, image, atol=1e-5)  # DICOM decimal strings carry 6 decimals here
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), np.round(sitk.GetArrayFromImage(image)))


def test_a_nearly_orthonormal_nifti_is_read_with_nibabel_and_a_sheared_one_is_refused(tmp_path):
    """ITK refuses a direction 5e-4 off orthonormal (rounding in some exporters): nibabel reads it onto the nearest
    orthonormal grid, a sub-millimetre change. A real shear would put the outputs tens of mm off: refused."""
    affine = np.array([[-0.8, 0.8 * 5e-4, 0.0, 5.0], [0.0, -0.9, 0.0, 3.0], [0.0, 0.0, 2.0, 1.0], [0, 0, 0, 1.0]])
    data = np.random.default_rng(0).random((32, 24, 5)).astype(np.float32)
    path = tmp_path / "rounded.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(path))  # the case the fallback exists for
    image = read_volume(path)
    assert image.GetSize() == (32, 24, 5)
    np.testing.assert_allclose(image.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0))
    np.testing.assert_allclose(image.GetOrigin(), [-5.0, -3.0, 1.0])  # RAS -> LPS
    d = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), np.transpose(data, (2, 1, 0)))
    sheared = affine.copy()
    sheared[0, 1] = 0.2
    nib.save(nib.Nifti1Image(data, sheared), str(tmp_path / "sheared.nii.gz"))
    with pytest.raises(UMLInputError, match="sheared or non-orthogonal voxel grid.*resample it onto an orthogonal grid"):
        read_volume(tmp_path / "sheared.nii.gz")


def test_read_case_several_volumes_and_4d(tmp_path, make_volume):
    vols = [make_volume(seed=s) for s in range(3)]
    paths = []
    for i, v in enumerate(vols):
        paths.append(tmp_path / f"p{i}.nrrd")
        sitk.WriteImage(v, str(paths[-1]))
    got = read_case(paths)
    assert len(got) == 3
    for g, v in zip(got, vols):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(g), sitk.GetArrayFromImage(v))

    four_d = sitk.JoinSeries(vols)
    assert four_d.GetDimension() == 4
    p4 = tmp_path / "dce.nii.gz"
    sitk.WriteImage(four_d, str(p4))
    split = read_case([p4])
    assert len(split) == 3 and all(s.GetDimension() == 3 for s in split)
    for s, v in zip(split, vols):
        assert_same_geometry(s, v, atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(s), sitk.GetArrayFromImage(v))
    assert len(split_4d(four_d)) == 3
    assert read_case(str(paths[0]))[0].GetSize() == vols[0].GetSize()


def test_same_grid(make_volume):
    a = make_volume()
    assert same_grid(a, make_volume(seed=1))
    assert not same_grid(a, make_volume(size=(32, 30, 6)))
    assert not same_grid(a, make_volume(spacing=(0.7, 0.9, 3.0)))
    assert not same_grid(a, make_volume(origin=(0.0, 0.0, 0.0)))
    assert not same_grid(a, make_volume(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
    with pytest.raises(UMLInputError, match="not on the same voxel grid .*different spacing"):
        check_same_grid([a, make_volume(spacing=(0.7, 0.9, 3.0))], ["a", "b"])


def _write(tmp_path, name, array, **kw):
    image = sitk.GetImageFromArray(array, **kw)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def _truncated_gzip(tmp_path, make_volume):
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(make_volume(), str(good))
    data = good.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _truncated_nii(tmp_path, make_volume):
    good = tmp_path / "good.nii"
    sitk.WriteImage(make_volume(), str(good))
    bad = tmp_path / "bad.nii"
    bad.write_bytes(good.read_bytes()[:-1000])
    return bad


def _empty_dir(tmp_path, make_volume):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _dir_without_dicom(tmp_path, make_volume):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("no images here")
    return d


def _two_series(tmp_path, make_volume, dicom_writer):
    d = tmp_path / "mixed"
    dicom_writer(make_volume(), d / "a", series_uid="1.2.3.4.1")
    dicom_writer(make_volume(seed=1), d / "b", series_uid="1.2.3.4.2")
    for f in list((d / "a").iterdir()) + list((d / "b").iterdir()):
        f.rename(d / f"{f.parent.name}-{f.name}")
    return d


BAD = {
    "missing": (lambda t, mv: t / "nope.nii.gz", "does not exist"),
    "empty folder": (_empty_dir, "holds no DICOM series"),
    "folder without DICOM": (_dir_without_dicom, "holds no DICOM series"),
    "text file": (lambda t, mv: (t / "a.txt").write_text("hello") and t / "a.txt", "not an image file"),
    "text named nii.gz": (lambda t, mv: (t / "a.nii.gz").write_text("hello") and t / "a.nii.gz", "not a valid gzip"),
    "truncated gzip": (_truncated_gzip, "truncated gzip"),
    "truncated nii": (_truncated_nii, "is truncated"),
    "nan": (lambda t, mv: _write(t, "nan.nrrd", np.where(np.eye(32)[None] > 0, np.nan, 1.0).repeat(4, 0).astype(np.float32)), "NaN/Inf"),
    "inf": (lambda t, mv: _write(t, "inf.mha", np.where(np.eye(32)[None] > 0, np.inf, 1.0).repeat(4, 0).astype(np.float32)), "NaN/Inf"),
    "nan in NIfTI": (lambda t, mv: _write(t, "nan.nii.gz", np.where(np.eye(32)[None] > 0, np.nan, 1.0).repeat(4, 0).astype(np.float32)), "NaN/Inf"),
    "constant": (lambda t, mv: _write(t, "c.nii.gz", np.full((4, 32, 32), 7, np.int16)), "constant image"),
    "3x3x1": (lambda t, mv: _write(t, "tiny.nii.gz", np.arange(9, dtype=np.float32).reshape(1, 3, 3)), "too small"),
    "2D too small": (lambda t, mv: _write(t, "flat.nii.gz", np.arange(24, dtype=np.float32).reshape(4, 6)), "too small"),
    "RGB": (lambda t, mv: _write(t, "rgb.nrrd", np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32), isVector=True), "RGB/vector"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_are_refused_with_one_clear_line(tmp_path, make_volume, name):
    build, phrase = BAD[name]
    path = build(tmp_path, make_volume)
    files = {p: fingerprint(p) for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UMLInputError, match=phrase) as info:
        read_case([path])
    message = str(info.value)
    assert "\n" not in message and ": " in message
    assert {p: fingerprint(p) for p in tmp_path.rglob("*") if p.is_file()} == files


def test_two_dicom_series_in_one_folder_are_refused(tmp_path, make_volume, dicom_writer):
    with pytest.raises(UMLInputError, match="holds 2 DICOM series"):
        read_volume(_two_series(tmp_path, make_volume, dicom_writer))


def test_case_level_refusals(tmp_path, make_volume):
    a, b = tmp_path / "a.nrrd", tmp_path / "b.nrrd"
    sitk.WriteImage(make_volume(), str(a))
    sitk.WriteImage(make_volume(spacing=(1.0, 1.0, 2.5)), str(b))
    with pytest.raises(UMLInputError, match="not on the same voxel grid"):
        read_case([a, b])
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([make_volume(), make_volume(seed=2)]), str(four))
    with pytest.raises(UMLInputError, match="one 4D image or several 3D volumes"):
        read_case([four, a])
    with pytest.raises(UMLInputError, match="no input given"):
        read_case([])


def test_write_image_atomic(tmp_path, make_volume):
    image = make_volume()
    for name in ("out.nii.gz", "out.nrrd", "out.mha"):
        path = write_image_atomic(image, tmp_path / name)
        back = sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
        assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())
    # replacing an existing file
    write_image_atomic(sitk.Cast(image, sitk.sitkUInt8), tmp_path / "out.nrrd")
    assert sitk.ReadImage(str(tmp_path / "out.nrrd")).GetPixelID() == sitk.sitkUInt8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mha", "out.nii.gz", "out.nrrd"]
    # a failing write leaves nothing behind, and says so in one line
    with pytest.raises(UMLInputError, match="cannot write .*out.unknownformat"):
        write_image_atomic(image, tmp_path / "out.unknownformat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mha", "out.nii.gz", "out.nrrd"]
    with pytest.raises(UMLInputError, match="does not exist"):
        write_image_atomic(image, tmp_path / "missing" / "x.nrrd")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_nrrd_output_is_compressed(tmp_path, make_volume):
    path = write_image_atomic(make_volume(), tmp_path / "x.nrrd")
    assert b"encoding: gzip" in path.read_bytes()[:1000]
    with gzip.open(write_image_atomic(make_volume(), tmp_path / "x.nii.gz")) as f:
        assert len(f.read()) > 32 * 32 * 6 * 4


def test_strip_image_extension_and_geometry(make_volume):
    assert strip_image_extension("case01.nii.gz") == "case01"
    assert strip_image_extension("case01.NII") == "case01"
    assert strip_image_extension("a.b.nrrd") == "a.b"
    assert strip_image_extension("x.mha") == "x" and strip_image_extension("x.mhd") == "x"
    assert strip_image_extension("dicomdir") == "dicomdir"
    g = geometry(make_volume())
    assert g["size"] == [32, 32, 6] and g["spacing"] == [0.7, 0.9, 2.5] and len(g["direction"]) == 9


def test_a_dicom_series_with_a_duplicated_or_damaged_slice_is_refused(tmp_path, make_volume, dicom_writer):
    series = dicom_writer(make_volume(size=(24, 16, 6)), tmp_path / "dup")
    shutil.copy(series / "slice002.dcm", series / "slice002-copy.dcm")  # the same slice twice
    with pytest.raises(UMLInputError, match="two slices at the same position"):
        read_volume(series)
    last = dicom_writer(make_volume(size=(24, 16, 6)), tmp_path / "last")
    data = (last / "slice005.dcm").read_bytes()
    (last / "slice005.dcm").write_bytes(data[: len(data) // 3])  # the last slice cut: GDCM drops it silently
    with pytest.raises(UMLInputError, match="slice005.dcm in the DICOM series .* cannot be read \\(truncated or damaged\\)"):
        read_volume(last)
    (last / "notes.txt").write_text("not DICOM: not judged")
    (last / "slice005.dcm").unlink()
    assert read_volume(last).GetSize() == (24, 16, 5)


def test_a_non_orthonormal_grid_is_refused_in_any_format(tmp_path, make_volume):
    image = make_volume()
    image.SetDirection((1.0, 0.4, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # sheared axes
    for name in ("skewed.nrrd", "skewed.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
        with pytest.raises(UMLInputError, match="sheared or non-orthogonal voxel grid"):
            read_volume(tmp_path / name)
    with pytest.raises(UMLInputError, match="sheared or non-orthogonal"):
        check_volume(image, "in memory")


def test_blank_and_complex_volumes_are_refused(make_volume):
    blank = np.zeros((6, 32, 32), np.float32)
    blank[3, 10:12, 10:12] = 7.0  # 4 voxels of 6144
    with pytest.raises(UMLInputError, match="is blank: all but 4 of its 6144 voxels are 0"):
        check_volume(sitk.GetImageFromArray(blank), "late")
    complex_image = sitk.GetImageFromArray(np.ones((6, 32, 32), np.complex64) * (1 + 2j))
    with pytest.raises(UMLInputError, match="complex-valued voxels"):
        check_volume(complex_image, "c")


def test_what_c_libraries_print_is_kept_off_stderr(capfd):
    from umlcore.io import quiet_stderr

    with quiet_stderr() as captured:
        os.write(2, b"MetaImage: Read: Cannot read data\n")
    assert capfd.readouterr().err == "" and captured == ["MetaImage: Read: Cannot read data\n"]
