"""Image I/O of the predictor: read volumes and cases, write images atomically.

Supported inputs: NIfTI (``.nii`` / ``.nii.gz``; nibabel reads NIfTI files whose direction cosines SimpleITK
refuses), NRRD (``.nrrd`` / ``.nhdr``), MetaImage (``.mha`` / ``.mhd``) and folders holding one DICOM series
(SimpleITK's ``ImageSeriesReader``). SimpleITK keeps the geometry in LPS, as 3D Slicer and DICOM do.

Every problem a user can fix raises :class:`~umlcore.errors.UMLInputError` with one line naming the problem
and the fix. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import gzip
import os
import secrets
import zlib
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import UMLInputError

__all__ = [
    "MIN_INPLANE_SIZE",
    "IMAGE_EXTENSIONS",
    "PathLike",
    "read_volume",
    "read_case",
    "split_4d",
    "check_volume",
    "check_same_grid",
    "same_grid",
    "geometry",
    "write_image_atomic",
    "strip_image_extension",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Smallest accepted size of an in-plane axis (the network downsamples three times).
MIN_INPLANE_SIZE = 8

#: Image file extensions, longest first (``strip_image_extension`` removes the first that matches).
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_NIFTI = (".nii", ".nii.gz")
_READ_HINT = "give a NIfTI (.nii/.nii.gz), NRRD (.nrrd), MetaImage (.mha/.mhd) file or a folder with one DICOM series"

# Geometry comparison tolerances (relative to the voxel spacing for origins).
_SPACING_RTOL = 1e-4
_DIRECTION_ATOL = 1e-4
_ORIGIN_FRACTION = 1e-3


def strip_image_extension(name: str) -> str:
    """``"case01.nii.gz" -> "case01"``; names without a known image extension are returned unchanged."""
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def _has_ext(path: Path, exts: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(exts))


def geometry(image: sitk.Image) -> dict:
    """``{"size", "spacing", "origin", "direction"}`` of ``image`` as JSON-ready lists (direction row-major)."""
    return {
        "size": [int(v) for v in image.GetSize()],
        "spacing": [float(v) for v in image.GetSpacing()],
        "origin": [float(v) for v in image.GetOrigin()],
        "direction": [float(v) for v in image.GetDirection()],
    }


# --------------------------------------------------------------------------------------------- reading


def _check_gzip(path: Path) -> int:
    """Decompress ``path`` fully (streaming) and return the decompressed size; refuse truncated/corrupt gzip."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                total += len(chunk)
    except EOFError:
        raise UMLInputError(f"{path} is a truncated gzip file (it ends early): copy or export it again") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise UMLInputError(f"{path} is not a valid gzip file ({exc}): copy or export it again, or remove the .gz ending if it is not compressed") from None
    return total


def _check_nifti_complete(path: Path) -> None:
    """Refuse NIfTI files whose voxel data is shorter than the header says (SimpleITK reads them silently)."""
    import nibabel as nib

    size = _check_gzip(path) if _has_ext(path, (".gz",)) else path.stat().st_size
    try:
        proxy = nib.load(str(path)).dataobj
        expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    except Exception as exc:  # nibabel raises many types on bad headers
        raise UMLInputError(f"{path} is not a readable NIfTI file ({_first_line(exc)}): {_READ_HINT}") from None
    if size < expected:
        raise UMLInputError(
            f"{path} is truncated: its header announces {expected} bytes but it holds {size}: copy or export it again"
        )
    if np.issubdtype(np.dtype(proxy.dtype), np.floating):
        # ITK's NIfTI reader silently turns NaN voxels into 0: look at the stored values themselves.
        try:
            raw = np.asarray(proxy.get_unscaled())
        except Exception as exc:
            raise UMLInputError(f"{path} is not a readable NIfTI file ({_first_line(exc)}): {_READ_HINT}") from None
        if not np.all(np.isfinite(raw)):
            bad = int(np.count_nonzero(~np.isfinite(raw)))
            raise UMLInputError(f"{path} has {bad} NaN/Inf voxels: replace them (e.g. with 0) before running UML")


