"""AttentionMap: where does a 3D Vision Transformer look? Slicer module (GUI and wiring only).

The computation lives in AttentionMapLib (Qt-free): ``worker`` runs the network in a separate worker
process (a Python thread barely runs inside Slicer, see worker.py), ``mrml`` turns results into nodes. This file must import
without torch or MONAI installed (Slicer imports every module at start-up): anything that needs
torch is imported inside functions, after the dependency check.
"""
import importlib.util
import json
import logging
import pathlib
from typing import Annotated, Any, Dict, List, Optional

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer import (vtkMRMLColorNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode,
                    vtkMRMLTableNode)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from AttentionMapLib import AttentionMapError, mrml, worker

MODEL_KINDS = ["demo model", "model card (.json)", "MONAI bundle folder"]
METHODS = ["rollout", "raw", "grad_rollout"]
HEAD_FUSIONS = ["mean", "max", "min", "single head"]
NORMALIZATIONS = ["percentile", "minmax", "none"]
DEVICES = ["auto", "cpu", "cuda"]
MODEL_DEFAULT_TARGET = "(model default)"
TORCH_REQUIREMENT = ">=2.1"
MONAI_REQUIREMENT = "monai[einops]>=1.4"
POLL_INTERVAL_MS = 100
REFUSION_DELAY_MS = 60  # changes arriving faster (slider drags, point drags) are fused once

# Parameters whose change re-reads the cached attention (no network run) / only touches the display.
REFUSION_FIELDS = ("method", "layer", "discardRatio", "normalize", "queryPoint")
DISPLAY_FIELDS = ("opacity", "threshold", "colorNode", "show3D")
RERUN_FIELDS = ("inputVolume", "modelKind", "modelPath", "trustBundle", "headFusion", "head", "targetClass", "device")


