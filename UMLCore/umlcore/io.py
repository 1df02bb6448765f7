"""Image I/O of the predictor: read volumes and cases, write images atomically.

Supported inputs: NIfTI (``.nii`` / ``.nii.gz``; nibabel reads NIfTI files whose direction cosines SimpleITK
refuses), NRRD (``.nrrd`` / ``.nhdr``), MetaImage (``.mha`` / ``.mhd``), folders holding one DICOM series
(SimpleITK's ``ImageSeriesReader``) and 2D pictures (PNG, JPEG, BMP, TIFF), which become single-slice volumes, one
per colour (:mod:`umlcore.pictures`). SimpleITK keeps the geometry in LPS, as 3D Slicer and DICOM do.

Every problem a user can fix raises :class:`~umlcore.errors.UMLInputError` with one line naming the problem
and the fix. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import secrets
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Literal, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import UMLInputError
from .pictures import (PICTURE_EXTENSIONS, is_picture_file, is_picture_image, picture_size_with_pillow,
                       read_picture_with_pillow, split_picture)

__all__ = [
    "MIN_INPLANE_SIZE",
    "IMAGE_EXTENSIONS",
    "PathLike",
    "read_volume",
    "read_geometry",
    "read_case",
    "quiet_stderr",
    "split_4d",
    "check_volume",
    "check_colours",
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
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd") + PICTURE_EXTENSIONS

_NIFTI = (".nii", ".nii.gz")
_READ_HINT = ("give a NIfTI (.nii/.nii.gz), NRRD (.nrrd), MetaImage (.mha/.mhd) file, a folder with one DICOM series, "
              "or a picture (.png/.jpg/.bmp/.tif)")

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


#: Largest deviation of a grid's direction matrix from orthonormal (``|D^T D - I|``) that is read: beyond it the
#: voxel axes are sheared or skewed, and outputs on the grid ITK keeps would not lie where the input's voxels do.
ORTHONORMAL_TOLERANCE = 1e-3
#: Relative spread of the distances between consecutive slices of a DICOM series that is still one spacing.
SLICE_SPACING_RTOL = 0.01


@contextlib.contextmanager
def quiet_stderr() -> Iterator[list[str]]:
    """Route what C++ libraries (ITK, MetaIO, GDCM) print to the process's stderr into a list instead (one string,
    appended on exit), so a command's error stays one line; Python's own ``sys.stderr`` is not touched."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _check_direction(direction: Sequence[float], source: str) -> None:
    """Refuse a grid whose voxel axes are not perpendicular unit vectors (sheared, skewed or degenerate)."""
    d = np.asarray(direction, dtype=np.float64)
    n = int(round(np.sqrt(d.size)))
    d = d.reshape(n, n)
    if not np.all(np.isfinite(d)) or np.abs(d.T @ d - np.eye(n)).max() > ORTHONORMAL_TOLERANCE:
        raise UMLInputError(
            f"{source} has a sheared or non-orthogonal voxel grid (its axes are not perpendicular): UML's outputs "
            "could not lie on it; resample it onto an orthogonal grid first (e.g. Slicer's Resample Scalar Volume)")


def _check_spacing(spacing: Sequence[float], source: str) -> None:
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise UMLInputError(f"{source} has a voxel spacing of {' x '.join(f'{v:g}' for v in spacing)} mm (zero, "
                            "negative or not a number): fix the spacing (pixdim) in its header")


def _check_pixel_type(pixel_id: int, source: str) -> None:
    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise UMLInputError(f"{source} has complex-valued voxels: UML reads magnitude images; save the magnitude "
                            "(e.g. numpy.abs) as a real-valued volume first")