def _first_line(exc: BaseException) -> str:
    """The most telling single line of an (often multi-line ITK) exception message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "ERROR" in ln or "error" in ln:
            return ln.split("ERROR:")[-1].strip()[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _read_nifti_with_nibabel(path: Path) -> sitk.Image:
    """Read a NIfTI SimpleITK refuses (e.g. sheared or non-orthonormal affine) with nibabel.

    The voxel-to-world affine is converted from RAS to LPS; the spacing is the norm of each affine column and
    the direction is the nearest orthonormal matrix (polar decomposition) of the normalised columns.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise UMLInputError(f"{path} is not a readable NIfTI file ({_first_line(exc)}): {_READ_HINT}") from None
    if data.ndim < 3:
        raise UMLInputError(f"{path} is a {data.ndim}D image: UML takes 3D volumes; save it as a 3D volume (one slice is fine)")
    if data.ndim > 4:
        data = data.reshape(data.shape[:4]) if all(s == 1 for s in data.shape[4:]) else data
        if data.ndim > 4:
            raise UMLInputError(f"{path} has {data.ndim} dimensions (vector or 5D data): give 3D volumes or one 4D image")
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise UMLInputError(f"{path} has a degenerate voxel-to-world affine: fix the NIfTI header (sform/qform)")
    u, _, vt = np.linalg.svd(lps / spacing)
    direction = u @ vt

    def to_sitk(vol: np.ndarray) -> sitk.Image:
        im = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol, (2, 1, 0))))
        im.SetSpacing([float(v) for v in spacing])
        im.SetOrigin([float(v) for v in origin])
        im.SetDirection([float(v) for v in direction.ravel()])
        return im

    if data.ndim == 3:
        return to_sitk(data)
    return sitk.JoinSeries([to_sitk(data[..., t]) for t in range(data.shape[3])])


def _read_dicom_folder(folder: Path) -> sitk.Image:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
    if not series:
        raise UMLInputError(f"folder {folder} holds no DICOM series: give the folder of one DICOM series, or an image file")
    if len(series) > 1:
        raise UMLInputError(
            f"folder {folder} holds {len(series)} DICOM series: give the folder of a single series "
            "(e.g. sort the files into one folder per series)"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise UMLInputError(f"DICOM series in {folder} cannot be read ({_first_line(exc)}): check that all its files are complete") from None


def _read_file(path: Path) -> sitk.Image:
    if _has_ext(path, _NIFTI):
        _check_nifti_complete(path)
    elif _has_ext(path, (".gz",)):
        _check_gzip(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        message = str(exc)
        if _has_ext(path, _NIFTI) and "orthonormal" in message:
            return _read_nifti_with_nibabel(path)
        if "Unable to determine ImageIO reader" in message:
            raise UMLInputError(f"{path} is not an image file SimpleITK can read: {_READ_HINT}") from None
        raise UMLInputError(f"{path} cannot be read ({_first_line(exc)}): check the file is complete, or {_READ_HINT}") from None


def check_volume(image: sitk.Image, source: str = "image") -> sitk.Image:
    """Validate one 3D volume: scalar pixels, finite voxels, not constant, large enough.

    Args:
        image: A 3D ``sitk.Image``.
        source: How to name the image in messages (usually its path).

    Returns:
        ``image`` unchanged.

    Raises:
        UMLInputError: vector/RGB pixels, a dimension other than 3, NaN/Inf voxels, a constant image, or
            fewer than two axes with at least ``MIN_INPLANE_SIZE`` voxels (e.g. a 3x3x1 volume).
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UMLInputError(
            f"{source} has {image.GetNumberOfComponentsPerPixel()}-component (RGB/vector) pixels but UML volume models "
            "take grayscale volumes: convert it to a scalar volume (e.g. one channel or luminance) first"
        )
    if image.GetDimension() != 3:
        raise UMLInputError(f"{source} is a {image.GetDimension()}D image: UML takes 3D volumes; save it as a 3D volume (one slice is fine)")
    size = image.GetSize()
    if min(size) < 1 or sorted(size)[1] < MIN_INPLANE_SIZE:
        raise UMLInputError(
            f"{source} is too small ({'x'.join(map(str, size))} voxels): slices must be at least "
            f"{MIN_INPLANE_SIZE}x{MIN_INPLANE_SIZE} voxels; give the full volume"
        )
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise UMLInputError(f"{source} has {bad} NaN/Inf voxels: replace them (e.g. with 0) before running UML")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise UMLInputError(f"{source} is a constant image (every voxel is {lo}): check that the right file was exported")
    return image


def read_volume(path: PathLike) -> sitk.Image:
    """Read an image file or a DICOM series folder.

    Args:
        path: A NIfTI / NRRD / MetaImage file or a folder holding one DICOM series.

    Returns:
        The image as SimpleITK reads it (geometry in LPS): a 3D volume, or a 4D image (x, y, z, t) that
        :func:`read_case` splits into 3D volumes. Scalar 3D volumes are validated with :func:`check_volume`.

    Raises:
        UMLInputError: missing path, folder without DICOM, non-image file, truncated file or gzip, 2D image,
            RGB/vector pixels, NaN/Inf voxels, a constant or too small volume.
    """
    p = Path(path)
    if not p.exists():
        raise UMLInputError(f"input {p} does not exist: check the path (several phases of one case are joined with commas)")
    if p.is_dir():
        image = _read_dicom_folder(p)
    elif not p.is_file():
        raise UMLInputError(f"input {p} is not a regular file or folder: {_READ_HINT}")
    else:
        try:
            image = _read_file(p)
        except PermissionError:
            raise UMLInputError(f"input {p} cannot be opened (permission denied): make it readable") from None
    if image.GetDimension() == 4 and image.GetNumberOfComponentsPerPixel() == 1:
        for t, volume in enumerate(split_4d(image)):
            check_volume(volume, f"{p} (volume {t} of its 4D image)")
        return image
    return check_volume(image, str(p))


def split_4d(image: sitk.Image) -> list[sitk.Image]:
    """Split a 4D image (x, y, z, t) into its 3D volumes along t (geometry: the 3D part of the 4D geometry)."""
    if image.GetDimension() != 4:
        raise UMLInputError(f"split_4d takes a 4D image, got {image.GetDimension()}D: pass 3D volumes directly")
    sx, sy, sz, st = image.GetSize()
    return [sitk.Extract(image, [sx, sy, sz, 0], [0, 0, 0, t]) for t in range(st)]


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two 3D images share size, spacing, origin and direction (within float-storage tolerance)."""
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0):
        return False
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=_DIRECTION_ATOL):
        return False
    return bool(np.all(np.abs(np.subtract(a.GetOrigin(), b.GetOrigin())) <= _ORIGIN_FRACTION * sa))