class AttentionMap(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Attention Map"
        self.parent.categories = ["Analysis"]
        self.parent.dependencies = []
        self.parent.contributors = ["AttentionMap contributors"]
        self.parent.helpText = """
Shows where a 3D Vision Transformer (MONAI ViT, UNETR, ViTAutoEnc) looked in a CT or MR volume, as a colour
overlay on the slice views.
<ol>
<li>Pick the <b>input volume</b> and a <b>model</b>: the bundled demo (lung lesion classifier on chest CT),
a model card (.json) or a MONAI bundle folder (bundles run code from their configs: tick
<i>trust this bundle</i> only for bundles you trust).</li>
<li>Press <b>Apply</b>. The first time, PyTorch (PyTorch extension) and MONAI are installed after you agree.
The network runs in the background; Apply becomes Cancel.</li>
<li>Explore: method (rollout, raw attention, gradient-weighted rollout), layer, discard ratio and a
<b>query point</b> ("attention from here") update the overlay at once from the cached attention.
Head fusion, target class, model and device need another Apply.</li>
<li>Display: opacity, threshold (fraction of the colour window), colour table, show in 3D.</li>
<li>Segment statistics: pick a segmentation and press <i>Compute</i> for the attention mass, mean and
maximum inside each segment, the segment's volume fraction, their ratio (1 = no better than uniform)
and whether the peak falls inside (pointing game).</li>
<li>Several cases on one colour scale (Python console):
<code>logic = slicer.util.getModuleLogic("AttentionMap"); logic.processCases([ct1, ct2], logic.getParameterNode())</code>.</li>
</ol>
The overlay is the model's token grid with its exact geometry (one voxel per patch); Slicer interpolates it
for display. Attention maps show what the network weighted, not a proof of what drove its decision.
"""
        self.parent.acknowledgementText = """
Built on 3D Slicer, MONAI and PyTorch. Attention rollout after Abnar and Zuidema (2020), gradient-weighted
rollout after Chefer et al. (2021). The demo model was trained on public chest CTs shipped with pyradiomics.
"""


@parameterNodeWrapper
class AttentionMapParameterNode:
    """Everything the user chose; the .ui binds each field through its SlicerParameterName.

    layer: 0 = last layer, k = k-th layer (1-based). head: 1-based, used with "single head".
    threshold: fraction of the display window below which nothing is drawn. targetClass: a class
    name from the model, or "" for the model's default (not bound: the choices come from the model).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelKind: Annotated[str, Choice(MODEL_KINDS)] = MODEL_KINDS[0]
    modelPath: pathlib.Path
    trustBundle: bool = False
    method: Annotated[str, Choice(METHODS)] = "rollout"
    layer: Annotated[int, WithinRange(0, 64)] = 0
    headFusion: Annotated[str, Choice(HEAD_FUSIONS)] = "mean"
    head: Annotated[int, WithinRange(1, 64)] = 1
    discardRatio: Annotated[float, WithinRange(0.0, 0.99)] = 0.0
    normalize: Annotated[str, Choice(NORMALIZATIONS)] = "percentile"
    targetClass: str = ""
    queryPoint: vtkMRMLMarkupsFiducialNode
    outputVolume: vtkMRMLScalarVolumeNode
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    colorNode: vtkMRMLColorNode
    show3D: bool = False
    device: Annotated[str, Choice(DEVICES)] = "auto"
    segmentation: vtkMRMLSegmentationNode
    statisticsTable: vtkMRMLTableNode


class AttentionMapWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = None  # "explain" (the network runs; Apply shows Cancel) or "refuse" (cached attention)
        self._refusePending = False
        self._timer = None
        self._refuseTimer = None
        self._lastValues: Dict[str, Any] = {}
        self._observedQueryNode = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AttentionMap.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AttentionMapLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self._refuseTimer = qt.QTimer()
        self._refuseTimer.setSingleShot(True)
        self._refuseTimer.setInterval(REFUSION_DELAY_MS)
        self._refuseTimer.connect("timeout()", self._refuse)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.statisticsButton.connect("clicked(bool)", self.onStatisticsButton)
        self.ui.scoreButton.connect("clicked(bool)", self.onScoreButton)
        self.ui.targetComboBox.connect("currentIndexChanged(int)", self.onTargetChanged)
        self.ui.queryPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.queryPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        worker.stop_shared_worker()  # Slicer is closing: no worker process may outlive it
        self._timer.stop()
        self._refuseTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        """Stop syncing the GUI; a running job still finishes and is applied (the parameter node stays)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # its result belongs to the scene being closed
            self._job.cancel()
        self.setParameterNode(None)
        self.logic.forgetResult()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not parameterNode.colorNode:
            parameterNode.colorNode = mrml.heat_color_node(slicer.mrmlScene)
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode: Optional[AttentionMapParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            if self.logic.numLayers:  # connectGui set the slider range from the annotation (0..64)
                self.ui.layerSlider.maximum = self.logic.numLayers
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self._lastValues = self._currentValues()
            self.onParameterNodeModified()

    # ------------------------------------------------------------ reacting to the user's choices

    def _currentValues(self) -> Dict[str, Any]:
        p = self._parameterNode
        return {name: getattr(p, name) for name in REFUSION_FIELDS + DISPLAY_FIELDS + RERUN_FIELDS}

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._jobKind == "explain"
        self.ui.applyButton.enabled = running or bool(p.inputVolume)
        self.ui.applyButton.toolTip = "Stop the running model" if running else "Run the model on the input volume"
        self.ui.modelPathLineEdit.enabled = p.modelKind != MODEL_KINDS[0]
        self.ui.modelPathLineEdit.filters = (ctk.ctkPathLineEdit.Dirs if p.modelKind == MODEL_KINDS[2]
                                             else ctk.ctkPathLineEdit.Files)
        self.ui.trustBundleCheckBox.enabled = p.modelKind == MODEL_KINDS[2]
        self.ui.headSpinBox.enabled = p.headFusion == "single head"
        self.ui.statisticsButton.enabled = bool(p.segmentation) and self.logic.result is not None
        self.ui.scoreButton.enabled = self.logic.result is not None
        self.ui.layerValueLabel.text = "last" if p.layer == 0 else str(p.layer)
        self._observeQueryPoint(p.queryPoint)
        values = self._currentValues()
        changed = {name for name in values if values[name] != self._lastValues.get(name)}
        self._lastValues = values
        if changed & {"modelKind", "modelPath"} or self.ui.targetComboBox.count == 0:
            self._showClasses(self.logic.cardClassNames(p), None, None)  # names from the card, before a run
            self.ui.probabilitiesLabel.text = "(press Apply)"
        if running or self.logic.result is None:
            return
        if changed & set(REFUSION_FIELDS):
            self._refuseTimer.start()
        elif changed & set(DISPLAY_FIELDS):
            with slicer.util.tryWithErrorDisplay("Failed to update the display."):
                self.logic.updateDisplay(p)
        elif changed & set(RERUN_FIELDS):
            self.ui.statusLabel.text = "Press Apply to run the network with the new input, model, heads or target."

    def _observeQueryPoint(self, node) -> None:
        if node is self._observedQueryNode:
            return
        events = (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                  slicer.vtkMRMLMarkupsNode.PointRemovedEvent)
        for event in events if self._observedQueryNode is not None else ():
            self.removeObserver(self._observedQueryNode, event, self.onQueryPointMoved)
        self._observedQueryNode = node
        self.ui.queryPlaceWidget.setCurrentNode(node)
        for event in events if node is not None else ():
            self.addObserver(node, event, self.onQueryPointMoved)

    def onQueryPointMoved(self, caller=None, event=None) -> None:
        if self._jobKind != "explain" and self.logic.result is not None:
            self._refuseTimer.start()

    def onTargetChanged(self, index: int) -> None:
        if self._parameterNode is not None:
            text = self.ui.targetComboBox.currentText
            self._parameterNode.targetClass = "" if index <= 0 else text

    def _refuse(self) -> None:
        """Re-read the cached attention with the current options, in the background."""
        if self.logic.result is None or self._parameterNode is None:
            return
        if self._job is not None:  # one at a time: fuse again once the current job is done
            self._refusePending = self._jobKind == "refuse"
            return
        self._startJob("refuse", self.logic.startRefuse(self._parameterNode))

    def _startJob(self, kind: str, job) -> None:
        self._job, self._jobKind = job, kind
        if kind == "explain":
            self._setRunning(True)
        self._timer.start()

    # ------------------------------------------------------------ Apply / Cancel and the background job

    def onApplyButton(self) -> None:
        if self._jobKind == "explain":
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling after the current window..."
            return
        if self._job is not None:  # a re-fusion: its result is dropped, the new run replaces it
            self._job.cancel()
            self._job, self._jobKind, self._refusePending = None, None, False
        with slicer.util.tryWithErrorDisplay("Failed to start the model.", waitCursor=True):
            if not self.ensureDependencies():
                self.ui.statusLabel.text = "PyTorch and MONAI are needed to run a model."
                return
            self._startJob("explain", self.logic.startExplain(self._parameterNode))

    def ensureDependencies(self) -> bool:
        """torch through the PyTorch extension, MONAI through pip - each only after the user agreed."""
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        if slicer.app.testingEnabled():
            raise RuntimeError(f"AttentionMap: missing Python packages in testing mode: {', '.join(missing)}")
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError("AttentionMap needs the PyTorch extension: install it from the Extensions Manager "
                                   "and restart Slicer.")
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                             torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
        if "monai" in missing or "einops" in missing:
            if not slicer.util.confirmOkCancelDisplay(
                    f"AttentionMap needs MONAI. Install it now ({MONAI_REQUIREMENT}, a few minutes)?",
                    windowTitle="Install MONAI"):
                return False
            slicer.util.pip_install(MONAI_REQUIREMENT)
        return not self.logic.missingDependencies()

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        if running:
            self.ui.statusLabel.text = "Running the model in the background..."
        self.onParameterNodeModified()

    def onPoll(self) -> None:
        if self._job is None:
            self._timer.stop()
            return
        kind = self._jobKind
        for event in self._job.poll():
            if event.kind == worker.PROGRESS:
                self.ui.progressBar.value = int(100 * event.value)
                continue
            if event.kind == worker.LOG:
                logging.info(f"AttentionMap worker: {event.value}")
                continue
            self._finish()
            if event.kind == worker.DONE and kind == "explain":
                self._applyResult(event.value)
            elif event.kind == worker.DONE and kind == "score":
                self.ui.scoreLabel.text = self.logic.describeScore(event.value)
            elif kind == "score":
                self.ui.scoreLabel.text = f"Scoring failed: {event.value}"
            elif event.kind == worker.DONE:
                with slicer.util.tryWithErrorDisplay("Failed to show the attention map."):
                    seconds = self.logic.applyRefused(event.value, self._parameterNode)
                    self.ui.statusLabel.text = (f"Updated from the cached attention in {seconds * 1000:.0f} ms "
                                                "(the network was not re-run).")
            elif event.kind == worker.CANCELLED:
                self.ui.statusLabel.text = "Cancelled: nothing was changed."
            elif kind == "refuse":  # e.g. grad_rollout needs gradients captured by a run
                self.ui.statusLabel.text = f"{event.value} - press Apply to run the network again."
            else:
                logging.error(event.detail)
                self.ui.statusLabel.text = f"Failed: {event.value}"
                slicer.util.errorDisplay(f"AttentionMap failed: {event.value}", detailedText=event.detail)
            if self._refusePending:
                self._refusePending = False
                self._refuse()
            return

    def _finish(self) -> None:
        self._timer.stop()
        wasRunning = self._jobKind == "explain"
        self._job, self._jobKind = None, None
        if wasRunning:
            self._setRunning(False)

    def _applyResult(self, result) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to show the attention map."):
            self.logic.applyResult(result, self._parameterNode)
            self._showClasses(result.model.classes, result.attention.probabilities, result.attention.target)
            timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.attention.timings.items())
            self.ui.statusLabel.text = f"Done ({result.attention.num_windows} window(s); {timings})."
            self.ui.layerSlider.maximum = self.logic.numLayers

    def _showClasses(self, classes: List[str], probabilities, target) -> None:
        wasBlocked = self.ui.targetComboBox.blockSignals(True)
        self.ui.targetComboBox.clear()
        self.ui.targetComboBox.addItems([MODEL_DEFAULT_TARGET] + list(classes))
        chosen = self._parameterNode.targetClass
        self.ui.targetComboBox.currentIndex = 1 + classes.index(chosen) if chosen in classes else 0
        self.ui.targetComboBox.blockSignals(wasBlocked)
        if probabilities is None:
            self.ui.probabilitiesLabel.text = "(the model has no class output)"
            return
        lines = [f"{name}: {p:.1%}" + (" (explained)" if i == target else "")
                 for i, (name, p) in enumerate(zip(classes, probabilities))]
        self.ui.probabilitiesLabel.text = "\n".join(lines)

    def onScoreButton(self) -> None:
        if self._job is not None:
            self.ui.scoreLabel.text = "Busy: score again once the current job has finished."
            return
        with slicer.util.tryWithErrorDisplay("Failed to start scoring.", waitCursor=True):
            self.ui.scoreLabel.text = "Scoring the map in the background..."
            self._startJob("score", self.logic.startScore(self._parameterNode))

    def onStatisticsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to compute segment statistics.", waitCursor=True):
            table = self.logic.segmentStatistics(self._parameterNode)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()


class AttentionMapLogic(ScriptedLoadableModuleLogic):
    """A thin adapter: parameter node -> library calls. Usable from the Python console without the GUI:

    logic = AttentionMapLogic(); p = logic.getParameterNode(); p.inputVolume = volumeNode
    logic.process(p)  # blocking; the widget uses startExplain + applyResult instead
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.result = None  # the last worker.ExplainResult, with the VolumeAttention shown now
        self.inputVolume = None  # the volume that result explains
        self._runningInput = None  # the volume of the job started last (becomes inputVolume when applied)
        self.numLayers = 0  # of the model that produced the result

    def getParameterNode(self) -> AttentionMapParameterNode:
        return AttentionMapParameterNode(super().getParameterNode())

    def forgetResult(self) -> None:
        self.result, self.inputVolume, self.numLayers = None, None, 0

    @staticmethod
    def missingDependencies() -> List[str]:
        return [name for name in ("torch", "monai", "einops") if importlib.util.find_spec(name) is None]

    @staticmethod
    def modelSource(p: AttentionMapParameterNode) -> str:
        if p.modelKind == MODEL_KINDS[0]:
            return "demo"
        path = str(p.modelPath)
        if path in ("", "."):
            raise AttentionMapError(f"model: choose a {p.modelKind}")
        return path

    def cardClassNames(self, p: AttentionMapParameterNode) -> List[str]:
        """Class names from the model card (demo or .json) before any run; [] for bundles or unreadable cards."""
        from AttentionMapLib.models import DEMO_CARD  # models imports torch only when loading a network

        try:
            source = self.modelSource(p)
            card = DEMO_CARD if source == "demo" else pathlib.Path(source)
            classes = json.loads(card.read_text(encoding="utf-8")).get("classes") if card.is_file() else None
        except (AttentionMapError, OSError, ValueError, AttributeError):
            return []
        return [str(c) for c in classes] if isinstance(classes, list) else []

    @staticmethod
    def queryRas(p: AttentionMapParameterNode) -> Optional[np.ndarray]:
        node = p.queryPoint
        if node is None or node.GetNumberOfDefinedControlPoints() < 1:
            return None
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(0, position)
        return np.array(position)

    def fusionOptions(self, p: AttentionMapParameterNode) -> Dict[str, Any]:
        """Options that VolumeAttention.refuse can change without re-running the network."""
        return {"method": p.method, "layer": p.layer - 1 if p.layer > 0 else -1, "discard_ratio": p.discardRatio,
                "query_ras": self.queryRas(p), "normalize": p.normalize}

    def explainOptions(self, p: AttentionMapParameterNode) -> Dict[str, Any]:
        single = p.headFusion == "single head"
        return {**self.fusionOptions(p), "head_fusion": "mean" if single else p.headFusion,
                "head": p.head - 1 if single else None, "target": p.targetClass or None}

    def startExplain(self, p: AttentionMapParameterNode) -> worker.WorkerJob:
        """Copy the input (on this, the main thread) and start the model in the worker process."""
        if p.inputVolume is None:
            raise AttentionMapError("input volume: choose a volume")
        array, ijkToRas = mrml.volume_to_array(p.inputVolume)
        self._runningInput = p.inputVolume
        return worker.explain_job(self.modelSource(p), array, ijkToRas, self.explainOptions(p),
                                  trust_bundle=p.trustBundle, device=p.device)

    def applyResult(self, result: worker.ExplainResult, p: AttentionMapParameterNode):
        """Main thread: write the result into the output node (reused or new) and show it."""
        self.result, self.inputVolume = result, self._runningInput
        self.numLayers = result.model.num_layers
        return self._show(result.attention, p)

    def startRefuse(self, p: AttentionMapParameterNode) -> worker.WorkerJob:
        """Re-read the worker's cached attention with the current fusion options (no network run)."""
        return worker.refuse_job(self.result.attention, self.fusionOptions(p))

    def applyRefused(self, attention, p: AttentionMapParameterNode) -> float:
        """Main thread: show a re-fused VolumeAttention in the same output node; returns its fusion seconds."""
        self.result = self.result._replace(attention=attention)
        self._show(attention, p)
        return attention.timings["fuse"]

    def refuse(self, p: AttentionMapParameterNode) -> float:
        """Blocking re-fusion (scripts, self-test); the widget uses startRefuse + applyRefused."""
        return self.applyRefused(self._resultOf(self.startRefuse(p), 600.0), p)

    def _show(self, attention, p: AttentionMapParameterNode):
        name = f"{self.inputVolume.GetName()} attention" if self.inputVolume else "Attention"
        node = mrml.attention_to_volume(attention, slicer.mrmlScene, p.outputVolume, name)
        p.outputVolume = node
        self.updateDisplay(p)
        mrml.show_overlay(node, self.inputVolume, p.opacity)
        return node

    def displayWindow(self):
        grid = self.result.attention.grid
        return (0.0, 1.0) if self.result.attention.normalize != "none" else mrml.shared_window([grid])

    def updateDisplay(self, p: AttentionMapParameterNode) -> None:
        """Colour, window, threshold, opacity and 3D of the output node; the voxels are not touched."""
        node = p.outputVolume
        if node is None or self.result is None:
            return
        low, high = self.displayWindow()
        mrml.configure_display(node, p.colorNode, (low, high), low + p.threshold * (high - low))
        mrml.set_overlay_opacity(slicer.mrmlScene, node, p.opacity)
        mrml.show_volume_rendering(node, p.show3D, p.colorNode, (low, high), logic=self._volumeRenderingLogic())

    @staticmethod
    def _volumeRenderingLogic():
        module = getattr(slicer.modules, "volumerendering", None)
        return module.logic() if module is not None else None

    def startScore(self, p: AttentionMapParameterNode) -> worker.WorkerJob:
        """Deletion / insertion AUC of the current map's method and options, in the worker (on the
        device the network is on), on the model window around the query point (else the attention peak)."""
        if self.result is None or self.inputVolume is None:
            raise AttentionMapError("score: press Apply first")
        attention = self.result.attention
        centre = self.queryRas(p)
        options = {"method": attention.method, "layer": attention.layer, "head_fusion": attention.head_fusion,
                   "head": attention.head, "discard_ratio": attention.discard_ratio,
                   "target": attention.target if attention.target is not None else self.result.model.target}
        return worker.score_job(self.result, attention.peak_ras() if centre is None else centre, options)

    @staticmethod
    def describeScore(scores: Dict[str, Any]) -> str:
        return (f"Deletion AUC {scores['deletion_auc']:.3f} (lower is better), insertion AUC "
                f"{scores['insertion_auc']:.3f} (higher is better); target {scores['target']}, "
                f"baseline {scores['baseline']}, {scores['steps']} steps.")

    def segmentStatistics(self, p: AttentionMapParameterNode):
        if self.result is None:
            raise AttentionMapError("segment statistics: press Apply first")
        table = mrml.segment_statistics(self.result.attention, p.segmentation, self.inputVolume, p.statisticsTable)
        p.statisticsTable = table
        return table

    @staticmethod
    def _resultOf(job: worker.WorkerJob, timeoutSeconds: float):
        final = job.wait(timeoutSeconds)
        if final.kind == worker.ERROR:
            raise final.value
        if final.kind == worker.CANCELLED:
            raise RuntimeError("AttentionMap: the run was cancelled")
        return final.value

    def process(self, p: AttentionMapParameterNode, timeoutSeconds: float = 600.0):
        """Blocking run for scripts and the self-test: start, wait, apply. Returns the output node."""
        return self.applyResult(self._resultOf(self.startExplain(p), timeoutSeconds), p)

    def processCases(self, volumes: List[Any], p: AttentionMapParameterNode, timeoutSeconds: float = 600.0):
        """Several volumes explained with the same options and shown on one colour scale (blocking).

        Maps are not normalised per case (normalize "none"), so colours compare across cases. Nodes
        are made only after every case succeeded. Returns the attention volume nodes.
        """
        options = {**self.explainOptions(p), "normalize": "none"}
        attentions = []
        for volume in volumes:
            array, ijkToRas = mrml.volume_to_array(volume)
            job = worker.explain_job(self.modelSource(p), array, ijkToRas, options, trust_bundle=p.trustBundle,
                                     device=p.device)
            attentions.append(self._resultOf(job, timeoutSeconds).attention)
        return mrml.show_cases(attentions, slicer.mrmlScene, names=[f"{v.GetName()} attention" for v in volumes],
                               color_node=p.colorNode, threshold_fraction=p.threshold)


class AttentionMapTest(ScriptedLoadableModuleTest):
    """Runs the demo model on a synthetic chest-like CT (oblique, anisotropic) with a nodule."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AttentionMap_demo()

    def _phantom(self):
        """Body (40 HU) with two lungs (-850 HU) and a 12 mm nodule (30 HU) in the right lung; node + nodule RAS."""
        shape = (160, 128, 48)  # I, J, K
        spacing = np.array([1.1, 1.3, 5.0])
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1) * spacing
        centre = np.array(shape) * spacing / 2
        array = np.full(shape, -1000.0, np.float32)
        array[np.sum(((ijk - centre) / (centre * [0.9, 0.8, 2.0])) ** 2, axis=-1) < 1] = 40.0
        for side in (-1, 1):
            lung = centre + [side * 0.42 * centre[0], 0, 0]
            array[np.sum(((ijk - lung) / (centre * [0.33, 0.55, 1.5])) ** 2, axis=-1) < 1] = -850.0
        nodule = centre + [-0.42 * centre[0], 10.0, 20.0]
        array[np.linalg.norm(ijk - nodule, axis=-1) < 12.0] = 30.0
        ijkToRas = np.eye(4)
        angle = np.radians(15)
        ijkToRas[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                                     [0, 0, 1]]) @ np.diag(spacing)
        ijkToRas[:3, 3] = -ijkToRas[:3, :3] @ (np.array(shape) / 2)
        node = slicer.util.addVolumeFromArray(array.transpose(2, 1, 0).copy(), ijkToRAS=ijkToRas, name="Phantom CT")
        return node, (ijkToRas @ np.append(nodule / spacing, 1.0))[:3]

    def test_AttentionMap_demo(self):
        self.delayDisplay("Starting the test")
        volume, noduleRas = self._phantom()
        inputState = slicer.util.arrayFromVolume(volume).copy()
        logic = AttentionMapLogic()
        p = logic.getParameterNode()
        p.inputVolume = volume
        p.method = "rollout"
        p.device = "cpu"
        output = logic.process(p)
        attention = logic.result.attention

        # geometry: the output node is the token grid with the grid's exact IJK-to-RAS
        matrix = vtk.vtkMatrix4x4()
        output.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), attention.ijk_to_ras, atol=1e-6)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(output).transpose(2, 1, 0), attention.grid)
        # the peak: the node's brightest voxel is where the library says, inside the scanned volume
        peakIjk = np.unravel_index(int(np.argmax(attention.grid)), attention.grid.shape)
        np.testing.assert_allclose(matrix.MultiplyPoint((*map(float, peakIjk), 1.0))[:3], attention.peak_ras(),
                                   atol=1e-6)
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        for axis in range(3):
            self.assertTrue(bounds[2 * axis] <= attention.peak_ras()[axis] <= bounds[2 * axis + 1])
        self.assertEqual(len(attention.probabilities), len(logic.result.model.classes))
        self.assertTrue(np.all((attention.probabilities >= 0) & (attention.probabilities <= 1)))
        logging.info(f"AttentionMap self-test: peak {attention.peak_ras()}, nodule {noduleRas}, "
                     f"distance {np.linalg.norm(attention.peak_ras() - noduleRas):.1f} mm")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), inputState)

        # re-fusion: a layer change re-reads the cached attention, same node, equals a fresh run
        self.delayDisplay("Re-fusion")
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        p.layer = 1
        logic.refuse(p)
        self.assertEqual(logic.result.attention.timings["forward"], 0.0)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        refused = slicer.util.arrayFromVolume(output).copy()
        fresh = logic.process(p)
        self.assertEqual(fresh.GetID(), output.GetID())
        np.testing.assert_allclose(slicer.util.arrayFromVolume(output), refused, atol=1e-5)

        # segment statistics: a sphere segment at the nodule
        self.delayDisplay("Segment statistics")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Nodule")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        sphere = vtk.vtkSphereSource()
        sphere.SetCenter(*noduleRas)
        sphere.SetRadius(12.0)
        sphere.Update()
        segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "nodule", [1.0, 0.0, 0.0])
        p.segmentation = segmentation
        table = logic.segmentStatistics(p)
        rows = mrml.read_table(table)
        self.assertEqual(list(rows), ["nodule"])
        segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertAlmostEqual(rows["nodule"]["volume_fraction"], float(np.count_nonzero(mask)) / mask.size, places=4)
        self.assertTrue(0.0 <= rows["nodule"]["mass_fraction"] <= 1.0)
        self.delayDisplay("Test passed")
