"""UML for 3D Slicer: uncertainty-aware joint classification + segmentation (evidential deep learning).

This file holds the thin Module / Widget / Test classes; everything that does work lives in the Qt-free
package ``UMLSegmentationLib`` (usable from the Python console and in batch, and tested under the PyPI
package ``slicer-core``). Inference runs out of process: Slicer's own Python runs ``python -m umlcore``.
"""

import enum
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from UMLSegmentationLib.errors import RunCancelled, UMLSegmentationError
from UMLSegmentationLib.logic import UMLSegmentationLogic  # noqa: F401  (the module's logic, re-exported)
from UMLSegmentationLib.models import ModelInfo, readModelInfo, validateModel
from UMLSegmentationLib.outputs import SUMMARY_ATTRIBUTE, OutputNodes
from UMLSegmentationLib.dependencies import planDependencies
from UMLSegmentationLib.sampledata import SAMPLE_CASES, sampleDataSources, samplePhases
from UMLSegmentationLib.summary import confidencePanel

try:  # Slicer >= 5.4: translatable strings
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover - older Slicer
    def _(text):
        return text


UML_CITATION = (
    "Ren K, Zou K, Liu X, Chen Y, Yuan X, Shen X, Wang M, Fu H. Uncertainty-informed Mutual Learning for Joint "
    "Medical Image Classification and Segmentation. MICCAI 2023 (LNCS 14223), pp. 35-45. "
    "https://doi.org/10.1007/978-3-031-43901-8_4"
)

SETTINGS_EXTRA_MODELS = "UMLSegmentation/ExtraModels"

#
# UMLSegmentation
#


class UMLSegmentation(ScriptedLoadableModule):
    """Module description (title, category, help, acknowledgement) and sample data registration."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UML Segmentation")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["UML for 3D Slicer contributors"]
        self.parent.helpText = _("""