def _check_nifti(path: Path) -> None:
    """What SimpleITK reads silently wrong in a NIfTI: truncated data, NaN voxels (read as 0), a zero pixdim (read as
    1 mm), a sheared affine (orthonormalised), complex voxels (the imaginary part dropped)."""
    import nibabel as nib

    size = _check_gzip(path) if _has_ext(path, (".gz",)) else path.stat().st_size
    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
            proxy = img.dataobj
            expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
            zooms = _stored_pixdim(path)  # as stored: nibabel and ITK silently turn a zero into 1
            affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types on bad headers
        raise UMLInputError(f"{path} is not a readable NIfTI file ({_first_line(exc)}): {_READ_HINT}") from None
    if size < expected:
        raise UMLInputError(
            f"{path} is truncated: its header announces {expected} bytes but it holds {size}: copy or export it again")
    if np.issubdtype(np.dtype(proxy.dtype), np.complexfloating):
        _check_pixel_type(sitk.sitkComplexFloat32, str(path))
    if len(zooms) >= 3 and any(v <= 0 for v in zooms):
        raise UMLInputError(f"{path} has a voxel size (pixdim) of {' x '.join(f'{v:g}' for v in zooms)} mm: a zero or "
                            "negative size is not a real spacing; fix pixdim in its header")
    columns = affine[:3, :3] / np.maximum(np.linalg.norm(affine[:3, :3], axis=0), 1e-12)
    _check_direction(columns.ravel(), str(path))
    if np.issubdtype(np.dtype(proxy.dtype), np.floating):
        # ITK's NIfTI reader silently turns NaN voxels into 0: look at the stored values themselves.
        try:
            raw = np.asarray(proxy.get_unscaled())
        except Exception as exc:
            raise UMLInputError(f"{path} is not a readable NIfTI file ({_first_line(exc)}): {_READ_HINT}") from None
        if not np.all(np.isfinite(raw)):
            bad = int(np.count_nonzero(~np.isfinite(raw)))
            raise UMLInputError(f"{path} has {bad} NaN/Inf voxels: replace them (e.g. with 0) before running UML")


def _stored_pixdim(path: Path) -> list[float]:
    """``pixdim[1:4]`` of a NIfTI-1 or NIfTI-2 header as the file stores them."""
    import struct

    opener = gzip.open if _has_ext(path, (".gz",)) else open
    with opener(path, "rb") as f:
        head = f.read(540)
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348:
            return list(struct.unpack(order + "3f", head[80:92]))
        if size == 540:
            return list(struct.unpack(order + "3d", head[112:136]))
    return [1.0, 1.0, 1.0]  # not a header this check knows: nibabel has read it, ITK will judge it


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs header problems (e.g. a zero pixdim it replaces by 1) to stderr: this module says them itself."""
    import logging

    logger = logging.getLogger("nibabel")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_nrrd_header(path: Path) -> None:
    """A detached NRRD header (``.nhdr``) names its data file: refuse, naming it, when it is missing."""
    try:
        head = path.read_bytes()[:65536].decode("latin-1").splitlines()
    except OSError:
        return
    for line in head:
        key, _, value = line.partition(":")
        if key.strip().lower() in ("data file", "datafile") and value.strip() and not value.strip().startswith("LIST"):
            name = value.strip().split()[0]
            if "%" not in name and not (path.parent / name).is_file():
                raise UMLInputError(f"{path} names its voxel data file {path.parent / name}, which does not exist: "
                                    "copy the data file beside the header")


def _first_line(exc: BaseException) -> str:
    """The most telling single line of an (often multi-line ITK) exception message, without object addresses."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if "ERROR" in ln or "error" in ln), lines[-1] if lines else type(exc).__name__)
    return re.sub(r"\S*\(0x[0-9a-f]+\)\S*:?\s*", "", line.split("ERROR:")[-1]).strip()[:200]


def _read_nifti_with_nibabel(path: Path) -> sitk.Image:
    """Read a NIfTI SimpleITK refuses for a direction a little off orthonormal (within
    :data:`ORTHONORMAL_TOLERANCE`; :func:`_check_nifti` refused a larger shear) with nibabel.

    The voxel-to-world affine is converted from RAS to LPS; the spacing is the norm of each affine column and
    the direction is the nearest orthonormal matrix (polar decomposition) of the normalised columns.
    """
    import nibabel as nib

    try:
        with _quiet_nibabel():
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


