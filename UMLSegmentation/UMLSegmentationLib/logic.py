"""The Qt-free logic of the UML module: used by the widget, from Slicer's Python console and in batch.

Example (Slicer's Python console, or ``Slicer --no-main-window --python-script run_uml.py``)::

    from UMLSegmentationLib.logic import UMLSegmentationLogic

    logic = UMLSegmentationLogic()
    result = logic.process(slicer.util.getNode("MRBreast"), device="auto")
    print(result.summary["classification"]["verdict"], result.segmentationNode.GetName())
    csvPath = logic.processFolder("/data/cases", "/data/uml-results", pattern="*.nii.gz")

Inference runs out of process: Slicer's own Python runs ``python -m umlcore predict ... --progress json`` in a
temporary folder (removed afterwards, whatever happens); nodes are created or updated only after the engine
succeeded and its outputs passed the checks, so an error or a cancel leaves the scene as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import slicer

from .dependencies import Purpose, planDependencies
from .engine import BatchSize, Device, ProgressEvent, checkEngineOptions
from .errors import EngineError, InputError, RunCancelled, UMLSegmentationError
from .inputs import InputPlan, ijkToRasArray, planInputs, volumeDimensions, writeInputs
from .models import ModelEntry, ModelInfo, listModels, resolveModel
from .outputs import (
    EngineOutputs,
    OutputNodes,
    createMissingOutputs,
    placeInStudy,
    readCaseOutputs,
    readEngineOutputs,
    showOverlay,
    stageOutputs,
    updateSegmentation,
    updateUncertaintyVolume,
    writeSegmentationFile,
    writeVolumeFile,
)
from .paths import defaultPythonExecutable, umlcorePythonPath
from .server import EngineHost, EngineKey, EngineRun
from .summary import caseCsvRow, writeCasesCsv

__all__ = [
    "MODULE_NAME",
    "RESULTS_CSV",
    "OUTPUT_MARKER",
    "Display",
    "OnError",
    "ProgressCallback",
    "UMLResult",
    "PendingRun",
    "UMLSegmentationLogic",
    "OutputNodes",
    "stripImageExtension",
]

MODULE_NAME = "UMLSegmentation"

#: The CSV written by :meth:`UMLSegmentationLogic.processFolder`.
RESULTS_CSV = "uml_results.csv"

#: The file :meth:`UMLSegmentationLogic.processFolder` keeps in its output folder: JSON listing the files it wrote
#: there (``{"written_by": "UML Slicer folder mode", "files": [...]}``), the only existing files it replaces.
OUTPUT_MARKER = ".uml-output"
_MARKER_WRITER = "UML Slicer folder mode"

Display = Literal["overlay", "none"]
OnError = Literal["record", "raise"]
ProgressCallback = Callable[[ProgressEvent], None]

_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_log = logging.getLogger(__name__)


def _caseFileNames(case: str) -> dict[str, str]:
    """The files folder mode writes for ``case`` (names inside the output folder)."""
    return {"segmentation": f"{case}.seg.nrrd", "uncertainty": f"{case}_uncertainty.nrrd", "summary": f"{case}_summary.json"}


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _readOutputMarker(outputDir: Path) -> set[str]:
    """The names folder mode listed in ``outputDir``'s :data:`OUTPUT_MARKER` (none when it is absent, unreadable
    or not folder mode's)."""
    marker = outputDir / OUTPUT_MARKER
    if marker.is_symlink() or not marker.is_file():
        return set()
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    if not isinstance(data, dict) or data.get("written_by") != _MARKER_WRITER or not isinstance(data.get("files"), list):
        return set()
    return {f for f in data["files"] if isinstance(f, str) and f and "/" not in f and "\\" not in f}