<p>Runs <b>UML</b> (Uncertainty-informed Mutual Learning), an evidential network that classifies a case into
the classes of the selected model and segments its structures, and says how far both can be trusted. What a
model predicts and what it was trained on are shown under <b>Model</b> (the shipped model was trained on
synthetic breast DCE-MRI only).</p>
<ol>
<li><b>Inputs</b>: select the volume (for DCE-MRI the pre-contrast phase; select the early and late phases
below it when the model asks for them, or leave them empty to use one volume for all phases). A picture model
(e.g. fundus or dermoscopy) takes a 2D picture: load the PNG / JPEG / BMP / TIFF file and select it.</li>
<li><b>Model</b>: pick a shipped model, or <i>Add model from file...</i> (a bundle folder's model.json or a .zip).</li>
<li>Click <b>Run UML</b> (it turns into <b>Cancel</b> while the engine runs in the background).</li>
</ol>
<p>Results: a segmentation (segments named, coloured and coded as in the model card; optionally a "Review"
segment of uncertain voxels), an <b>uncertainty</b> volume shown as a heat overlay (0 = certain, 1 = no
evidence), a table with the case summary, and the <b>Confidence</b> panel: predicted class and probability,
belief masses and uncertainty, a reliable / review verdict, lesion volume and its mean uncertainty.</p>
<p>Batch mode (Python console): <code>from UMLSegmentationLib.logic import UMLSegmentationLogic</code>, then
<code>UMLSegmentationLogic().process(volumeNode)</code> or <code>.processFolder(inDir, outDir)</code>.
Research use only; not for clinical decisions.</p>
""")
        self.parent.acknowledgementText = _(f"""
<p>UML method: {UML_CITATION}</p>
<p>Multi-source annotation training follows UMA-Net (Wang et al., Medical Image Analysis 2025).
PyTorch is provided by the SlicerPyTorch extension (PyTorch Utils).</p>
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the synthetic DCE-MRI sample case (with SHA-256 checksums) with the Sample Data module."""
    try:
        import SampleData
    except ImportError:  # Sample Data module disabled
        return
    moduleDir = Path(__file__).resolve().parent
    for source in sampleDataSources(moduleDir):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


#
# Parameter node
#


class ComputeDevice(enum.Enum):
    """Where the engine runs."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"

    @staticmethod
    def label(value):
        return {"auto": _("Automatic (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)"),
                "mps": _("GPU (Apple MPS)")}[value.value]


@parameterNodeWrapper
class UMLSegmentationParameterNode:
    """The module's state, saved with the scene.

    inputVolume / phase1Volume.. - input image and optional further phases (channel order of the model)
    modelPath - the selected model bundle (folder, .zip or model.json)
    outputSegmentation / outputUncertainty / outputTable - output nodes (None: create new / reuse previous)
    device, addReviewSegment, reviewThreshold, batchSize, showOverlay - advanced options
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    phase1Volume: slicer.vtkMRMLScalarVolumeNode
    phase2Volume: slicer.vtkMRMLScalarVolumeNode
    phase3Volume: slicer.vtkMRMLScalarVolumeNode
    modelPath: str = ""
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    outputUncertainty: slicer.vtkMRMLScalarVolumeNode
    outputTable: slicer.vtkMRMLTableNode
    device: ComputeDevice = ComputeDevice.AUTO
    addReviewSegment: bool = True
    reviewThreshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    batchSize: Annotated[int, WithinRange(0, 256)] = 0  # 0: auto (the engine's choice for its device)
    showOverlay: bool = True


#
# UMLSegmentationWidget
#


class UMLSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI over ``Resources/UI/UMLSegmentation.ui``; all work is done by :class:`UMLSegmentationLogic`."""

    PHASE_SELECTORS = ("phase1VolumeSelector", "phase2VolumeSelector", "phase3VolumeSelector")
    PHASE_LABELS = ("phase1Label", "phase2Label", "phase3Label")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._pollTimer = None
        self._model: Optional[ModelInfo] = None
        self._beliefBars = []

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UMLSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = UMLSegmentationLogic(temporaryDirectory=slicer.app.temporaryPath)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.runButton.connect("clicked(bool)", self.onRunButton)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.show3DButton.setSegmentationNode)
        self.ui.outputTableSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateConfidencePanelFromTable)
        for name in ("inputVolumeSelector",) + self.PHASE_SELECTORS:
            getattr(self.ui, name).connect("currentNodeChanged(vtkMRMLNode*)", self.updateRunButtonState)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.selectSamplePhases)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.timeout.connect(self.onPollRun)

        self.ui.progressBar.hide()
        self.populateModels()
        self.initializeParameterNode()
        self.clearConfidencePanel()

    def onReload(self) -> None:
        """Developer reload: also reload the logic package (leaves first, ``logic`` last)."""
        import importlib
        import sys

        self.cancelRun(_("the module was reloaded"))
        self.logic.shutdownEngine()
        for name in ("errors", "dependencies", "paths", "models", "summary", "engine", "server", "inputs", "outputs",
                     "sampledata", "logic"):
            module = sys.modules.get(f"UMLSegmentationLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.cancelRun(_("Slicer is closing"))
        self.logic.shutdownEngine()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRun(_("the scene was closed"))
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------------------------------ parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(UMLSegmentationParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first
        if not self._parameterNode.modelPath and self.ui.modelComboBox.count > 0:
            self._parameterNode.modelPath = self.ui.modelComboBox.itemData(0) or ""
        self.selectModelInComboBox(self._parameterNode.modelPath)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        self.selectModelInComboBox(self._parameterNode.modelPath)
        self.ui.reviewThresholdSliderWidget.enabled = self._parameterNode.addReviewSegment
        self.updateRunButtonState()
        self.updateConfidencePanelFromTable(self._parameterNode.outputTable)

    # ------------------------------------------------------------------------------------------ models

    def extraModelPaths(self) -> list:
        value = qt.QSettings().value(SETTINGS_EXTRA_MODELS) or []
        if isinstance(value, str):
            value = [value]
        return [p for p in value if p and os.path.exists(p)]

    def populateModels(self) -> None:
        """Fill the model selector: shipped and user bundles, then the ones added from file."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            for entry in self.logic.listModels():
                if entry.info is not None:
                    combo.addItem(entry.info.label, str(entry.path))
                else:
                    logging.warning(f"UML: skipping unusable model {entry.path}: {entry.error}")
            for path in self.extraModelPaths():
                if combo.findData(path) < 0:
                    try:
                        combo.addItem(readModelInfo(path).label, path)
                    except UMLSegmentationError as exc:
                        logging.warning(f"UML: skipping unusable model {path}: {exc}")
        finally:
            combo.blockSignals(wasBlocked)
        self.onModelSelected(combo.currentIndex)

    def selectModelInComboBox(self, path: str) -> None:
        combo = self.ui.modelComboBox
        if not path:
            return
        index = combo.findData(path)
        if index < 0:
            try:
                combo.addItem(readModelInfo(path).label, path)
                index = combo.findData(path)
            except UMLSegmentationError as exc:
                self.ui.modelInfoLabel.text = str(exc)
                return
        if combo.currentIndex != index:
            combo.currentIndex = index

    def onModelSelected(self, index: int) -> None:
        path = self.ui.modelComboBox.itemData(index) if index >= 0 else None
        self._model = None
        if path:
            try:
                self._model = readModelInfo(path)
            except UMLSegmentationError as exc:
                self.ui.modelInfoLabel.text = str(exc)
        if self._model is not None:
            m = self._model
            self.ui.modelInfoLabel.text = (
                f"{m.task}\n"
                + _("Classes") + f": {', '.join(m.classes)}; " + _("segments") + f": {', '.join(s.name for s in m.segments)}\n"
                + _("Inputs") + f": {', '.join(m.channels)}"
                + (" (" + _("2.5D: {count} neighbouring slice(s) on each side").format(count=m.contextSlices) + ")"
                   if m.contextSlices else "")
                + (" (" + _("one 2D picture") + ")" if m.isPicture else "")
                + ("\n" + _("Trained on") + f": {m.trainingData}" if m.trainingData else "")
            )
        if self._parameterNode is not None and path and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path
        self.updatePhaseSelectors()
        self.updateRunButtonState()

    def onAddModel(self, checked: bool = False) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Add UML model"), "", _("UML model bundle (model.json *.zip)"))
        if not path:
            return
        if not self.ensureEngineDependencies():
            return
        try:
            with slicer.util.WaitCursor():
                info = validateModel(path)
        except UMLSegmentationError as exc:
            slicer.util.errorDisplay(_("This model cannot be used: ") + str(exc))
            return
        bundle = str(Path(path).parent if Path(path).name == "model.json" else Path(path))
        extra = [p for p in self.extraModelPaths() if p != bundle] + [bundle]
        qt.QSettings().setValue(SETTINGS_EXTRA_MODELS, extra)
        self.populateModels()
        self.selectModelInComboBox(bundle)
        self.ui.statusLabel.text = _("Added model") + f" {info.label}"

    def updatePhaseSelectors(self) -> None:
        """Show one extra selector per further channel of the model, named after the channel."""
        channels = self._model.channels if self._model is not None and not self._model.isPicture else ()
        for i, (selectorName, labelName) in enumerate(zip(self.PHASE_SELECTORS, self.PHASE_LABELS)):
            visible = i + 1 < len(channels)
            getattr(self.ui, selectorName).visible = visible
            getattr(self.ui, labelName).visible = visible
            if visible:
                getattr(self.ui, labelName).text = f"{channels[i + 1].capitalize()} " + _("phase") + ":"
        if self._model is None:
            self.ui.inputHintLabel.text = ""
        elif self._model.isPicture:
            self.ui.inputHintLabel.text = _(
                "This model reads one 2D picture ({channels}): load a PNG, JPEG, BMP or TIFF file (drag it into "
                "Slicer) and select it as input volume.").format(channels=", ".join(self._model.channels))
        elif len(channels) > 1:
            self.ui.inputHintLabel.text = _(
                "Select the {first} phase as input volume and the other phases below, or leave them empty to "
                "use the input volume for every phase.").format(first=channels[0])
        else:
            self.ui.inputHintLabel.text = ""

    def selectSamplePhases(self, node=None) -> None:
        """The sample case's first phase selected as input: select its other phases too (when none is set)."""
        p = self._parameterNode
        if p is None or self._model is None or self._model.isPicture:
            return
        phases = samplePhases(node, slicer.mrmlScene)
        if phases and not any((p.phase1Volume, p.phase2Volume, p.phase3Volume)):
            for name, phase in zip(("phase1Volume", "phase2Volume", "phase3Volume"), phases[: len(self._model.channels) - 1]):
                setattr(p, name, phase)

    # ------------------------------------------------------------------------------------------ run / cancel

    def updateRunButtonState(self, *args) -> None:
        if self._run is not None:
            self.ui.runButton.text = _("Cancel")
            self.ui.runButton.toolTip = _("Stop the UML engine; the scene is left as it was.")
            self.ui.runButton.enabled = True
            return
        self.ui.runButton.text = _("Run UML")
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._model is not None)
        self.ui.runButton.enabled = ready
        self.ui.runButton.toolTip = _("Run UML on the input volume(s)") if ready else _("Select an input volume and a model")

    def onRunButton(self, checked: bool = False) -> None:
        if self._run is not None:
            self.cancelRun(_("cancelled"))
            return
        self.startRun()

    def ensureEngineDependencies(self) -> bool:
        """What the engine lacks (PyTorch >= 2.1 from the PyTorch extension, pip packages), installed in one go
        after one confirmation; any failure is shown in one dialog."""
        plan = planDependencies("nodes")
        if plan.ready:
            return True
        if not slicer.util.confirmOkCancelDisplay(_(plan.question())):
            return False
        try:
            with slicer.util.WaitCursor():
                if plan.torch != "ok":
                    try:
                        import PyTorchUtils
                    except ModuleNotFoundError:
                        slicer.util.errorDisplay(_(
                            "UML needs PyTorch, provided by the 'PyTorch' extension. Install it from the Extensions "
                            "Manager, restart Slicer, and run UML again."))
                        return False
                    PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                   torchVersionRequirement=plan.torchRequirement)
                if plan.pip:
                    slicer.util.pip_install(" ".join(plan.pip))
        except Exception as exc:  # noqa: BLE001 - pip or the download failed: say so, never a console traceback
            logging.error(f"UML: installing the engine's packages failed: {exc}")
            slicer.util.errorDisplay(_("Installing the packages UML needs failed: ") + str(exc))
            return False
        plan = planDependencies("nodes")
        if not plan.ready:
            slicer.util.errorDisplay(plan.problem())
            return False
        return True

    def startRun(self) -> None:
        p = self._parameterNode
        if not self.ensureEngineDependencies():
            return
        phases = [p.phase1Volume, p.phase2Volume, p.phase3Volume] if self._model is not None and not self._model.isPicture else []
        phases = phases[: max(0, len(self._model.channels) - 1)] if self._model is not None else []
        outputs = OutputNodes(p.outputSegmentation, p.outputUncertainty, p.outputTable)
        try:
            self._run = self.logic.startRun(
                p.inputVolume, self._model, p.device.value, phaseNodes=phases, outputs=outputs, batchSize=int(p.batchSize) or "auto",
                reviewThreshold=float(p.reviewThreshold) if p.addReviewSegment else None,
                display="overlay" if p.showOverlay else "none",
            )
        except UMLSegmentationError as exc:
            logging.info(getattr(exc, "details", ""))
            self.log(_("UML could not start: ") + str(exc))
            slicer.util.errorDisplay(_("UML could not start: ") + str(exc))
            return
        self.log(_("Run on") + f" '{p.inputVolume.GetName()}' " + _("with model") + f" {self._model.label} ({p.device.value})")
        slicer.util.showStatusMessage(_("UML is running..."), 3000)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Starting the UML engine...")
        self.updateRunButtonState()
        self._pollTimer.start()

    def onPollRun(self) -> None:
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        for event in run.poll():
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self.ui.statusLabel.text = f"{event.stage}: {event.message}" if event.message else event.stage
            if event.stage == "ready":
                self.ui.engineInfoLabel.text = _("Engine") + f": {event.message}"
            if event.message and event.stage != "inference":
                self.log(f"{event.stage}: {event.message}")
        if not run.finished:
            return
        self._pollTimer.stop()
        self.ui.statusLabel.text = _("Loading the results...")
        try:
            with slicer.util.WaitCursor():
                result = self.logic.finishRun(run)
        except RunCancelled:
            self.ui.statusLabel.text = _("Cancelled.")
        except Exception as exc:  # noqa: BLE001 - every failure ends in one dialog (finishRun removed what it made)
            message = str(exc) if isinstance(exc, UMLSegmentationError) else f"{type(exc).__name__}: {exc}"
            logging.exception(f"UML failed: {message}")
            self.log(_("Failed: ") + message + ("\n" + exc.details if getattr(exc, "details", "") else ""))
            self.ui.statusLabel.text = _("Failed: ") + message
            slicer.util.showStatusMessage(_("UML failed"), 3000)
            slicer.util.errorDisplay(message, windowTitle=_("UML failed"))
        else:
            self.showResult(result)
        finally:
            self._run = None
            self.ui.progressBar.hide()
            self.updateRunButtonState()

    def cancelRun(self, reason: str) -> None:
        if self._run is None:
            return
        self._pollTimer.stop()
        run, self._run = self._run, None
        run.cancel()
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = _("Cancelled") + f" ({reason}); " + _("the scene was not changed.")
        self.updateRunButtonState()

    def showResult(self, result) -> None:
        p = self._parameterNode
        p.outputSegmentation = result.segmentationNode
        p.outputUncertainty = result.uncertaintyVolumeNode
        p.outputTable = result.tableNode
        seconds = result.summary.get("timings_s", {}).get("total")
        self.ui.statusLabel.text = _("Done") + (f" ({seconds:.1f} s)." if isinstance(seconds, (int, float)) else ".")
        self.log(self.ui.statusLabel.text)
        check = result.summary.get("input_check")
        for reason in check.get("reasons", []) if isinstance(check, dict) else []:
            self.log(_("Warning: ") + str(reason))
        slicer.util.showStatusMessage(_("UML finished: ") + str(result.summary.get("classification", {}).get("verdict", "")), 5000)
        self.ui.show3DButton.setSegmentationNode(result.segmentationNode)
        self.showConfidencePanel(result.summary)

    def log(self, text: str) -> None:
        """Append to the module's log pane (the engine's progress and errors) and to Slicer's log."""
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(f"UML: {text}")

    # ------------------------------------------------------------------------------------------ confidence panel

    def clearConfidencePanel(self) -> None:
        for name in ("predictedClassLabel", "probabilityLabel", "verdictLabel", "lesionVolumeLabel", "lesionUncertaintyLabel",
                     "readerLabel"):
            getattr(self.ui, name).text = "-"
        self.ui.verdictLabel.styleSheet = ""
        self.ui.verdictLabel.toolTip = ""
        self.ui.lesionVolumeLabel.toolTip = self.ui.probabilityLabel.toolTip = self.ui.readerLabel.toolTip = ""
        self.ui.uncertaintyProgressBar.value = 0
        self.setBeliefBars(())

    def setBeliefBars(self, beliefs) -> None:
        layout = self.ui.beliefBarsWidget.layout()
        for label, bar in self._beliefBars:
            layout.removeWidget(label)
            layout.removeWidget(bar)
            label.deleteLater()
            bar.deleteLater()
        self._beliefBars = []
        for name, value in beliefs:
            label = qt.QLabel(name)
            bar = qt.QProgressBar()
            bar.setRange(0, 100)
            bar.value = int(round(100 * value))
            bar.format = "%p %"
            layout.addRow(label, bar)
            self._beliefBars.append((label, bar))

    def showConfidencePanel(self, summary: dict) -> None:
        try:
            panel = confidencePanel(summary)
        except ValueError:
            self.clearConfidencePanel()
            return
        self.ui.predictedClassLabel.text = panel.predictedClass
        self.ui.probabilityLabel.text = f"{100 * panel.predictedProbability:.1f} %  ({panel.positiveClass}: {100 * panel.positiveProbability:.1f} %)"
        if panel.singleVolume:
            self.ui.probabilityLabel.text += "; " + panel.singleInputText
        self.ui.probabilityLabel.toolTip = (
            "The case was given as one volume, replicated into all of the model's channels: its opinion is weaker "
            "than from all channels (calibrated for one volume when the model has such a calibration). Give all "
            "phases (or the colour picture) for the full opinion." if panel.singleVolume else "")
        self.setBeliefBars(panel.beliefs)
        self.ui.uncertaintyProgressBar.value = int(round(100 * panel.uncertainty))
        self.ui.verdictLabel.text = panel.verdict.upper() + (" - " + _("input not like the model's") if panel.inputWarning else "")
        self.ui.verdictLabel.styleSheet = f"font-weight: bold; color: {panel.verdictColor}"
        self.ui.verdictLabel.toolTip = (_("Input check: ") + panel.inputWarning) if panel.inputWarning else ""
        self.ui.lesionVolumeLabel.text = panel.lesionSizeText
        byReader = panel.removedBy == "reader"
        if panel.componentsRemoved:  # the model's filter dropped regions: say so, they may matter
            n = panel.componentsRemoved
            kind = "region" + ("s" if n > 1 else "")
            self.ui.lesionVolumeLabel.text += (f"; {n} {kind} not read as lesion removed" if byReader else
                                               f"; {n} uncertain {kind} removed")
        self.ui.lesionVolumeLabel.toolTip = (
            "" if panel.componentsRemoved is None else
            "Segmented regions that the lesion reader did not read as lesions were removed from the segmentation; "
            "they remain visible in the uncertainty map." if byReader else
            "Segmented regions whose mean uncertainty was above the model's threshold were removed before the "
            "case opinion; they remain visible in the uncertainty map.")
        self.ui.lesionUncertaintyLabel.text = "-" if panel.lesionMeanUncertainty is None else f"{100 * panel.lesionMeanUncertainty:.1f} %"
        self.ui.readerLabel.text = panel.readerText or "- (this model has no lesion reader)"
        self.ui.readerLabel.toolTip = panel.readerToolTip

    def updateConfidencePanelFromTable(self, tableNode=None) -> None:
        """Show the summary stored with a results table (so a restored scene shows its confidence panel)."""
        if self._run is not None:
            return
        text = tableNode.GetAttribute(SUMMARY_ATTRIBUTE) if tableNode is not None else None
        if not text:
            self.clearConfidencePanel()
            return
        import json

        try:
            self.showConfidencePanel(json.loads(text))
        except (ValueError, TypeError):
            self.clearConfidencePanel()