def _dicom_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in GDCM's slice order."""
    with quiet_stderr():
        try:
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError:
            series = ()
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]) if len(series) == 1 else ()
    if not series:
        raise UMLInputError(f"folder {folder} holds no DICOM series: give the folder of one DICOM series, or an image file")
    if len(series) > 1:
        raise UMLInputError(f"folder {folder} holds {len(series)} DICOM series: give the folder of a single series "
                            "(e.g. sort the files into one folder per series)")
    left_out = sorted(p for p in folder.iterdir() if p.is_file() and str(p) not in set(files) and _is_dicom(p))
    if left_out:  # GDCM leaves a damaged slice out of the series without a word
        raise UMLInputError(f"{left_out[0]} in the DICOM series {folder} cannot be read (truncated or damaged): copy or "
                            "export the series again")
    return list(files)


def _is_dicom(path: Path) -> bool:
    """Whether ``path`` starts like a DICOM file (the "DICM" mark after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _check_dicom_slices(folder: Path, files: list[str]) -> None:
    """Every file of a series readable, and its slices evenly spaced along their normal: a missing, duplicated or
    truncated slice would otherwise be read with the wrong spacing, without a word."""
    positions, reader = [], sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        try:
            with quiet_stderr():
                reader.ReadImageInformation()
        except RuntimeError:
            raise UMLInputError(f"{name} in the DICOM series {folder} cannot be read (truncated or damaged): copy or "
                                "export the series again") from None
        positions.append(reader.GetOrigin())
        direction = reader.GetDirection()
    if len(files) < 2:
        return
    normal = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    along = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(along)
    if np.any(steps <= 1e-6 * max(1.0, abs(along).max())):
        raise UMLInputError(f"the DICOM series in {folder} has two slices at the same position (a duplicated file): "
                            "remove the duplicate, or export the series again")
    if np.abs(steps - np.median(steps)).max() > SLICE_SPACING_RTOL * np.median(steps):
        raise UMLInputError(
            f"the DICOM series in {folder} has uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm): a "
            "slice is missing, or the series mixes acquisitions; export the complete series")


def _read_dicom_folder(folder: Path) -> sitk.Image:
    files = _dicom_files(folder)
    _check_dicom_slices(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with quiet_stderr():
            return reader.Execute()
    except RuntimeError as exc:
        raise UMLInputError(f"DICOM series in {folder} cannot be read ({_first_line(exc)}): check that all its files are complete") from None


def _read_file(path: Path) -> sitk.Image:
    if _has_ext(path, _NIFTI):
        _check_nifti(path)
    elif _has_ext(path, (".gz",)):
        _check_gzip(path)
    elif _has_ext(path, (".nhdr",)):
        _check_nrrd_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_stderr():
            reader.ReadImageInformation()
        _check_spacing(reader.GetSpacing(), str(path))
        _check_pixel_type(reader.GetPixelID(), str(path))
        with quiet_stderr():
            return reader.Execute()
    except RuntimeError as exc:
        if _has_ext(path, _NIFTI) and "orthonormal" in str(exc):
            return _read_nifti_with_nibabel(path)
        if is_picture_file(path) and "Unknown PixelType" in str(exc):  # grey + alpha
            return read_picture_with_pillow(path)
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: RuntimeError) -> UMLInputError:
    """The one-line refusal of a file ITK cannot read."""
    if "Unable to determine ImageIO reader" in str(exc):
        return UMLInputError(f"{path} is not an image file SimpleITK can read: {_READ_HINT}")
    return UMLInputError(f"{path} cannot be read ({_first_line(exc)}): check the file is complete, or {_READ_HINT}")


def check_volume(image: sitk.Image, source: str = "image", flat: Literal["refuse", "allow"] = "refuse") -> sitk.Image:
    """Validate one 3D volume: scalar pixels, finite voxels, not constant, large enough.

    Args:
        image: A 3D ``sitk.Image``.
        source: How to name the image in messages (usually its path).
        flat: ``allow`` lets a constant or blank image pass (one colour of a picture: :func:`check_colours` asks
            for one colour that is not).

    Returns:
        ``image`` unchanged.

    Raises:
        UMLInputError: vector/RGB or complex pixels, a dimension other than 3, fewer than two axes with at least
            ``MIN_INPLANE_SIZE`` voxels (e.g. a 3x3x1 volume), a zero or negative spacing, a sheared grid, NaN/Inf
            voxels, a constant or blank image (its 0.5 and 99.5 percentiles equal: nothing to normalise).
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UMLInputError(
            f"{source} has {image.GetNumberOfComponentsPerPixel()}-component (RGB/vector) pixels but a volume holds one "
            "value per voxel: split a picture into its colours first (umlcore.io.read_case does), or convert it to a "
            "scalar volume")
    if image.GetDimension() != 3:
        raise UMLInputError(f"{source} is a {image.GetDimension()}D image: UML takes 3D volumes (a picture is one of "
                            "one slice, as umlcore.io.read_case reads it); save it as a 3D volume (one slice is fine)")
    size = image.GetSize()
    if min(size) < 1 or sorted(size)[1] < MIN_INPLANE_SIZE:
        raise UMLInputError(
            f"{source} is too small ({'x'.join(map(str, size))} voxels): slices must be at least "
            f"{MIN_INPLANE_SIZE}x{MIN_INPLANE_SIZE} voxels; give the full volume"
        )
    _check_pixel_type(image.GetPixelID(), source)
    _check_spacing(image.GetSpacing(), source)
    _check_direction(image.GetDirection(), source)
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise UMLInputError(f"{source} has {bad} NaN/Inf voxels: replace them (e.g. with 0) before running UML")
    if flat == "allow":
        return image
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise UMLInputError(f"{source} is a constant image (every voxel is {lo}): check that the right file was exported")
    p_lo, p_hi = np.percentile(array, (0.5, 99.5))
    if p_lo == p_hi:
        rest = int(np.count_nonzero(array != p_lo))
        raise UMLInputError(f"{source} is blank: all but {rest} of its {array.size} voxels are {p_lo:g}, so it holds no "
                            "image to read; check that the right file was exported")
    return image


