"""Benchmark (not a test): the Slicer module's first run (starts the engine: PyTorch import, model load) against
the runs after it (the warm engine), on the shipped sample case with the shipped model, under ``slicer-core``.

    python benchmarks/bench_slicer_engine.py --repeats 3

Each repeat makes a new logic (so a new engine), then times ``logic.process`` ``--runs`` times on the sample's
three phases (CPU). Prints the median seconds of the first run, of the later runs, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "UMLSegmentation")]

import slicer  # noqa: E402
from Testing.slicer.umlslicer_helpers import MRML  # noqa: E402  (a scene with the module logics, as in Slicer)
from UMLSegmentationLib.logic import UMLSegmentationLogic  # noqa: E402
from UMLSegmentationLib.paths import sampleDataDirectory  # noqa: E402
from UMLSegmentationLib.sampledata import SAMPLE_CASES  # noqa: E402


def load(scene, path: Path):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise SystemExit(f"could not read {path}")
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="new logics (engines), default 3")
    parser.add_argument("--runs", type=int, default=3, help="runs per logic, default 3")
    args = parser.parse_args()
    scene = MRML().scene
    slicer.mrmlScene = scene
    nodes = [load(scene, sampleDataDirectory() / f.fileName) for f in SAMPLE_CASES[0].files]
    first, later = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            logic = UMLSegmentationLogic(scene=scene, temporaryDirectory=tmp)
            for run in range(args.runs):
                t0 = time.perf_counter()
                logic.process(nodes[0], device="cpu", phaseNodes=nodes[1:], display="none")
                (first if run == 0 else later).append(time.perf_counter() - t0)
            assert logic.engines.starts == 1
            logic.shutdownEngine()
    a, b = statistics.median(first), statistics.median(later)
    print(f"first run (starts the engine): median {a:.2f} s over {len(first)}")
    print(f"later runs (warm engine):     median {b:.2f} s over {len(later)}")
    print(f"first / later: {a / b:.2f}x; saved per run: {a - b:.2f} s")


if __name__ == "__main__":
    main()
