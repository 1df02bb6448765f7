"""2D pictures (fundus photos, dermoscopy): read as single-slice volumes, one per colour, and written as PNG.

A picture (PNG, JPEG, BMP, TIFF, read with SimpleITK) becomes one single-slice 3D scalar volume per colour
component: size ``(W, H, 1)``, spacing ``(sx, sy, 1.0)`` (the file's pixel size, or 1.0), origin 0, identity
direction; RGB gives the red, green and blue volumes in that order, a grey picture one. An alpha channel is dropped
(RGBA -> RGB, grey + alpha -> grey). A 3D vector image with one slice (a colour picture 3D Slicer saved as a vector
NRRD) is split the same way, on its own grid, and a 2D scalar image in a volume format becomes one single-slice
volume. Intensities keep their stored type and values (a uint8 picture stays 0..255): the model card's
normalisation applies, as to volumes.

Outputs of a picture are written as PNG on its pixel grid (:func:`as_png`): labels as uint8, the uncertainty in
[0, 1] as uint16 ``round(u * UNCERTAINTY_PNG_SCALE)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import UMLInputError

__all__ = ["PICTURE_EXTENSIONS", "UNCERTAINTY_PNG_SCALE", "is_picture_file", "is_picture_image", "split_picture",
           "read_picture_with_pillow", "picture_size_with_pillow", "as_png", "check_single_slice"]

#: File extensions read as pictures.
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: ``uncertainty.png`` holds ``round(u * UNCERTAINTY_PNG_SCALE)`` as uint16 (u in [0, 1]).
UNCERTAINTY_PNG_SCALE = 65535

_COLOURS = {1: ("grey",), 3: ("red", "green", "blue")}


def is_picture_file(path: Path | str) -> bool:
    """Whether ``path`` names a picture file (by its extension, any case)."""
    return str(path).lower().endswith(PICTURE_EXTENSIONS)


def is_picture_image(image: sitk.Image) -> bool:
    """Whether ``image`` as read is a picture to split: 2D, or vector (several components per pixel)."""
    return image.GetDimension() == 2 or image.GetNumberOfComponentsPerPixel() > 1


def _kept_components(count: int) -> int:
    """Components kept of ``count``: grey + alpha -> 1, RGBA -> 3 (the alpha channel dropped), else all."""
    return {2: 1, 4: 3}.get(count, count)


def split_picture(image: sitk.Image, source: str) -> tuple[list[sitk.Image], list[str]]:
    """The single-slice 3D scalar volumes of a picture-like image and their names (``"fundus.png (red)"``).

    Args:
        image: A 2D image (scalar or vector) or a 3D vector image with one slice, as read.
        source: How to name it in messages (its path).

    Raises:
        UMLInputError: a vector image with several slices, or more than 3 dimensions.
    """
    n = image.GetNumberOfComponentsPerPixel()
    size = image.GetSize()
    if image.GetDimension() > 3 or (image.GetDimension() == 3 and size[2] != 1):
        raise UMLInputError(
            f"{source} has {n}-component (RGB/vector) pixels in a {'x'.join(map(str, size))} image: UML reads colour "
            "as a 2D picture (one slice); give a PNG/JPEG picture, or convert it to scalar volumes (one per channel)")
    kept = _kept_components(n)
    names = _COLOURS.get(kept, tuple(f"component {i}" for i in range(kept)))
    parts = [image] if n == 1 else [sitk.VectorIndexSelectionCast(image, i) for i in range(kept)]
    if image.GetDimension() == 2:
        parts = [sitk.JoinSeries(p) for p in parts]  # (W, H) -> (W, H, 1), the 2D geometry kept in 3D
    return parts, [f"{source} ({name})" for name in names]


def _pillow(path: Path, what: str):
    """Pillow's ``Image`` module, or a refusal naming ``what`` SimpleITK cannot read without it."""
    try:
        from PIL import Image
    except ImportError:
        raise UMLInputError(f"{path} is {what}, which SimpleITK cannot read: save it as a grey or RGB picture "
                            "without the alpha channel, or install Pillow (pip install pillow)") from None
    return Image


def read_picture_with_pillow(path: Path) -> sitk.Image:
    """A picture SimpleITK refuses (grey + alpha, which ITK reads as an unknown pixel type) read with Pillow as a
    2D image: grey + alpha -> grey, RGBA -> RGB, pixel size 1.0."""
    image_module = _pillow(path, "a picture with an alpha channel")
    try:
        with image_module.open(path) as im:
            im.load()
            if im.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
                im = im.convert("L" if im.mode in ("LA", "La") else "RGB")
            array = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise UMLInputError(f"{path} cannot be read as a picture ({exc}): save it again as a PNG or JPEG") from None
    return sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 3)


def picture_size_with_pillow(path: Path) -> tuple[int, int]:
    """``(W, H)`` of a picture from its header, read with Pillow (for the pictures SimpleITK refuses)."""
    image_module = _pillow(path, "a picture with an alpha channel")
    try:
        with image_module.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise UMLInputError(f"{path} cannot be read as a picture ({exc}): save it again as a PNG or JPEG") from None


def as_png(image: sitk.Image, what: str, scale: float = 1.0, pixel: int = sitk.sitkUInt8) -> sitk.Image:
    """A single-slice output image as the 2D image a PNG holds: ``round(value * scale)`` cast to ``pixel``.

    Args:
        image: A 3D image with one slice along its third index axis (or a 2D image).
        what: How to name it in the refusal.
        scale: Factor applied before rounding (:data:`UNCERTAINTY_PNG_SCALE` for the uncertainty).
        pixel: ``sitk.sitkUInt8`` or ``sitk.sitkUInt16``.

    Raises:
        UMLInputError: ``image`` has several slices.
    """
    if image.GetDimension() == 3:
        check_single_slice(image.GetSize(), what)
        image = image[:, :, 0]
    if scale != 1.0:
        image = sitk.Round(sitk.Cast(image, sitk.sitkFloat64) * scale)
    return sitk.Cast(image, pixel)


def check_single_slice(size: Sequence[int], what: str) -> None:
    """Refuse PNG outputs for a grid with several slices (a PNG holds one 2D picture)."""
    if len(size) == 3 and size[2] != 1:
        raise UMLInputError(f"{what} has {size[2]} slices ({'x'.join(map(str, size))} voxels) but a PNG holds one 2D "
                            "picture: choose --format nii.gz or nrrd (or auto) for volumes")