def check_same_grid(volumes: Sequence[sitk.Image], names: Sequence[str] | None = None) -> None:
    """Raise :class:`UMLInputError` unless all ``volumes`` lie on the grid of the first one."""
    names = list(names) if names is not None else [f"volume {i}" for i in range(len(volumes))]
    for vol, name in zip(volumes[1:], names[1:]):
        if not same_grid(volumes[0], vol):
            g0, g1 = geometry(volumes[0]), geometry(vol)
            diff = [k for k in ("size", "spacing", "origin", "direction") if not np.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-4)] or ["origin"]
            raise UMLInputError(
                f"{name} is not on the same voxel grid as {names[0]} (different {', '.join(diff)}): "
                "resample all phases onto one grid first (e.g. Slicer's Resample Scalar/Vector/DWI Volume)"
            )


def read_case(paths: Sequence[PathLike]) -> list[sitk.Image]:
    """Read the volumes of one case: several 3D volumes on the same grid, or one 4D image split along t.

    Args:
        paths: One or more paths (files or DICOM folders), in channel order.

    Returns:
        The 3D volumes, in order.

    Raises:
        UMLInputError: any :func:`read_volume` problem, a 4D image mixed with other inputs, or volumes that do
            not share one voxel grid.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise UMLInputError("no input given: pass at least one volume (file or DICOM folder)")
    images = [read_volume(p) for p in paths]
    if any(im.GetDimension() == 4 for im in images):
        if len(images) > 1:
            raise UMLInputError(
                f"{len(images)} inputs given for one case and one of them is a 4D image: give one 4D image or several 3D volumes"
            )
        volumes = split_4d(images[0])
        names = [f"{paths[0]} (volume {t})" for t in range(len(volumes))]
    else:
        volumes = images
        names = [str(p) for p in paths]
    check_same_grid(volumes, names)
    return volumes


# --------------------------------------------------------------------------------------------- writing


def write_image_atomic(image: sitk.Image, path: PathLike) -> Path:
    """Write ``image`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    Readers never see a half-written file and a failed write leaves no file behind. The format follows
    the extension of ``path`` (``.nii.gz``, ``.nrrd``, ``.mha``, ...); the voxel data is compressed
    (gzip encoding for NRRD / MetaImage).

    Args:
        image: The image to write.
        path: Destination file; its folder must exist.

    Returns:
        ``Path(path)``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UMLInputError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    # A fresh name (not mkstemp, whose 0600 mode the writer would keep): the file gets the usual umask mode.
    tmp = str(path.parent / f".tmp-{secrets.token_hex(8)}-{path.name}")
    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