def _writeOutputMarker(outputDir: Path, files: set[str]) -> None:
    """Replace ``outputDir``'s :data:`OUTPUT_MARKER` (atomically) by one listing ``files``."""
    fd, tmp = tempfile.mkstemp(prefix=OUTPUT_MARKER + ".", suffix=".part", dir=outputDir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"written_by": _MARKER_WRITER, "files": sorted(files)}, indent=1) + "\n")
        os.replace(tmp, outputDir / OUTPUT_MARKER)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _checkFolderOutputs(inputs: Sequence[Path], outputDir: Path, caseIds: Sequence[str]) -> set[str]:
    """Refuse folder-mode outputs that would touch an input or replace a file folder mode did not write.

    - No output may be an input, lie inside an input (DICOM) folder or hold one, and ``outputDir`` may not lie
      inside an input folder (all resolved through symbolic links).
    - An existing file with the name of an output is replaced only when ``outputDir``'s :data:`OUTPUT_MARKER`
      lists it (folder mode wrote it) and it is a plain file (not a link).

    Returns:
        The names the marker lists that are still plain files there (folder mode's own files, of any run).
    """
    planned = [outputDir / name for case in caseIds for name in _caseFileNames(case).values()] + [outputDir / RESULTS_CSV]
    out = _resolved(outputDir)
    sources = {_resolved(p): p for p in inputs}
    for source, given in sources.items():
        if given.is_dir() and (out == source or source in out.parents):
            raise InputError(f"output folder {outputDir} lies inside the input folder {given}: UML never writes into "
                             "an input; choose an output folder outside it")
    planned_places = {}
    for target in planned:
        place = _resolved(target)
        planned_places[place] = target
        if place in sources:
            raise InputError(f"output {target} would replace the input {sources[place]}: UML never replaces or "
                             "writes into an input; choose another output folder (or rename the input)")
        inside = next((sources[a] for a in place.parents if a in sources), None)
        if inside is not None:
            raise InputError(f"output {target} would be written inside the input folder {inside}: UML never "
                             "replaces or writes into an input; choose another output folder")
    for source, given in sources.items():
        holder = next((planned_places[a] for a in source.parents if a in planned_places), None)
        if holder is not None:
            raise InputError(f"output {holder} would replace the folder holding the input {given}: UML never "
                             "replaces or writes into an input; choose another output folder")
    marker = outputDir / OUTPUT_MARKER
    if marker.is_symlink() or (marker.exists() and not marker.is_file()):
        raise InputError(f"{marker} is not a file UML's folder mode wrote: UML keeps the list of its outputs there; "
                         "choose another output folder, or move it away yourself")
    ours = {name for name in _readOutputMarker(outputDir)
            if (outputDir / name).is_file() and not (outputDir / name).is_symlink()}
    foreign = [t for t in planned if (t.exists() or t.is_symlink()) and t.name not in ours]
    if foreign:
        more = f"; {len(foreign) - 1} more output(s) exist likewise" if len(foreign) > 1 else ""
        raise InputError(f"output {foreign[0]} exists and was not written by UML's folder mode (it is not listed in "
                         f"{marker}{more}): UML replaces only its own outputs; choose another output folder, or move "
                         "it away yourself")
    return ours


def stripImageExtension(name: str) -> str:
    """``"case01.nii.gz" -> "case01"``, ``"fundus.png" -> "fundus"`` (the engine's rule for case ids)."""
    lower = name.lower()
    for ext in _IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def _namingNodes(error: UMLSegmentationError, run: "PendingRun") -> UMLSegmentationError:
    """The engine's message names the temporary files the input nodes were written to: name the nodes instead."""
    message = str(error)
    for path, source in zip(run.inputFiles, run.plan.sources):
        message = message.replace(str(path), f"the input '{source.node.GetName()}'")
    return error if message == str(error) else type(error)(message, getattr(error, "details", ""))


@dataclass
class UMLResult:
    """What :meth:`UMLSegmentationLogic.process` produced.

    Attributes:
        inputNode: The input volume.
        segmentationNode: Segments named, coloured and coded as in the model card (+ optional "Review").
        uncertaintyVolumeNode: Per-voxel uncertainty in 0..1 on the input grid.
        tableNode: The case summary as ``Field`` / ``Value`` rows.
        summary: The engine's ``summary.json`` (``outputs`` holds the output node IDs).
        model: The model that ran.
    """

    inputNode: Any
    segmentationNode: Any
    uncertaintyVolumeNode: Any
    tableNode: Any
    summary: dict
    model: ModelInfo