def check_colours(volumes: Sequence[sitk.Image], names: Sequence[str]) -> None:
    """Validate a picture's colours: each with :func:`check_volume`, one of them at least not constant or blank (a
    colour that is flat, e.g. no blue at all, is read as zeros)."""
    for volume, name in zip(volumes, names):
        check_volume(volume, name, flat="allow")
    problems = []
    for volume, name in zip(volumes, names):
        try:
            check_volume(volume, name)
            return
        except UMLInputError as exc:
            problems.append(str(exc))
    raise UMLInputError(problems[0] if len(problems) == 1 else f"every colour of the picture is flat: {problems[0]}")


def read_geometry(path: PathLike) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """``(size, spacing, direction)`` of the 3D grid of an image file or DICOM folder, read from the header(s)
    only (so a run can know what it needs before reading the voxels); a 4D image's first three axes.

    Raises:
        UMLInputError: what :func:`read_volume` would refuse from the header alone.
    """
    p = _check_input_path(Path(path))
    if p.is_dir():
        files = _dicom_files(p)
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        with quiet_stderr():
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                raise UMLInputError(f"{files[0]} in the DICOM series {p} cannot be read (truncated or damaged): copy or "
                                    "export the series again") from None
        size, spacing = reader.GetSize(), reader.GetSpacing()
        return (size[0], size[1], len(files)), tuple(spacing[:3]), tuple(reader.GetDirection())
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with quiet_stderr():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        if _has_ext(p, _NIFTI) and "orthonormal" in str(exc):  # read_volume decides (nibabel or a refusal)
            return (1, 1, 1), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
        if is_picture_file(p) and "Unknown PixelType" in str(exc):  # grey + alpha: read with Pillow
            return picture_size_with_pillow(p) + (1,), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
        raise _unreadable(p, exc) from None
    except PermissionError:
        raise UMLInputError(f"input {p} cannot be opened (permission denied): make it readable") from None
    size, spacing, direction = reader.GetSize(), reader.GetSpacing(), reader.GetDirection()
    n = len(size)
    if n < 3:
        return tuple(size) + (1,) * (3 - n), tuple(spacing) + (1.0,) * (3 - n), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    d = np.asarray(direction, dtype=np.float64).reshape(n, n)[:3, :3]
    return tuple(size[:3]), tuple(spacing[:3]), tuple(float(v) for v in d.ravel())


