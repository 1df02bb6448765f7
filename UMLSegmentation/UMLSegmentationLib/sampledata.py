"""The sample case of the module: a synthetic three-phase breast DCE-MRI, registered with Sample Data.

Public breast DCE-MRI may not be redistributed inside the extension and nothing may be downloaded at test
time, so the sample is a synthetic case from ``umlcore.synthetic.generate_case`` (a spiculated lesion with
washout kinetics: "suspicious" by the synthetic label rule), shipped in ``Resources/SampleData`` as three
int16 NRRD files. Sample Data fetches them through ``file://`` URIs and checks each against the SHA-256
below, like any other sample. :func:`writeSyntheticSample` regenerates the files (it needs umlcore).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

__all__ = [
    "SAMPLE_SEED",
    "SAMPLE_SHAPE",
    "SAMPLE_CATEGORY",
    "SampleFile",
    "SampleCase",
    "SAMPLE_CASES",
    "fileSha256",
    "sampleDataSources",
    "samplePhases",
    "syntheticSampleCase",
    "writeSyntheticSample",
]

SAMPLE_SEED = 29
SAMPLE_SHAPE = (32, 128, 128)
SAMPLE_CATEGORY = "UML"


@dataclass(frozen=True)
class SampleFile:
    """One file of a sample case: name in ``Resources/SampleData``, node name, SHA-256 of its bytes."""

    fileName: str
    nodeName: str
    sha256: str


@dataclass(frozen=True)
class SampleCase:
    """A sample case: its name in Sample Data, its files (in channel order) and its thumbnail."""

    name: str
    files: tuple[SampleFile, ...]
    thumbnail: str
    description: str


SAMPLE_CASES = (
    SampleCase(
        name="UMLSyntheticBreastDCE",
        files=(
            SampleFile("UMLSyntheticBreastDCE-pre.nrrd", "UMLSyntheticBreastDCE-pre", "9ba8a1eb8524e5673699197a50ac9c361ca1b8bec9080e2bc2745d9f86a30ab9"),
            SampleFile("UMLSyntheticBreastDCE-early.nrrd", "UMLSyntheticBreastDCE-early", "2da5caa5dac8ee129cba93bc56eec8321b3ed100069e011b16410bcfa5ac20a2"),
            SampleFile("UMLSyntheticBreastDCE-late.nrrd", "UMLSyntheticBreastDCE-late", "c43ed6b53605fcc46e95ed23cc13414b9af5ff3662157999e3a64c1fb3c265f7"),
        ),
        thumbnail="UMLSyntheticBreastDCE.png",
        description="Synthetic breast DCE-MRI (pre, early, late), one spiculated washout lesion (umlcore.synthetic seed 29)",
    ),
)


def fileSha256(path: Union[str, Path]) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sampleDataSources(moduleDirectory: Union[str, Path]) -> list[dict]:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource``, one dict per case."""
    data = Path(moduleDirectory) / "Resources" / "SampleData"
    sources = []
    for case in SAMPLE_CASES:
        sources.append({
            "category": SAMPLE_CATEGORY,
            "sampleName": case.name,
            "uris": [(data / f.fileName).resolve().as_uri() for f in case.files],
            "fileNames": [f.fileName for f in case.files],
            "nodeNames": [f.nodeName for f in case.files],
            "checksums": [f"SHA256:{f.sha256}" for f in case.files],
            "thumbnailFileName": str(data / case.thumbnail),
            "loadFileType": "VolumeFile",
        })
    return sources


def samplePhases(inputNode, scene) -> list:
    """The other phases of a sample case whose first phase is ``inputNode`` (in channel order), or ``[]``.

    Sample Data loads the three phases as nodes named after :class:`SampleFile` (with the same ``_N`` suffix when
    the case was loaded again); the module selects them as the further phases, so the sample runs with all three.
    """
    if inputNode is None or scene is None:
        return []
    from .outputs import nodesByName  # MRML (vtk, slicer) only when the sample case is looked for
    name = inputNode.GetName() or ""
    for case in SAMPLE_CASES:
        first, others = case.files[0].nodeName, case.files[1:]
        if name != first and not (name.startswith(first + "_") and name[len(first) + 1:].isdigit()):
            continue
        suffix = name[len(first):]
        found = []
        for sample in others:
            volumes = [n for n in nodesByName(scene, sample.nodeName + suffix)
                       if n.IsA("vtkMRMLScalarVolumeNode") and not n.IsA("vtkMRMLLabelMapVolumeNode")]
            if not volumes:
                return []
            found.append(volumes[-1])
        return found
    return []


def syntheticSampleCase(seed: int = SAMPLE_SEED, shape: tuple[int, int, int] = SAMPLE_SHAPE):
    """The ``umlcore.synthetic.SyntheticCase`` the sample was made from (phases, true lesion mask, label).

    Needs ``umlcore`` (imported here, not at module import).
    """
    from umlcore.synthetic import generate_case

    return generate_case(seed, shape=shape, randomize="light")


def writeSyntheticSample(directory: Union[str, Path], seed: int = SAMPLE_SEED, shape: tuple[int, int, int] = SAMPLE_SHAPE) -> list[Path]:
    """Regenerate the sample's phase files (gzip NRRD, int16, RAS geometry) into ``directory``.

    Needs ``umlcore`` (imported here, not at module import). Returns the written paths in channel order.
    """
    import slicer

    case = syntheticSampleCase(seed, shape)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lpsToRas = np.diag([-1.0, -1.0, 1.0])
    direction = np.asarray(case.direction, dtype=float).reshape(3, 3)
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = lpsToRas @ direction @ np.diag(case.spacing)
    ijkToRas[:3, 3] = lpsToRas @ np.asarray(case.origin, dtype=float)
    paths = []
    for sample, phase in zip(SAMPLE_CASES[0].files, case.phases):
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
        slicer.util.updateVolumeFromArray(node, np.clip(np.round(phase), -32768, 32767).astype(np.int16))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(directory / sample.fileName))
        storage.SetUseCompression(True)
        if not storage.WriteData(node):
            raise OSError(f"could not write {directory / sample.fileName}")
        paths.append(directory / sample.fileName)
    return paths