@dataclass
class PendingRun:
    """An engine run started by :meth:`UMLSegmentationLogic.startRun`.

    Poll it (:meth:`poll`, never blocks) until :attr:`finished`, then pass it to
    :meth:`UMLSegmentationLogic.finishRun`; or :meth:`cancel` it. Either way its temporary folder is removed.
    """

    plan: InputPlan
    model: ModelInfo
    requestedOutputs: OutputNodes
    reviewThreshold: Optional[float]
    display: Display
    temporaryDirectory: Path
    engine: EngineRun
    startTime: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    closed: bool = False
    inputFiles: tuple[Path, ...] = ()

    @property
    def caseName(self) -> str:
        return self.plan.caseName

    def poll(self) -> list[ProgressEvent]:
        """Progress events received since the last call."""
        return self.engine.poll()

    @property
    def finished(self) -> bool:
        """True once the engine process has exited (successfully or not)."""
        return self.engine.finished

    def cancel(self) -> None:
        """End the engine's process tree (the next run starts a new engine) and remove the temporary folder; the
        scene is not touched."""
        self.cancelled = True
        try:
            if not self.engine.finished:
                self.engine.kill()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Remove the temporary folder (idempotent)."""
        if not self.closed:
            shutil.rmtree(self.temporaryDirectory, ignore_errors=True)
            self.closed = True


class UMLSegmentationLogic:
    """Run UML on volume nodes and folders of files.

    Args:
        scene: The MRML scene to work in (default: ``slicer.mrmlScene`` at the time of each call).
        pythonExecutable: Interpreter that runs the engine (default: Slicer's own Python, or this one).
        temporaryDirectory: Parent folder of the per-run temporary folders (default: the system's).
        modelDirectories: Extra folders to look for model bundles in (besides the shipped ones and ``~/.uml/models``).

    The logic keeps one warm engine (:mod:`.server`): the first run starts it (PyTorch import, model load), later
    runs with the same model, device and batch size reuse it. :meth:`shutdownEngine` ends it; so does the end of
    the logic object or of the process.
    """

    def __init__(
        self,
        scene=None,
        pythonExecutable: Optional[str] = None,
        temporaryDirectory: Optional[Union[str, Path]] = None,
        modelDirectories: Sequence[Union[str, Path]] = (),
    ) -> None:
        self._scene = scene
        self.pythonExecutable = pythonExecutable or defaultPythonExecutable()
        self.temporaryDirectory = Path(temporaryDirectory) if temporaryDirectory is not None else None
        self.modelDirectories = [Path(d) for d in modelDirectories]
        self.engines = EngineHost()
        weakref.finalize(self, self.engines.shutdown)

    def shutdownEngine(self) -> None:
        """End the warm engine (frees its memory; the next run starts a new one)."""
        self.engines.shutdown()

    def _startEngineRun(self, model: ModelInfo, device: str, batchSize: BatchSize, cases: Sequence[Sequence[Path]],
                        outputDirectory: Path) -> EngineRun:
        """The request on the warm engine for this model and settings."""
        key = EngineKey(str(self.pythonExecutable), str(umlcorePythonPath()), str(model.path), model.sha256, device,
                        batchSize)
        workingDirectory = self.temporaryDirectory or Path(tempfile.gettempdir())
        workingDirectory.mkdir(parents=True, exist_ok=True)
        return self.engines.run(key, cases, outputDirectory, workingDirectory)

    # ------------------------------------------------------------------------------------------ helpers

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        """The module's singleton ``vtkMRMLScriptedModuleNode`` (created on first use; saved with the scene)."""
        scene = self.scene
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(MODULE_NAME)
            node.SetAttribute("ModuleName", MODULE_NAME)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node = scene.AddNode(node)
        return node

    def listModels(self) -> list[ModelEntry]:
        """Shipped bundles first, then the user's and the extra folders' (unreadable ones with their error)."""
        return listModels(self.modelDirectories)

    def resolveModel(self, model: Union[None, str, Path, ModelInfo] = None) -> ModelInfo:
        """A model from a bundle path, an id, a :class:`ModelInfo` or ``None`` (the default shipped model)."""
        return resolveModel(model, self.modelDirectories)

    @staticmethod
    def missingPythonPackages(purpose: Purpose = "nodes") -> list[str]:
        """pip names of the engine's packages that this Python lacks (``torch`` also when older than 2.1)."""
        plan = planDependencies(purpose)
        return (["torch"] if plan.torch != "ok" else []) + list(plan.pip)

    @staticmethod
    def _checkPackages(purpose: Purpose = "nodes") -> None:
        plan = planDependencies(purpose)
        if not plan.ready:
            raise InputError(plan.problem())

    @staticmethod
    def _checkOptions(device: str, batchSize: BatchSize, reviewThreshold: Optional[float], display: str) -> None:
        checkEngineOptions(device, batchSize)
        if reviewThreshold is not None and not (isinstance(reviewThreshold, (int, float)) and 0.0 < float(reviewThreshold) < 1.0):
            raise InputError(f"reviewThreshold {reviewThreshold!r} is not allowed: give a number between 0 and 1 (e.g. 0.5), or None for no Review segment")
        if display not in ("overlay", "none"):
            raise InputError(f"display {display!r} is unknown: use 'overlay' or 'none'")

    def _checkOutputs(self, plan: InputPlan, requested: OutputNodes) -> None:
        sources = {id(s.node) for s in plan.sources}
        checks = (
            (requested.segmentation, "vtkMRMLSegmentationNode", "output segmentation"),
            (requested.uncertainty, "vtkMRMLScalarVolumeNode", "output uncertainty volume"),
            (requested.table, "vtkMRMLTableNode", "output table"),
        )
        for node, className, role in checks:
            if node is None:
                continue
            if not node.IsA(className) or (className == "vtkMRMLScalarVolumeNode" and (node.IsA("vtkMRMLLabelMapVolumeNode") or node.IsA("vtkMRMLVectorVolumeNode"))):
                raise InputError(f"the {role} '{node.GetName()}' is a {node.GetClassName()}: select a {className} or 'Create new'")
            if id(node) in sources:
                raise InputError(f"the {role} '{node.GetName()}' is one of the inputs: select another node or 'Create new'")
            if node.GetScene() is not self.scene:
                raise InputError(f"the {role} '{node.GetName()}' is not in this scene: select a node of the scene or 'Create new'")

    def _makeTemporaryDirectory(self) -> Path:
        parent = self.temporaryDirectory
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="UML-", dir=None if parent is None else str(parent)))
        if "," in str(path):
            shutil.rmtree(path, ignore_errors=True)
            raise InputError(f"the temporary folder {path} contains a comma, which the engine reads as a separator: choose another temporaryDirectory")
        return path

    # ------------------------------------------------------------------------------------------ one volume

    def startRun(
        self,
        inputVolumeNode,
        model: Union[None, str, Path, ModelInfo] = None,
        device: Device = "auto",
        *,
        phaseNodes: Sequence = (),
        outputs: Optional[OutputNodes] = None,
        batchSize: BatchSize = "auto",
        reviewThreshold: Optional[float] = None,
        display: Display = "overlay",
    ) -> PendingRun:
        """Check everything, write the inputs to a temporary folder and start the engine; returns at once.

        Same arguments as :meth:`process`. Nothing is added to the scene.

        Raises:
            InputError: bad input node(s), model, option or missing Python packages.
            EngineError: the engine could not be started.
        """
        info = self.resolveModel(model)
        plan = planInputs(inputVolumeNode, phaseNodes, info)
        self._checkOptions(device, batchSize, reviewThreshold, display)
        requested = outputs if outputs is not None else OutputNodes()
        self._checkOutputs(plan, requested)
        self._checkPackages()
        umlcorePythonPath()  # refuses a missing engine before anything is written
        tmp = self._makeTemporaryDirectory()
        try:
            inputDir = tmp / "inputs"
            inputDir.mkdir()
            files = writeInputs(plan, inputDir)
            engine = self._startEngineRun(info, device, batchSize, [files], tmp / "outputs")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return PendingRun(plan, info, requested, None if reviewThreshold is None else float(reviewThreshold), display, tmp, engine,
                          inputFiles=tuple(files))

    def finishRun(self, run: PendingRun) -> UMLResult:
        """Wait for the engine, check its outputs, then create or update the output nodes.

        Raises:
            InputError: the engine refused the input or the model (its message), or the input left the scene.
            EngineError: the engine failed or broke its output contract.
            RunCancelled: the run was cancelled.
        """
        try:
            if run.cancelled or run.closed:
                raise RunCancelled()
            run.engine.wait()
            failure = run.engine.failure()
            if failure is not None:
                _log.error("UML engine failed:\n%s", getattr(failure, "details", ""))
                raise _namingNodes(failure, run)
            reference = run.plan.referenceNode
            scene = self.scene
            if reference.GetScene() is not scene or not scene.IsNodePresent(reference):
                raise InputError(f"the input volume '{reference.GetName()}' was removed from the scene during the run: run again")
            outputs = readEngineOutputs(run.temporaryDirectory / "outputs", run.model, "nrrd", volumeDimensions(reference), ijkToRasArray(reference))
            for node in run.requestedOutputs.nodes():
                if not scene.IsNodePresent(node):
                    raise InputError(f"the output node '{node.GetName()}' was removed during the run: select another and run again")
            try:
                return self._importResults(run, outputs)
            except UMLSegmentationError:
                raise
            except Exception as exc:  # noqa: BLE001 - an unforeseen Slicer API failure is one error, not a traceback
                _log.exception("UML: importing the results failed")
                raise EngineError(f"could not load the results into the scene ({type(exc).__name__}: {exc}); the "
                                  "scene was left as it was: see the log, and report this with your Slicer version") from None
        finally:
            run.cleanup()

    def _importResults(self, run: PendingRun, outputs: EngineOutputs) -> UMLResult:
        """Build the results in a private scene, then create (or reuse) the output nodes and copy them in; on any
        failure the nodes this run created are removed, so the scene is as before the run."""
        scene = self.scene
        reference = run.plan.referenceNode
        reviewMask = None if run.reviewThreshold is None else outputs.uncertainty > run.reviewThreshold
        staged = stageOutputs(outputs, reference, run.model, reviewMask)
        created: list = []
        scene.StartState(scene.BatchProcessState)
        try:
            nodes = createMissingOutputs(scene, reference, run.requestedOutputs, created)
            summary = dict(outputs.summary)
            summary["inputs"] = self._describeInputs(summary.get("inputs"), run.plan)
            summary["outputs"] = {
                "segmentation_node": nodes.segmentation.GetID(),
                "uncertainty_node": nodes.uncertainty.GetID(),
                "table_node": nodes.table.GetID(),
            }
            staged.commit(nodes, reference, summary)
            placeInStudy(scene, reference, nodes.nodes())
            if run.display == "overlay":
                showOverlay(scene, reference, nodes.uncertainty)
        except BaseException:
            for node in created:
                scene.RemoveNode(node)
            raise
        finally:
            scene.EndState(scene.BatchProcessState)
            staged.close()
        return UMLResult(reference, nodes.segmentation, nodes.uncertainty, nodes.table, summary, run.model)

    @staticmethod
    def _describeInputs(entries: Any, plan: InputPlan) -> Any:
        """Replace the engine's temporary input paths by the nodes they came from.

        With one source (one volume, or a picture whose colours the engine numbers 0, 1, 2) every entry names it
        and keeps its ``volume`` index.
        """
        if not isinstance(entries, list):
            return entries
        described = []
        for entry in entries:
            entry = dict(entry) if isinstance(entry, dict) else entry
            index = entry.get("volume") if isinstance(entry, dict) else None
            valid = isinstance(index, int) and not isinstance(index, bool) and index >= 0
            if valid and (len(plan.sources) == 1 or index < len(plan.sources)):
                source = plan.sources[min(index, len(plan.sources) - 1)]
                entry.pop("path", None)
                entry["node_name"] = source.node.GetName()
                entry["node_id"] = source.node.GetID()
                if source.component is not None:
                    entry["frame"] = source.component
            described.append(entry)
        return described

    def process(
        self,
        inputVolumeNode,
        model: Union[None, str, Path, ModelInfo] = None,
        device: Device = "auto",
        progressCallback: Optional[ProgressCallback] = None,
        *,
        phaseNodes: Sequence = (),
        outputs: Optional[OutputNodes] = None,
        batchSize: BatchSize = "auto",
        reviewThreshold: Optional[float] = None,
        display: Display = "overlay",
    ) -> UMLResult:
        """Run UML on a volume node and put the results into the scene (blocking).

        Args:
            inputVolumeNode: Scalar volume (grayscale; or multi-frame with one frame per model channel); for a
                picture model a picture, i.e. a single-slice vector (RGB) or scalar (grey) volume, as Slicer
                loads a PNG / JPEG. Outputs land on its grid, beside it in the subject hierarchy.
            model: Bundle folder / ``.zip`` / ``model.json`` path, model id, :class:`ModelInfo`, or ``None`` for
                the default shipped model.
            device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
            progressCallback: Called with each :class:`ProgressEvent`; raise :class:`RunCancelled` (or any
                exception) from it to cancel: the engine is killed, temporary files removed, the scene untouched.
            phaseNodes: Further phase volumes in the model's channel order (e.g. early, late).
            outputs: Output nodes to reuse; unset ones are the previous run's for this input, or new.
            batchSize: Slices per forward pass, or ``"auto"`` (the engine's choice for its device: 1 on the CPU,
                8 on a GPU).
            reviewThreshold: Add a "Review (uncertain)" segment of voxels with uncertainty above it; ``None``: no.
            display: ``"overlay"`` shows the uncertainty over the input in the slice views; ``"none"`` leaves views.

        Returns:
            A :class:`UMLResult`.

        Raises:
            InputError: bad input, model or option (nothing is created).
            EngineError: the engine failed (nothing is created).
            RunCancelled: cancelled from the callback (nothing is created).
        """
        run = self.startRun(
            inputVolumeNode, model, device, phaseNodes=phaseNodes, outputs=outputs, batchSize=batchSize,
            reviewThreshold=reviewThreshold, display=display,
        )
        emit = progressCallback or (lambda event: None)
        try:
            emit(ProgressEvent("prepare", run.caseName, 0.0, f"started the UML engine with model {run.model.id}"))
            while not run.finished:
                for event in run.poll():
                    emit(event)
                time.sleep(0.05)
            for event in run.poll():
                emit(event)
            emit(ProgressEvent("import", run.caseName, 1.0, "loading the results into the scene"))
            result = self.finishRun(run)
        except BaseException:
            run.cancel()
            raise
        emit(ProgressEvent("finished", run.caseName, 1.0, f"done in {time.monotonic() - run.startTime:.1f} s"))
        return result

    # ------------------------------------------------------------------------------------------ folders

    def processFolder(
        self,
        inputDir: Union[str, Path],
        outputDir: Union[str, Path],
        model: Union[None, str, Path, ModelInfo] = None,
        pattern: str = "*.nii.gz",
        *,
        device: Device = "auto",
        batchSize: BatchSize = "auto",
        reviewThreshold: Optional[float] = None,
        progressCallback: Optional[ProgressCallback] = None,
        onError: OnError = "record",
        casesPerRun: int = 16,
    ) -> Path:
        """Run UML on every file (or DICOM folder) of ``inputDir`` matching ``pattern``; no scene is touched.

        Writes per case ``<case>.seg.nrrd`` (segments named, coloured and coded as in the model card),
        ``<case>_uncertainty.nrrd`` and ``<case>_summary.json`` into ``outputDir``, and one CSV for all cases,
        :data:`RESULTS_CSV`. Inputs are never touched and only its own files are replaced: the run is refused
        (before anything is written) when an output would be, replace or lie inside an input (or ``outputDir``
        inside an input folder), or when a file of an output's name exists that folder mode did not write; the
        files it writes are listed in ``outputDir``'s :data:`OUTPUT_MARKER`, so a later run may replace them.
        Other files in ``outputDir`` are left alone.

        Args:
            inputDir: Folder with one image per case (a 4D file holds the phases of its case; for a picture
                model one picture per case, e.g. ``pattern="*.png"``).
            outputDir: Created if needed.
            model: As in :meth:`process`.
            pattern: Glob pattern of the inputs inside ``inputDir``.
            device: As in :meth:`process`.
            batchSize: As in :meth:`process`.
            reviewThreshold: As in :meth:`process` (the Review segment goes into the ``.seg.nrrd``).
            progressCallback: As in :meth:`process`; ``fraction`` is over all cases.
            onError: ``"record"``: a failing case gets status ``error`` and its message in the CSV, the others
                go on; ``"raise"``: the first failure raises.
            casesPerRun: Cases per engine process (one process loads the model once).

        Returns:
            The CSV path.

        Raises:
            InputError: no such folder, no matching file, clashing case names, bad options, an output that would
                touch an input, an existing file of an output's name that folder mode did not write.
        """
        inputDir, outputDir = Path(inputDir), Path(outputDir)
        if not inputDir.is_dir():
            raise InputError(f"input folder {inputDir} does not exist: give the folder that holds the cases")
        if onError not in ("record", "raise"):
            raise InputError(f"onError {onError!r} is unknown: use 'record' or 'raise'")
        if not isinstance(casesPerRun, int) or casesPerRun < 1:
            raise InputError(f"casesPerRun {casesPerRun!r} is not allowed: give a positive integer, e.g. 16")
        outResolved = outputDir.resolve()
        files = sorted(
            p for p in inputDir.glob(pattern)
            if not p.name.startswith(".") and p.resolve() != outResolved and (p.is_file() or p.is_dir())
        )
        if not files:
            raise InputError(f"no input matches {pattern!r} in {inputDir}: check the folder and the pattern (e.g. '*.nrrd')")
        caseIds = [stripImageExtension(p.name) for p in files]
        clashes = sorted({c for c in caseIds if caseIds.count(c) > 1})
        if clashes:
            raise InputError(f"several inputs give the case name(s) {clashes}: rename them or use a narrower pattern")
        if outputDir.exists() and not outputDir.is_dir():
            raise InputError(f"output folder {outputDir} is a file, not a folder: choose another output folder")
        ours = _checkFolderOutputs(files, outputDir, caseIds)
        info = self.resolveModel(model)
        self._checkOptions(device, batchSize, reviewThreshold, "none")
        self._checkPackages("files")
        umlcorePythonPath()  # refuses a missing engine before anything is written
        outputDir.mkdir(parents=True, exist_ok=True)
        emit = progressCallback or (lambda event: None)

        def claim(names: Sequence[str]) -> None:
            """List ``names`` in the output marker before they are written (a later run may replace them)."""
            if not set(names) <= ours:
                ours.update(names)
                _writeOutputMarker(outputDir, ours)

        rows: dict[str, dict[str, str]] = {}
        total = len(files)

        def runCases(batch: Sequence[Path], done: int) -> None:
            """One engine process for ``batch``; rows of exported cases are recorded as they are written.

            A failure is raised with ``caseId`` set to the failing case when the engine or the checks name it.
            """
            tmp = self._makeTemporaryDirectory()
            engine: Optional[EngineRun] = None

            def forward(events: Sequence[ProgressEvent]) -> None:
                for event in events:
                    emit(ProgressEvent(event.stage, event.case, min(1.0, (done + event.fraction * len(batch)) / total), event.message))

            try:
                engine = self._startEngineRun(info, device, batchSize, [[p] for p in batch], tmp / "outputs")
                while not engine.finished:
                    forward(engine.poll())
                    time.sleep(0.05)
                forward(engine.poll())
                failure = engine.failure()
                if failure is not None:
                    failure.caseId = engine.lastError.case if engine.lastError is not None else ""
                    raise failure
                for path in batch:
                    caseId = stripImageExtension(path.name)
                    try:
                        outputs = readCaseOutputs(tmp / "outputs" / caseId, info, "nrrd")
                        claim(list(_caseFileNames(caseId).values()))
                        written = self._exportCase(outputs, info, outputDir, reviewThreshold)
                    except UMLSegmentationError as exc:
                        exc.caseId = caseId
                        raise
                    rows[caseId] = caseCsvRow(outputs.summary, caseId, str(path), written)
            except BaseException:
                if engine is not None and not engine.finished:
                    engine.kill()  # cancelled or interrupted mid-request: the engine cannot be stopped otherwise
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        def record(path: Path, error: UMLSegmentationError) -> None:
            caseId = stripImageExtension(path.name)
            rows[caseId] = caseCsvRow(None, caseId, str(path), {}, str(error))
            _log.warning("UML: case %s failed: %s", caseId, error)

        done = 0
        for start in range(0, total, casesPerRun):
            pending = list(files[start:start + casesPerRun])
            while pending:
                try:
                    runCases(pending, done)
                    pending = []
                except UMLSegmentationError as exc:
                    if onError == "raise" or isinstance(exc, RunCancelled):
                        raise
                    pending = [p for p in pending if stripImageExtension(p.name) not in rows]
                    failed = [p for p in pending if stripImageExtension(p.name) == getattr(exc, "caseId", "")]
                    if failed or len(pending) == 1:
                        # the failing case is known: record it and run the others again together
                        culprit = failed[0] if failed else pending[0]
                        record(culprit, exc)
                        pending.remove(culprit)
                        continue
                    for path in pending:  # unknown culprit: one case per run
                        try:
                            runCases([path], done)
                        except UMLSegmentationError as single:
                            if isinstance(single, RunCancelled):
                                raise
                            record(path, single)
                    pending = []
            done = min(total, start + casesPerRun)
            emit(ProgressEvent("case", "", done / total, f"{done}/{total} case(s) processed"))
        claim([RESULTS_CSV])
        csvPath = writeCasesCsv([rows[c] for c in caseIds if c in rows], outputDir / RESULTS_CSV)
        emit(ProgressEvent("finished", "", 1.0, f"wrote {csvPath}"))
        return csvPath

    def _exportCase(self, outputs: EngineOutputs, model: ModelInfo, outputDir: Path, reviewThreshold: Optional[float]) -> dict[str, str]:
        """Write one case's ``.seg.nrrd``, uncertainty ``.nrrd`` and summary JSON (built in a private scene)."""
        case = outputs.caseId
        scene = slicer.vtkMRMLScene()
        reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", case)
        reference.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(outputs.ijkToRas))
        slicer.util.updateVolumeFromArray(reference, outputs.labels)
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", case)
        reviewMask = None if reviewThreshold is None else outputs.uncertainty > float(reviewThreshold)
        updateSegmentation(segmentation, reference, outputs.labels, model, reviewMask)
        uncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{case}_uncertainty")
        updateUncertaintyVolume(uncertainty, reference, outputs.uncertainty)
        names = _caseFileNames(case)
        writeSegmentationFile(segmentation, outputDir / names["segmentation"])
        writeVolumeFile(uncertainty, outputDir / names["uncertainty"])
        summary = dict(outputs.summary)
        summary["outputs"] = dict(names)
        tmp = outputDir / (names["summary"] + ".part")
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tmp.replace(outputDir / names["summary"])
        scene.Clear(1)
        return {k: str(outputDir / v) for k, v in names.items()}
