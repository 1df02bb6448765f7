"""Shared test fixtures: tiny freshly initialised model bundles and small synthetic volumes.

Generic on purpose so every part's tests can reuse them:

- ``card_factory``: ``make_card(config, **overrides)`` builds a valid :class:`ModelCard` for a config.
- ``bundle_factory(**options) -> Path``: save a freshly initialised bundle (seeded, ``small`` preset by default).
- ``tiny_bundle_dir`` / ``tiny_bundle``: a session-wide 3-channel ``small`` bundle (path / loaded bundle).
  Do not modify them in place; make your own with ``bundle_factory`` when a test tampers with a bundle.
- ``picture_bundle_dir``: a session-wide ``small`` bundle for 2D RGB pictures (``input.kind`` picture, resized to
  64 x 64); read-only too.
- ``make_volume(**options) -> sitk.Image``: a deterministic 3D volume with a bright blob, oblique by default.
- ``oblique_direction``: the default rotated (det +1) direction matrix, row-major.
- ``box_segmentation(bundle)``: a copy of a loaded bundle whose network segments a fixed box (see there).
- ``dicom_writer(image, folder, series_uid=...) -> Path``: write a 3D image as an int16 MR DICOM series
  (SimpleITK + GDCM, one file per slice, IPP/IOP from the image's geometry).
- ``trained_run(name) -> (kind, dataset root, run folder, bundle)``: a two-epoch training run on a fixture dataset
  of ``Testing/training/layouts.py:KINDS`` (trained once per session), exported as a bundle.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from umlcore.bundle import load_bundle, save_bundle
from umlcore.card import InputSpec, ModelCard, Segment
from umlcore.config import UMLConfig
from umlcore.network import UMLNet


def rotation_matrix(degrees_z: float = 25.0, degrees_x: float = 15.0, degrees_y: float = 10.0) -> np.ndarray:
    """Rz @ Rx @ Ry (a proper rotation, det +1)."""
    z, x, y = np.deg2rad([degrees_z, degrees_x, degrees_y])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    return rz @ rx @ ry


OBLIQUE_DIRECTION: tuple[float, ...] = tuple(float(v) for v in rotation_matrix().ravel())


def make_card(config: UMLConfig, **overrides: Any) -> ModelCard:
    """A valid model card for ``config`` (channel names follow ``config.in_channels``)."""
    channels = ("pre", "early", "late") if config.in_channels == 3 else tuple(f"channel{i}" for i in range(config.in_channels))
    segments = tuple(
        Segment(label, f"Lesion {label}" if label > 1 else "Lesion", (1.0, 0.5 / label, 0.0),
                {"type": {"scheme": "SCT", "code": "52988006", "meaning": "Lesion"}})
        for label in range(1, config.num_seg_labels)
    )
    fields: dict[str, Any] = dict(
        id="test-model", version="0.0.1", name="Test model", task="test",
        classes=tuple(f"class{i}" for i in range(config.num_classes)) if config.num_classes != 2 else ("no pCR", "pCR"),
        segments=segments, input=InputSpec(channels=channels), architecture=config,
    )
    fields.update(overrides)
    return ModelCard(**fields)


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """``make(preset="small", seed=0, config_overrides=None, **card_overrides) -> Path`` of a new bundle folder."""
    counter = itertools.count()

    def make(preset: str = "small", seed: int = 0, config_overrides: dict | None = None, **card_overrides: Any) -> Path:
        config = UMLConfig.preset(preset, **(config_overrides or {}))
        torch.manual_seed(seed)
        net = UMLNet(config)
        card = make_card(config, **card_overrides)
        return save_bundle(net, card, tmp_path_factory.mktemp("bundles") / f"bundle{next(counter)}")

    return make


@pytest.fixture(scope="session")
def tiny_bundle_dir(bundle_factory) -> Path:
    """A 3-channel ``small`` bundle folder shared by the session (treat as read-only)."""
    return bundle_factory()


@pytest.fixture(scope="session")
def picture_bundle_dir(bundle_factory) -> Path:
    """A ``small`` bundle for 2D RGB pictures shared by the session (treat as read-only): ``input.kind`` picture,
    channels red, green, blue (one grey picture replicated), every picture resized to 64 x 64 pixels."""
    spec = InputSpec(channels=("red", "green", "blue"), kind="picture", target_size=(64, 64))
    return bundle_factory(id="test-picture-model", input=spec)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_dir):
    """The loaded :class:`ModelBundle` of ``tiny_bundle_dir`` (treat as read-only)."""
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="session")
def oblique_direction() -> tuple[float, ...]:
    return OBLIQUE_DIRECTION


def _volume(
    size: tuple[int, int, int] = (32, 32, 6),
    spacing: tuple[float, float, float] = (0.7, 0.9, 2.5),
    origin: tuple[float, float, float] = (-12.5, 30.25, 7.0),
    direction: tuple[float, ...] = OBLIQUE_DIRECTION,
    dtype: type = np.float32,
    seed: int = 0,
    scale: float = 100.0,
) -> sitk.Image:
    """Smooth noise plus a bright ellipsoidal blob, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    blob = np.exp(-((x - 0.2) ** 2 / 0.1 + (y + 0.1) ** 2 / 0.05 + z ** 2 / 0.5))
    array = scale * (0.3 + blob + 0.1 * rng.standard_normal((nz, ny, nx)))
    image = sitk.GetImageFromArray(array.astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


@pytest.fixture(scope="session")
def make_volume():
    """``make(size=(32, 32, 6), spacing=(0.7, 0.9, 2.5), origin=..., direction=oblique, dtype=np.float32, seed=0)``."""
    return _volume


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1.424242") -> Path:
    """Write a 3D image as a DICOM series (int16, one file per slice) that SimpleITK reads back on the same grid."""

    def ds(value: float) -> str:  # DICOM decimal strings hold at most 16 characters
        return f"{value:.6f}".rstrip("0").rstrip(".")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(sitk.Round(image), sitk.sitkInt16)
    d = img.GetDirection()
    iop = "\\".join(ds(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        piece = img[:, :, k]
        tags = {
            "0008|0060": "MR", "0008|0008": "DERIVED\\SECONDARY", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0020|000d": series_uid + ".0", "0020|000e": series_uid, "0020|0037": iop,
            "0020|0032": "\\".join(ds(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1), "0018|0050": ds(img.GetSpacing()[2]), "0008|0018": f"{series_uid}.{k + 1}",
            "0010|0010": "TEST^UML", "0010|0020": "UML0001",
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    return folder


@pytest.fixture(scope="session")
def dicom_writer():
    """``write(image, folder, series_uid=...) -> folder``: see :func:`write_dicom_series`."""
    return write_dicom_series


@pytest.fixture(scope="session")
def card_factory():
    """``make_card(config, **overrides) -> ModelCard`` as a fixture."""
    return make_card


class _Boxed(torch.nn.Module):
    """A network whose segmentation is fixed: label 1 in rows 10-19, columns 20-31 of every slice, whatever the batch;
    the rest is its own."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, x):
        out = self.inner(x)
        seg = torch.ones_like(out.seg_alpha)
        seg[:, 0] = 50.0
        seg[:, 1, 10:20, 20:32] = 100.0
        return out._replace(seg_alpha=seg)


@pytest.fixture(scope="session")
def box_segmentation():
    """``box(bundle)``: a loaded bundle with its network wrapped so that it segments a fixed 10 x 12 box
    (:class:`_Boxed`; ``.model.inner`` is the network itself)."""
    import dataclasses

    return lambda bundle: dataclasses.replace(bundle, model=_Boxed(bundle.model))



@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """``trained_run(name)``: a short run of ``python -m training.train`` on the fixture dataset ``name`` (a key of
    ``layouts.KINDS``) and its exported bundle, made once per session: ``(kind, root, run, bundle)``."""
    from training import export, train

    from .training.layouts import KINDS, QUICK

    made: dict = {}

    def get(name: str):
        if name not in made:
            writer, flags = KINDS[name]
            tmp = tmp_path_factory.mktemp(name)
            root, kind, run = writer(tmp / "data"), name.split("-")[0], tmp / "run"
            train.main(["--data", f"{kind}:{root}", "--out", str(run), *QUICK, *flags])
            assert export.main(["--run", str(run), "--weights", "last.safetensors", "--out", str(tmp / "bundle")]) == 0
            made[name] = (kind, root, run, tmp / "bundle")
        return made[name]

    return get