#
# UMLSegmentationTest
#


class UMLSegmentationTest(ScriptedLoadableModuleTest):
    """Runs the logic scenario inside Slicer: sample case -> process -> coded segments, grid, table, re-run."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_UMLSegmentation_process()

    def test_UMLSegmentation_process(self):
        import numpy as np

        from UMLSegmentationLib.inputs import ijkToRasArray, volumeDimensions
        from UMLSegmentationLib.outputs import summaryFromTable
        from UMLSegmentationLib.summary import flattenSummary

        self.delayDisplay("Starting the UML test")
        logic = UMLSegmentationLogic()
        missing = logic.missingPythonPackages()
        if missing:
            self.delayDisplay(f"Skipped: Python packages {missing} are not installed (install PyTorch with the PyTorch extension)")
            return
        try:  # the shipped model (Slicer's Python never imports umlcore: the engine runs out of process)
            model = logic.resolveModel(None).path
        except UMLSegmentationError as exc:
            self.delayDisplay(f"Skipped: no UML model is installed ({exc})")
            return
        moduleDir = Path(__file__).resolve().parent
        case = SAMPLE_CASES[0]
        nodes = [slicer.util.loadVolume(str(moduleDir / "Resources" / "SampleData" / f.fileName)) for f in case.files]
        try:
            info = readModelInfo(model)
            result = logic.process(nodes[0], model, "cpu", phaseNodes=nodes[1:], reviewThreshold=0.5)
            segmentation = result.segmentationNode.GetSegmentation()
            names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
            self.assertEqual(names[: len(info.segments)], [s.name for s in info.segments])
            self.assertEqual(volumeDimensions(result.uncertaintyVolumeNode), volumeDimensions(nodes[0]))
            self.assertTrue(np.array_equal(ijkToRasArray(result.uncertaintyVolumeNode), ijkToRasArray(nodes[0])))
            self.assertEqual(summaryFromTable(result.tableNode), flattenSummary(result.summary))
            before = slicer.mrmlScene.GetNumberOfNodes()
            again = logic.process(nodes[0], model, "cpu", phaseNodes=nodes[1:], reviewThreshold=0.5)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
            self.assertEqual(again.segmentationNode.GetID(), result.segmentationNode.GetID())
            self.assertEqual(logic.engines.starts, 1)  # the second run reused the warm engine
        finally:
            logic.shutdownEngine()
        self.delayDisplay("UML test passed")