def read_volume(path: PathLike) -> sitk.Image:
    """Read an image file or a DICOM series folder.

    Args:
        path: A NIfTI / NRRD / MetaImage file, a folder holding one DICOM series, or a picture (PNG, JPEG, BMP, TIFF).

    Returns:
        The image as SimpleITK reads it (geometry in LPS): a 3D volume; a 4D image (x, y, z, t) that
        :func:`read_case` splits into 3D volumes; or a picture, i.e. a 2D image or a 3D vector image with one slice,
        that :func:`read_case` splits into one single-slice volume per colour (:mod:`umlcore.pictures`). Every
        volume it holds is validated with :func:`check_volume`.

    Raises:
        UMLInputError: missing path, folder without DICOM, non-image file, truncated file or gzip, RGB/vector
            pixels in several slices, NaN/Inf voxels, a constant or too small volume.
    """
    image = _read_path(path)
    _volumes(image, str(path))
    return image


def _read_path(path: PathLike) -> sitk.Image:
    """The image of a file or DICOM folder, as read (checked only as far as reading it needs)."""
    p = _check_input_path(Path(path))
    if p.is_dir():
        return _read_dicom_folder(p)
    try:
        return _read_file(p)
    except PermissionError:
        raise UMLInputError(f"input {p} cannot be opened (permission denied): make it readable") from None


def _volumes(image: sitk.Image, source: str) -> tuple[list[sitk.Image], list[str]]:
    """The 3D scalar volumes an image as read holds (a 4D image's along t, a picture's colours), each checked with
    :func:`check_volume`, and their names."""
    if image.GetDimension() == 4 and image.GetNumberOfComponentsPerPixel() == 1:
        volumes = split_4d(image)
        names = [f"{source} (volume {t} of its 4D image)" for t in range(len(volumes))]
    elif is_picture_image(image):
        volumes, names = split_picture(image, source)
        check_colours(volumes, names)
        return volumes, names
    else:
        volumes, names = [image], [source]
    for volume, name in zip(volumes, names):
        check_volume(volume, name)
    return volumes, names


def _check_input_path(p: Path) -> Path:
    """``p`` if it is an existing regular file or folder; a missing path, a dangling or looping link refused."""
    if not p.exists():
        if p.is_symlink():
            try:
                p.resolve(strict=True)
            except RuntimeError:
                raise UMLInputError(f"input {p} is a symbolic link that loops back on itself: point it at the real "
                                    "file") from None
            except OSError:
                pass
            raise UMLInputError(f"input {p} is a symbolic link to {os.readlink(p)}, which does not exist: point it at "
                                "the real file")
        raise UMLInputError(f"input {p} does not exist: check the path (several phases of one case are joined with commas)")
    if not (p.is_dir() or p.is_file()):
        raise UMLInputError(f"input {p} is not a regular file or folder: {_READ_HINT}")
    return p


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
    """Read the volumes of one case: several 3D volumes on the same grid, one 4D image split along t, or one
    picture split into its colours (RGB -> red, green, blue; grey -> one; alpha dropped), each colour a
    single-slice 3D volume (:mod:`umlcore.pictures`).

    Args:
        paths: One or more paths (files or DICOM folders), in channel order.

    Returns:
        The 3D volumes, in order.

    Raises:
        UMLInputError: any :func:`read_volume` problem, a 4D image or a colour picture mixed with other inputs, or
            volumes that do not share one voxel grid.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise UMLInputError("no input given: pass at least one volume (file or DICOM folder)")
    images = [_read_path(p) for p in paths]
    read = [_volumes(image, str(p)) for image, p in zip(images, paths)]
    if len(paths) > 1 and any(im.GetDimension() == 4 for im in images):
        raise UMLInputError(
            f"{len(images)} inputs given for one case and one of them is a 4D image: give one 4D image or several 3D volumes")
    if len(paths) > 1 and any(len(volumes) > 1 for volumes, _ in read):
        raise UMLInputError(f"{len(images)} inputs given for one case and one of them is a colour picture: give one "
                            "colour picture, or several grey pictures or 3D volumes")
    volumes = [v for vs, _ in read for v in vs]
    check_same_grid(volumes, [n for _, ns in read for n in ns])
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
        try:
            with quiet_stderr():
                sitk.WriteImage(image, tmp, useCompression=True)
        except RuntimeError as exc:  # ITK's writers report a full disk as "could not write"
            raise UMLInputError(f"cannot write {path} ({_first_line(exc)}): check that its device has free space and "
                                "the folder is writable, or choose another -o") from None
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
