"""AttentionMap: where does a 3D Vision Transformer look? Slicer module (GUI and wiring only).

The computation lives in AttentionMapLib (Qt-free): ``worker`` runs the network in a separate worker
process (a Python thread barely runs inside Slicer, see worker.py), ``mrml`` turns results into
nodes, ``dependencies`` and ``module_logic`` hold the module's decisions. This file must import
without torch or MONAI installed (Slicer imports every module at start-up), and the GUI process
never imports them: only the worker process does.
"""
import importlib
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Annotated, Any, Dict, List, Optional, Union

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLColorTableNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLProceduralColorNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from AttentionMapLib import AttentionMapError, dependencies, module_logic, mrml, render, worker, worker_environment
from AttentionMapLib.core.method_registry import get_method, method_names
from AttentionMapLib.core.numbering import layer_index

try:  # as Slicer's scripted-module template (v5.8.0 Utilities/Templates/Modules/Scripted/TemplateKey.py)
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # a Slicer (or slicer-core) without translations: the text as written
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

MODEL_KINDS = ["demo model", "model card (.json)", "MONAI bundle folder"]
METHODS = list(method_names())  # the method registry (torch-free)
HEAD_FUSIONS = ["mean", "max", "min", "single head"]
NORMALIZATIONS = ["percentile", "minmax", "none"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
# test-time averaging: the model card's default_flip_axes and default_shift_average (the demo card's: the 8 flips and
# the 7 half-patch shifts), none, the 8 flips, or both; TEST_TIME_VIEWS gives each choice's explain options flip_axes
# and shift_average (flips.flip_axes_from_spec, shifts.shift_average_from_spec, resolved in the worker)
TEST_TIME_AVERAGING = ["model default", "off", "8 flips", "8 flips + half-patch shifts"]
TEST_TIME_VIEWS = {
    "model default": {"flip_axes": "default", "shift_average": "default"},
    "off": {"flip_axes": "none", "shift_average": "off"},
    "8 flips": {"flip_axes": [0, 1, 2], "shift_average": "off"},
    "8 flips + half-patch shifts": {"flip_axes": [0, 1, 2], "shift_average": "on"},
}
MODEL_DEFAULT_TARGET = "(model default)"
POLL_INTERVAL_MS = 100
WORKER_PYTHON_SETTING = "AttentionMap/WorkerPython"  # application settings (qt.QSettings), never the scene
FUSE_AGAIN_DELAY_MS = 60  # changes arriving faster (slider drags, point drags) are fused once

# Parameters whose change re-reads the cached attention (no network run) / only touches the display.
FUSE_AGAIN_FIELDS = ("method", "layer", "discardRatio", "normalize", "queryPoint")
DISPLAY_FIELDS = ("opacity", "threshold", "colorNode", "show3D")
RERUN_FIELDS = ("inputVolume", "modelKind", "modelPath", "headFusion", "head", "targetClass", "device",
                "testTimeAveraging", "explainSegment", "targetSegmentation", "targetSegmentId")


class AttentionMap(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Attention Map")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Analysis")]
        self.parent.dependencies = ["Markups", "Segmentations", "Tables", "VolumeRendering"]
        self.parent.contributors = ["AttentionMap contributors"]
        self.parent.helpText = _("""
Shows where a 3D Vision Transformer (MONAI ViT, UNETR, ViTAutoEnc) looked in a CT or MR volume, as a colour
overlay on the slice views.
<ol>
<li>Pick the <b>input volume</b> and a <b>model</b>: the bundled demo (lung lesion classifier on chest CT),
a model card (.json) or a MONAI bundle folder (bundles run code from their configs: tick
<i>trust this bundle</i> only for bundles you trust).</li>
<li>Press <b>Apply</b>. The first time, PyTorch (PyTorch extension) and MONAI are installed after you agree
(one question for everything). The network runs in a separate worker process; Apply becomes Cancel.
Its messages are in <i>Details</i>.</li>
<li>Explore: method (rollout, raw attention, gradient-weighted rollout), layer, discard ratio and a
<b>query point</b> ("attention from here") update the overlay at once from the cached attention.
Head fusion, target class, model, device and <i>Test-time averaging</i> (maps and probabilities averaged over
the 8 flips of each window and its 7 half-patch shifts: up to 15 network passes per window)
need another Apply.</li>
<li>Display: opacity, threshold (fraction of the colour window), colour table, show in 3D.</li>
<li>Segment statistics: pick a segmentation and press <i>Compute</i> for the attention mass, mean and
maximum inside each segment, the segment's volume fraction, their ratio (1 = no better than uniform)
and whether the peak falls inside (pointing game).</li>
<li>Several cases on one colour scale (Python console):
<code>logic = slicer.util.getModuleLogic("AttentionMap");
logic.processCases([ct1, ct2], logic.getParameterNode())</code>.</li>
</ol>
The overlay is the model's token grid with its exact geometry (one voxel per patch); Slicer interpolates it
for display. Attention maps show what the network weighted, not a proof of what drove its decision.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer, MONAI and PyTorch. Attention rollout after Abnar and Zuidema (2020), gradient-weighted
rollout after Chefer et al. (2021). The demo model was trained on public chest CTs shipped with pyradiomics.
""")


@parameterNodeWrapper
class AttentionMapParameterNode:
    """Everything the user chose; the .ui binds each field through its SlicerParameterName.

    layer: k = k-th block (1-based, as on the command line), 0 = the slider's "last" position (-1).
    head: 0-based (as on the command line), used with "single head". See AttentionMapLib.core.numbering.
    threshold: fraction of the display window below which nothing is drawn. targetClass: a class
    name from the model, or "" for the model's default (not bound: the choices come from the model).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    # no trust flag here: a parameter node is saved with the scene, and a scene file must never carry "trusted" to a
    # bundle; the logic's trustedBundle holds it for this session, for the one bundle path it was given for
    modelKind: Annotated[str, Choice(MODEL_KINDS)] = MODEL_KINDS[0]
    modelPath: pathlib.Path
    method: Annotated[str, Choice(METHODS)] = "rollout"
    layer: Annotated[int, WithinRange(0, 64)] = 0
    headFusion: Annotated[str, Choice(HEAD_FUSIONS)] = "mean"
    head: Annotated[int, WithinRange(0, 63)] = 0
    discardRatio: Annotated[float, WithinRange(0.0, 0.99)] = 0.0
    normalize: Annotated[str, Choice(NORMALIZATIONS)] = "percentile"
    targetClass: str = ""
    queryPoint: vtkMRMLMarkupsFiducialNode
    # where to look: a markups ROI or a segmentation (a Union with None binds a qMRMLNodeComboBox, as colorNode)
    region: Union[vtkMRMLMarkupsROINode, vtkMRMLSegmentationNode, None]
    useDefaultRegion: bool = True
    # test-time averaging (explain_volume flip_axes, shift_average; TEST_TIME_AVERAGING): a str with a Choice binds
    # the .ui's QComboBox and fills its items from the choices
    # (Slicer v5.8.0 Base/Python/slicer/parameterNodeWrapper/guiConnectors.py:355-379, QComboBoxToStringableConnector)
    testTimeAveraging: Annotated[str, Choice(TEST_TIME_AVERAGING)] = "model default"
    outputVolume: vtkMRMLScalarVolumeNode
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    # the qMRMLNodeComboBox connector sets the combo box's nodeTypes to the annotation's classes
    # (Slicer v5.8.0 parameterNodeWrapper/guiConnectors.py: nodeTypes = getNodeTypes(datatype)): an abstract
    # vtkMRMLColorNode would match no node, so the concrete classes are named (a Union with None, as Slicer's own
    # Base/Python/slicer/tests/test_slicer_parameter_node_wrapper_guis.py binds one to a qMRMLNodeComboBox)
    colorNode: Union[vtkMRMLColorTableNode, vtkMRMLProceduralColorNode, None]
    show3D: bool = False
    device: Annotated[str, Choice(DEVICES)] = "auto"
    segmentation: vtkMRMLSegmentationNode
    statisticsTable: vtkMRMLTableNode
    # why this segment: the target class over one segment (targetSegmentSelector, a qMRMLSegmentSelectorWidget: no
    # parameterNodeWrapper connector exists for it in Slicer v5.12.3 Base/Python/slicer/parameterNodeWrapper/
    # guiConnectors.py, so the widget keeps these two in step by its signals), or over the network's own labels
    explainSegment: bool = False
    targetSegmentation: vtkMRMLSegmentationNode
    targetSegmentId: str = ""
    # the network's own labels (segmentation models), reused at each Apply
    showNetworkLabels: bool = True
    networkSegmentation: vtkMRMLSegmentationNode


def _nodeId(node) -> str:
    return node.GetID() if node is not None else ""


class AttentionMapWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = None  # "explain" | "score" (the network runs) | "fuse_again" (cached attention); one at a time
        self._fuseAgainPending = False
        self._applyPending = False  # Apply pressed while a re-fusion finished: run once it has
        self._timer = None
        self._fuseAgainTimer = None
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
        self._fuseAgainTimer = qt.QTimer()
        self._fuseAgainTimer.setSingleShot(True)
        self._fuseAgainTimer.setInterval(FUSE_AGAIN_DELAY_MS)
        self._fuseAgainTimer.connect("timeout()", self._fuseAgain)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.statisticsButton.connect("clicked(bool)", self.onStatisticsButton)
        self.ui.scoreButton.connect("clicked(bool)", self.onScoreButton)
        self.ui.targetComboBox.connect("currentIndexChanged(int)", self.onTargetChanged)
        # qMRMLSegmentSelectorWidget signals (Slicer v5.12.3 Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.h:150-151)
        self.ui.targetSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTargetSegmentChanged)
        self.ui.targetSegmentSelector.connect("currentSegmentChanged(QString)", self.onTargetSegmentChanged)
        self.ui.queryPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.queryPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.progressBar.setVisible(False)
        self.ui.methodComboBox.toolTip = "; ".join(f"{m}: {get_method(m).display_name}" for m in METHODS)
        self.ui.workerPythonPathLineEdit.currentPath = str(qt.QSettings().value(WORKER_PYTHON_SETTING, "") or "")
        self.onWorkerPythonChanged(self.ui.workerPythonPathLineEdit.currentPath)
        self.ui.workerPythonPathLineEdit.connect("currentPathChanged(QString)", self.onWorkerPythonChanged)
        self.ui.checkWorkerPythonButton.connect("clicked(bool)", self.onCheckWorkerPython)
        self.ui.trustBundleCheckBox.connect("toggled(bool)", self.onTrustBundleToggled)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Slicer is closing (or the module reloads): stop the job and the worker process with its children."""
        if self._job is not None:
            self._job.cancel()
        worker.stop_shared_worker()
        self._timer.stop()
        self._fuseAgainTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        """Nothing to undo: the GUI stays connected to its parameter node while the module is hidden (a running
        job still finishes and is applied). Disconnecting here and connecting again in enter() would stack a
        second set of connectors on Slicer 5.8, whose connectGui returns no tag and whose disconnectGui removes
        nothing (v5.8.0 Base/Python/slicer/parameterNodeWrapper/wrapper.py _connectGui), and VTKObservationMixin
        would warn "does not have observer" when the node is set again (v5.12.3 Base/Python/slicer/util.py)."""

    def onSceneStartClose(self, caller, event) -> None:
        """The running job's result belongs to the scene being closed: cancel it. A cancelled job never
        hands out its result, even one that had already arrived (worker.WorkerJob.cancel)."""
        if self._job is not None:
            self._job.cancel()
        self._fuseAgainPending = self._applyPending = False
        self.setParameterNode(None)
        self.logic.forgetResult()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Defaults for a new scene; the heat colour table is made with the first result, not here."""
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode: Optional[AttentionMapParameterNode]) -> None:
        """Connect the GUI to ``parameterNode`` once; the same node again (enter() after exit()) changes nothing."""
        if parameterNode is not None and self._parameterNode is not None and \
                parameterNode.parameterNode is self._parameterNode.parameterNode:
            return
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:  # None on Slicer 5.8: nothing to disconnect there
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self._lastValues = self._currentValues()
            self._showModelInfo()  # connectGui reset the layer and head ranges to the annotation's (0..64)
            self.onParameterNodeModified()

    # ------------------------------------------------------------ reacting to the user's choices

    def _currentValues(self) -> Dict[str, Any]:
        p = self._parameterNode
        return {name: getattr(p, name) for name in FUSE_AGAIN_FIELDS + DISPLAY_FIELDS + RERUN_FIELDS}

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running, scoring = self._jobKind == "explain", self._jobKind == "score"
        self.ui.applyButton.enabled = running or (not scoring and bool(p.inputVolume))
        self.ui.applyButton.toolTip = _("Stop the running model") if running else _("Run the model on the input volume")
        self.ui.modelPathLineEdit.enabled = p.modelKind != MODEL_KINDS[0]
        self.ui.modelPathLineEdit.filters = (ctk.ctkPathLineEdit.Dirs if p.modelKind == MODEL_KINDS[2]
                                             else ctk.ctkPathLineEdit.Files)
        self.ui.trustBundleCheckBox.enabled = p.modelKind == MODEL_KINDS[2]
        if self.ui.trustBundleCheckBox.checked != self.logic.bundleTrusted(p):  # another model: trust is gone
            self.ui.trustBundleCheckBox.checked = self.logic.bundleTrusted(p)
        self.ui.headSpinBox.enabled = p.headFusion == "single head"
        self._showTargetSegment(p)
        self.ui.statisticsButton.enabled = bool(p.segmentation) and self.logic.result is not None
        self.ui.scoreButton.enabled = scoring or (self._job is None and self.logic.result is not None)
        self.ui.scoreButton.text = _("Cancel scoring") if scoring else _("Score the map")
        self.ui.layerValueLabel.text = _("last") if p.layer == 0 else str(p.layer)
        self._observeQueryPoint(p.queryPoint)
        values = self._currentValues()
        changed = {name for name in values if values[name] != self._lastValues.get(name)}
        self._lastValues = values
        if changed & {"modelKind", "modelPath"} or self.ui.targetComboBox.count == 0:
            self._showModelInfo()
        if running or self.logic.result is None:
            return  # changes made meanwhile are applied once the result is (see _applyResult)
        if changed & set(FUSE_AGAIN_FIELDS):
            self._fuseAgainTimer.start()
        elif changed & set(DISPLAY_FIELDS):
            with slicer.util.tryWithErrorDisplay(_("Failed to update the display.")):
                self.logic.updateDisplay(p)
        elif changed & set(RERUN_FIELDS):
            self.ui.statusLabel.text = _("Press Apply to run the network with the new input, model, heads, target or "
                                         "test-time averaging.")

    def _showModelInfo(self) -> None:
        """Class names and layer / head ranges: from the last result's model, else from the model card."""
        p = self._parameterNode
        summary = self.logic.modelSummary(p)
        if summary.num_layers:
            self.ui.layerSlider.maximum = summary.num_layers
        if summary.num_heads:
            self.ui.headSpinBox.maximum = summary.num_heads - 1
        if not self.logic.resultIsOfModel(p):
            self._showClasses(summary.classes, None, None)
            self.ui.probabilitiesLabel.text = _("(press Apply)")

    def _observeQueryPoint(self, node) -> None:
        if node is self._observedQueryNode:
            return
        events = (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                  slicer.vtkMRMLMarkupsNode.PointRemovedEvent)
        for event in events if self._observedQueryNode is not None else ():
            self.removeObserver(self._observedQueryNode, event, self.onQueryPointMoved)
        self._observedQueryNode = node
        self.ui.queryPlaceWidget.setCurrentNode(node)
        if node is not None:
            mrml.keep_newest_control_point(node)
        for event in events if node is not None else ():
            self.addObserver(node, event, self.onQueryPointMoved)

    def onQueryPointMoved(self, caller=None, event=None) -> None:
        if caller is not None and mrml.keep_newest_control_point(caller):
            return  # placed again: the older point was removed, whose event re-fuses
        if self._jobKind != "explain" and self.logic.result is not None:
            self._fuseAgainTimer.start()

    def onTargetSegmentChanged(self, *_args) -> None:
        """The segment selector changed: copy its segmentation node and segment ID into the parameter node."""
        p, selector = self._parameterNode, self.ui.targetSegmentSelector
        if p is None:
            return
        if _nodeId(p.targetSegmentation) != (selector.currentNodeID() or ""):  # no Modified event when unchanged
            p.targetSegmentation = selector.currentNode()
        if p.targetSegmentId != (selector.currentSegmentID() or ""):
            p.targetSegmentId = selector.currentSegmentID() or ""

    def _showTargetSegment(self, p: AttentionMapParameterNode) -> None:
        """The segment selector shows the parameter node's segment (a loaded scene, another parameter node)."""
        selector, wanted = self.ui.targetSegmentSelector, p.targetSegmentId
        selector.enabled = self.ui.targetSegmentLabel.enabled = p.explainSegment
        if (selector.currentNodeID() or "") != _nodeId(p.targetSegmentation):
            selector.setCurrentNode(p.targetSegmentation)  # selects the node's first segment: the saved one below
        if wanted and selector.currentSegmentID() != wanted:
            selector.setCurrentSegmentID(wanted)

    def onTargetChanged(self, index: int) -> None:
        if self._parameterNode is not None:
            text = self.ui.targetComboBox.currentText
            self._parameterNode.targetClass = "" if index <= 0 else text

    def _fuseAgain(self) -> None:
        """Re-read the worker's cached attention with the current options (no network run)."""
        if self.logic.result is None or self._parameterNode is None:
            return
        if self._job is not None:  # one job at a time: fuse again once the current job is done
            self._fuseAgainPending = self._jobKind == "fuse_again"
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to update the attention map.")):
            self._startJob("fuse_again", self.logic.startFuseAgain(self._parameterNode))

    def _startJob(self, kind: str, job) -> None:
        self._job, self._jobKind = job, kind
        if kind == "explain":
            self._setRunning(True)
        self.onParameterNodeModified()
        self._timer.start()

    # ------------------------------------------------------------ Apply / Cancel and the background job

    def onApplyButton(self) -> None:
        if self._jobKind == "explain":
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling after the current window...")
            return
        if self._jobKind == "score":
            return  # Apply is disabled while scoring: the worker runs one network at a time
        if self._jobKind == "fuse_again":  # its result is dropped; the run starts once the worker is free
            self._job.cancel()
            self._fuseAgainPending, self._applyPending = False, True
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the model.")):
            # the question is asked without the wait cursor; installing and starting run under it
            if not self.logic.installDependencies(askConsent=not slicer.app.testingEnabled()):
                self.ui.statusLabel.text = _("PyTorch and MONAI are needed to run a model.")
                return
            with slicer.util.WaitCursor():
                self._startJob("explain", self.logic.startExplain(self._parameterNode))

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        if running:
            self.ui.statusLabel.text = _("Running the model in the worker process...")
        self.onParameterNodeModified()

    def _log(self, text: str) -> None:
        """A line in the Details area (the worker's messages, errors with their traceback)."""
        self.ui.logTextEdit.appendPlainText(f"{time.strftime('%H:%M:%S')} {text}")
        logging.info(f"AttentionMap: {text}")

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
                self._log(event.value)
                continue
            self._finish()
            try:
                self._showFinal(kind, event)
            except Exception:  # shown by tryWithErrorDisplay already; it re-raises (v5.12.3 slicer/util.py)
                logging.exception("AttentionMap: showing the result failed")
            finally:  # a pending Apply or re-fusion runs even when showing this result failed
                applyPending, fuseAgainPending = self._applyPending, self._fuseAgainPending
                self._applyPending = self._fuseAgainPending = False
            if applyPending:
                self.onApplyButton()
            elif fuseAgainPending:
                self._fuseAgain()
            return

    def _showFinal(self, kind: str, event) -> None:
        if event.kind == worker.DONE and kind == "explain":
            self._applyResult(event.value)
        elif event.kind == worker.DONE and kind == "score":
            self.ui.scoreLabel.text = self.logic.describeScore(event.value)
        elif event.kind == worker.DONE:
            with slicer.util.tryWithErrorDisplay(_("Failed to show the attention map.")):
                seconds = self.logic.applyFusedAgain(event.value, self._parameterNode)
                self.ui.statusLabel.text = _("Updated from the cached attention in {ms} ms (the network was not "
                                             "re-run).").format(ms=f"{seconds * 1000:.0f}")
        elif event.kind == worker.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled: nothing was changed.")
            if kind == "score":
                self.ui.scoreLabel.text = _("Scoring cancelled.")
        else:
            self._log(f"{event.value}\n{event.detail}")
            if kind == "score":
                self.ui.scoreLabel.text = _("Scoring failed: {error}").format(error=event.value)
            elif kind == "fuse_again":  # e.g. grad_rollout needs gradients captured by a run
                self.ui.statusLabel.text = _("{error} - press Apply to run the network again.").format(
                    error=event.value
                )
            else:
                self.ui.statusLabel.text = _("Failed: {error}").format(error=event.value)
                slicer.util.errorDisplay(_("AttentionMap failed: {error}").format(error=event.value),
                                         detailedText=event.detail)

    def _finish(self) -> None:
        self._timer.stop()
        wasRunning = self._jobKind == "explain"
        self._job, self._jobKind = None, None
        if wasRunning:
            self._setRunning(False)
        else:
            self.onParameterNodeModified()

    def _applyResult(self, result) -> None:
        p = self._parameterNode
        if p is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to show the attention map.")):
            self.logic.applyResult(result, p)
            self._showClasses(result.model.classes, result.attention.probabilities, result.attention.target)
            self._showPrediction(result.attention)
            timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.attention.timings.items())
            self.ui.statusLabel.text = _("Done on {device} ({windows} window(s); {timings}).").format(
                device=result.model.device, windows=result.attention.num_windows, timings=timings)
            self._showModelInfo()
            # options changed while the job ran were not applied then: fuse once more if the map differs
            if module_logic.fusion_differs(result.attention, self.logic.fusionOptions(p), self.logic.numLayers):
                self._fuseAgainTimer.start()

    def _showClasses(self, classes: List[str], probabilities, target) -> None:
        wasBlocked = self.ui.targetComboBox.blockSignals(True)
        self.ui.targetComboBox.clear()
        self.ui.targetComboBox.addItems([MODEL_DEFAULT_TARGET] + list(classes))
        chosen = self._parameterNode.targetClass
        self.ui.targetComboBox.currentIndex = 1 + classes.index(chosen) if chosen in classes else 0
        self.ui.targetComboBox.blockSignals(wasBlocked)
        if probabilities is None:
            self.ui.probabilitiesLabel.text = _("(the model has no class output)")
            return
        lines = [f"{name}: {p:.1%}" + (_(" (explained)") if i == target else "")
                 for i, (name, p) in enumerate(zip(classes, probabilities))]
        self.ui.probabilitiesLabel.text = "\n".join(lines)

    def _showPrediction(self, attention) -> None:
        """One volume-level number and the window it comes from; the region the map is restricted to."""
        prediction, region = attention.prediction, attention.region
        domain = (prediction or {}).get("domain")
        lines = []
        if prediction and prediction["probability"] is None:  # no window like the training windows
            lines.append(_("Volume: no confident P({name}): {rule}").format(name=prediction["class"],
                                                                          rule=prediction["rule"]))
        elif prediction:
            x, y, z = prediction["window_centre_ras_mm"]
            lines.append(_("Volume: P({name}) = {p:.1%} in the window centred at RAS ({x:.0f}, {y:.0f}, {z:.0f}) mm "
                           "(the highest of {n} window(s){calibrated})").format(
                name=prediction["class"], p=prediction["probability"], x=x, y=y, z=z,
                n=domain["windows_with_lung"] if domain else prediction["windows"],
                calibrated=_(", calibrated") if prediction["temperature"] != 1.0 else ""))
        if domain:
            lines.append(_("Input: {summary} ({n} of {total} window(s) hold lung)").format(
                summary=domain["summary"], n=domain["windows_with_lung"], total=domain["windows"]))
        lines.append(
            _("Region: {description}; the map is 0 outside it ({skipped} window(s) skipped)").format(
                description=region.description, skipped=region.windows_skipped
            )
            if region
            else _("Region: the whole volume")
        )
        self.ui.probabilitiesLabel.text = "\n".join(lines + [self.ui.probabilitiesLabel.text])

    def onTrustBundleToggled(self, checked: bool) -> None:
        if self._parameterNode is not None:
            self.logic.trustBundle(self._parameterNode, bool(checked))

    def onWorkerPythonChanged(self, path: str) -> None:
        """The Worker Python setting: saved in the application settings (never in a scene, which could carry a
        path to run), used by the next worker started (a running worker of another interpreter stops)."""
        path = str(path or "").strip()
        qt.QSettings().setValue(WORKER_PYTHON_SETTING, path)
        self.logic.workerPythonInfo = None
        try:
            worker.set_worker_python(path)
        except AttentionMapError as error:
            self.ui.workerPythonInfoLabel.text = str(error)
            return
        self.ui.workerPythonInfoLabel.text = (_("{path}: press the check button to see its versions and device.")
                                              .format(path=path) if path else _("Slicer's own Python (PythonSlicer)."))

    def onCheckWorkerPython(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The worker Python cannot be used."), waitCursor=True):
            info = self.logic.checkWorkerPython(self.ui.workerPythonPathLineEdit.currentPath)
            self.ui.workerPythonInfoLabel.text = info.summary()

    def onScoreButton(self) -> None:
        if self._jobKind == "score":
            self._job.cancel()
            self.ui.scoreLabel.text = _("Cancelling...")
            return
        if self._job is not None:
            self.ui.scoreLabel.text = _("Busy: score again once the current job has finished.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start scoring."), waitCursor=True):
            self.ui.scoreLabel.text = _("Scoring the map in the worker process...")
            self._startJob("score", self.logic.startScore(self._parameterNode))

    def onStatisticsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute segment statistics."), waitCursor=True):
            table = self.logic.segmentStatistics(self._parameterNode)
            # a layout with a table view, as SegmentStatistics shows its table (Slicer v5.8.0
            # Modules/Scripted/SegmentStatistics/SegmentStatistics.py, showTable): Conventional has none
            layoutManager = slicer.app.layoutManager()
            layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
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
        self.resultSource = None  # the model source ("demo", a card or bundle path) that made the result
        self._runningSource = None
        self.numLayers = 0  # of the model that produced the result
        self.workerPythonInfo = None  # what the worker Python reported when it was last checked
        self.trustedBundle = None  # the bundle folder the user trusted in this session (never saved with a scene)

    def getParameterNode(self) -> AttentionMapParameterNode:
        return AttentionMapParameterNode(super().getParameterNode())

    def forgetResult(self) -> None:
        self.result, self.inputVolume, self.resultSource, self.numLayers = None, None, None, 0

    def checkWorkerPython(self, path: str) -> "worker_environment.WorkerPythonInfo":
        """Run the interpreter ``path`` once (never importing torch here) and keep what it reported."""
        self.workerPythonInfo = worker_environment.check_worker_python(worker.worker_python(path))
        return self.workerPythonInfo

    def installDependencies(self, askConsent: bool = True) -> bool:
        """Make sure the worker can run; True when it can.

        With a worker Python set (Advanced > Worker Python, or $ATTENTIONMAP_WORKER_PYTHON) nothing is installed
        into Slicer: that interpreter is checked by running it once. Otherwise the plan for Slicer's own Python
        (dependencies.plan_dependencies: versions from importlib.metadata, nothing imported) is installed after one
        consent (asked without the wait cursor; in testing mode without asking), or its problems are raised with
        what to do instead."""
        configured = worker.configured_python()
        if configured:
            known = self.workerPythonInfo
            info = known if known is not None and known.path == configured else self.checkWorkerPython(configured)
            if info.problems:
                raise AttentionMapError("\n".join(info.problems))
            return True
        plan = dependencies.plan_dependencies(dependencies.installed_versions(), torch_loaded="torch" in sys.modules)
        if plan.problems:
            raise AttentionMapError(plan.problem_text())
        if not plan.needed:
            return True
        if askConsent and not slicer.util.confirmOkCancelDisplay(plan.consent_text(),
                                                                 windowTitle=_("Install Python packages")):
            return False
        with slicer.util.WaitCursor(), tempfile.TemporaryDirectory(prefix="attentionmap-pip-") as folder:
            if plan.torch_arguments and not self._pipInstall(plan.torch_arguments):
                return False
            if plan.pip_arguments:  # with --require-hashes: only the wheels whose sha256 the plan records
                requirements = os.path.join(folder, "requirements.txt")
                with open(requirements, "w") as file:
                    file.write(plan.hashed_requirements())
                if not self._pipInstall(plan.hashed_arguments(requirements)):
                    return False
        worker.stop_shared_worker()  # a worker started before the installs would still see the old packages
        importlib.invalidate_caches()
        remaining = dependencies.plan_dependencies(dependencies.installed_versions())
        return not remaining.needed and not remaining.problems

    @staticmethod
    def _pipInstall(arguments: List[str]) -> bool:
        """slicer.util.pip_install; False when it failed and Slicer already said so. From Slicer 5.12 it forwards
        to slicer.packaging.pip_install, which shows its own progress and error dialogs before raising
        CalledProcessError (v5.12.3 Base/Python/slicer/packaging.py): a second error box would repeat it. Earlier
        Slicers raise without a dialog (v5.10.0 Base/Python/slicer/util.py pip_install), so the error goes on."""
        try:
            slicer.util.pip_install(arguments)
        except subprocess.CalledProcessError as error:
            if (slicer.app.majorVersion, slicer.app.minorVersion) >= (5, 12):
                logging.error(f"AttentionMap: pip install {' '.join(arguments)} failed (exit code {error.returncode})")
                return False
            raise AttentionMapError(f"pip install {' '.join(arguments)} failed (exit code {error.returncode}); "
                                    "the Python console shows pip's output") from None
        return True

    def trustBundle(self, p: AttentionMapParameterNode, trusted: bool) -> None:
        """Trust (or stop trusting) the bundle folder chosen now; any other model is untrusted."""
        self.trustedBundle = str(p.modelPath) if trusted and p.modelKind == MODEL_KINDS[2] else None

    def bundleTrusted(self, p: AttentionMapParameterNode) -> bool:
        """True only for the very bundle folder the user trusted (choosing another model resets the trust)."""
        return p.modelKind == MODEL_KINDS[2] and self.trustedBundle is not None and \
            self.trustedBundle == str(p.modelPath)

    @staticmethod
    def modelSource(p: AttentionMapParameterNode) -> str:
        if p.modelKind == MODEL_KINDS[0]:
            return "demo"
        path = str(p.modelPath)
        if path in ("", "."):
            raise AttentionMapError(f"model: choose a {p.modelKind}")
        return path

    def resultIsOfModel(self, p: AttentionMapParameterNode) -> bool:
        """True when the result shown was made by the model chosen now."""
        try:
            return self.result is not None and self.resultSource == self.modelSource(p)
        except AttentionMapError:
            return False

    def modelSummary(self, p: AttentionMapParameterNode) -> module_logic.CardSummary:
        """Classes, layer and head counts: of the model that made the result, else from the model card
        (demo or .json) before any run; unknown ([] / None) for bundles and unreadable cards."""
        if self.resultIsOfModel(p):
            model = self.result.model
            return module_logic.CardSummary(model.classes, model.num_layers, model.num_heads)
        from AttentionMapLib.models import DEMO_CARD  # models imports torch only when loading a network

        try:
            source = self.modelSource(p)
            card = DEMO_CARD if source == "demo" else pathlib.Path(source)
            return module_logic.card_summary(card) if card.is_file() else module_logic.CardSummary([], None, None)
        except AttentionMapError:
            return module_logic.CardSummary([], None, None)

    @staticmethod
    def queryRas(p: AttentionMapParameterNode) -> Optional[np.ndarray]:
        return mrml.query_point_ras(p.queryPoint)

    def fusionOptions(self, p: AttentionMapParameterNode) -> Dict[str, Any]:
        """Options that VolumeAttention.fuse_again can change without re-running the network."""
        layer = layer_index(p.layer if p.layer > 0 else -1, name="layer")  # the slider's 0 is "last"
        return {"method": p.method, "layer": layer, "discard_ratio": p.discardRatio,
                "query_ras": self.queryRas(p), "normalize": p.normalize}

    def explainOptions(self, p: AttentionMapParameterNode) -> Dict[str, Any]:
        single = p.headFusion == "single head"
        return {**self.fusionOptions(p), "head_fusion": "mean" if single else p.headFusion,
                "head": p.head if single else None, "target": p.targetClass or None,
                **TEST_TIME_VIEWS[p.testTimeAveraging]}

    def startExplain(self, p: AttentionMapParameterNode) -> worker.WorkerJob:
        """Copy the input (on this, the main thread) and start the model in the worker process."""
        if p.inputVolume is None:
            raise AttentionMapError("input volume: choose a volume")
        array, ijkToRas = mrml.volume_to_array(p.inputVolume)
        self._runningInput, self._runningSource = p.inputVolume, self.modelSource(p)
        return worker.explain_job(
            self._runningSource,
            array,
            ijkToRas,
            self.explainOptions(p),
            trust_bundle=self.bundleTrusted(p),
            device=p.device,
            region=self.regionSpec(p, array, ijkToRas),
            segment=self.segmentSpec(p, array, ijkToRas),
        )

    @staticmethod
    def regionSpec(p: AttentionMapParameterNode, array: np.ndarray, ijkToRas: np.ndarray):
        """The chosen region node as plain data, else the card's default region or none (region.region_from_spec)."""
        if p.region is not None:
            return mrml.region_from_node(p.region, array.shape[-3:], ijkToRas)
        return "default" if p.useDefaultRegion else "none"

    @staticmethod
    def segmentSpec(p: AttentionMapParameterNode, array: np.ndarray, ijkToRas: np.ndarray):
        """Why this segment as plain data for the worker (mrml.segment_target_spec), or None when off."""
        if not p.explainSegment:
            return None
        return mrml.segment_target_spec(p.targetClass, p.targetSegmentation, p.targetSegmentId or None,
                                        array.shape[-3:], ijkToRas)

    def applyResult(self, result: worker.ExplainResult, p: AttentionMapParameterNode):
        """Main thread: write the result into the output node (reused or new) and show it."""
        self.result, self.inputVolume, self.resultSource = result, self._runningInput, self._runningSource
        self.numLayers = result.model.num_layers
        if result.labels is not None and p.showNetworkLabels:
            p.networkSegmentation = mrml.labels_to_segmentation(
                result.labels.labels, result.labels.ijk_to_ras, slicer.mrmlScene, result.model.classes,
                node=p.networkSegmentation, name=f"{self.inputVolume.GetName()} network segmentation")
        return self._show(result.attention, p)

    def startFuseAgain(self, p: AttentionMapParameterNode) -> worker.WorkerJob:
        """Re-read the worker's cached attention with the current fusion options (no network run)."""
        return worker.fuse_again_job(self.result.attention, self.fusionOptions(p))

    def applyFusedAgain(self, attention, p: AttentionMapParameterNode) -> float:
        """Main thread: show a re-fused VolumeAttention in the same output node; returns its fusion seconds."""
        self.result = self.result._replace(attention=attention)
        self._show(attention, p)
        return attention.timings["fuse"]

    def fuse_again(self, p: AttentionMapParameterNode) -> float:
        """Blocking re-fusion (scripts, self-test); the widget uses startFuseAgain + applyFusedAgain."""
        return self.applyFusedAgain(self._resultOf(self.startFuseAgain(p), 600.0), p)

    def _show(self, attention, p: AttentionMapParameterNode):
        if p.colorNode is None:  # our heat table enters the scene with the first result
            p.colorNode = mrml.heat_color_node(slicer.mrmlScene)
        name = f"{self.inputVolume.GetName()} attention" if self.inputVolume else "Attention"
        node = mrml.attention_to_volume(attention, slicer.mrmlScene, p.outputVolume, name)
        p.outputVolume = node
        self.updateDisplay(p)
        mrml.show_overlay(node, self.inputVolume, p.opacity)
        return node

    def displayWindow(self):
        grid = self.result.attention.grid
        return (0.0, 1.0) if self.result.attention.normalize != "none" else render.shared_scale([grid])

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
        try:
            final = job.wait(timeoutSeconds)
        except TimeoutError:
            job.cancel()  # stopped between windows, or the worker is killed after the grace period
            job.wait(worker.CANCEL_GRACE_S + 30.0)
            raise
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
        are made only after every case succeeded; running the same volumes again reuses their nodes.
        Returns the attention volume nodes.
        """
        options = {**self.explainOptions(p), "normalize": "none"}
        if p.colorNode is None:
            p.colorNode = mrml.heat_color_node(slicer.mrmlScene)
        attentions = []
        for volume in volumes:
            array, ijkToRas = mrml.volume_to_array(volume)
            job = worker.explain_job(self.modelSource(p), array, ijkToRas, options, trust_bundle=self.bundleTrusted(p),
                                     device=p.device, region=self.regionSpec(p, array, ijkToRas))
            attentions.append(self._resultOf(job, timeoutSeconds).attention)
        return mrml.show_cases(attentions, slicer.mrmlScene, mrml.case_output_nodes(volumes),
                               names=[f"{v.GetName()} attention" for v in volumes], color_node=p.colorNode,
                               threshold_fraction=p.threshold, source_nodes=volumes)


class AttentionMapTest(ScriptedLoadableModuleTest):
    """Runs the demo model on a lung-field phantom (oblique, anisotropic) with a nodule, through the
    asynchronous path the widget uses (start, poll, apply, re-fuse, score) and the blocking one."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AttentionMap_demo()

    @staticmethod
    def _packageIndexReachable(timeoutSeconds: float = 60.0) -> bool:
        """Whether pip reaches its package index from Slicer's Python within ``timeoutSeconds``."""
        command = [worker.worker_python(), "-m", "pip", "index", "versions", "monai", "--timeout", "10"]
        try:
            return subprocess.run(command, capture_output=True, timeout=timeoutSeconds, check=False).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    @staticmethod
    def _poll(job, timeoutSeconds: float = 900.0):
        """Drive a job as the widget's timer does: poll, let Qt run, until the final event; its value."""
        deadline = time.monotonic() + timeoutSeconds
        while time.monotonic() < deadline:
            for event in job.poll():
                if event.kind in worker.FINAL_KINDS:
                    if event.kind != worker.DONE:
                        raise AssertionError(f"AttentionMap job ended with {event.kind}: {event.value}\n{event.detail}")
                    return event.value
            slicer.app.processEvents()
            time.sleep(0.05)
        job.cancel()
        raise AssertionError(f"AttentionMap job: no result within {timeoutSeconds} s")

    def test_AttentionMap_demo(self):
        self.delayDisplay("Starting the test")
        logic = AttentionMapLogic()
        # testing mode: no dialogs; pip installs what the plan lists (dependencies.py), or the worker Python is used
        plan = dependencies.plan_dependencies(dependencies.installed_versions())
        if worker.configured_python() is None and plan.needed and not self._packageIndexReachable():
            self.skipTest("AttentionMap self-test skipped: PyTorch and MONAI are not installed and the package index "
                          "cannot be reached (no network?); install them, or set a worker Python, and run it again")
        self.assertTrue(logic.installDependencies(askConsent=False), "PyTorch / MONAI could not be installed")
        array, ijkToRas, noduleRas = module_logic.self_test_phantom()
        volume = slicer.util.addVolumeFromArray(array.transpose(2, 1, 0).copy(), ijkToRAS=ijkToRas, name="Phantom CT")
        inputState = slicer.util.arrayFromVolume(volume).copy()
        p = logic.getParameterNode()
        p.inputVolume = volume
        p.method = "rollout"
        p.device = "cpu"

        self.delayDisplay("Explaining in the worker process")
        output = logic.applyResult(self._poll(logic.startExplain(p)), p)
        attention = logic.result.attention
        matrix = vtk.vtkMatrix4x4()
        output.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), attention.ijk_to_ras, atol=1e-6)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(output).transpose(2, 1, 0), attention.grid)
        distance = float(np.linalg.norm(attention.peak_ras() - noduleRas))
        logging.info(f"AttentionMap self-test: peak {attention.peak_ras()}, nodule {noduleRas}, {distance:.1f} mm")
        self.assertLessEqual(distance, module_logic.patch_size_mm(attention.ijk_to_ras), "peak not at the nodule")
        self.assertEqual(len(attention.probabilities), len(logic.result.model.classes))
        self.assertIsNotNone(p.colorNode)  # the heat table came with the first result
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), inputState)

        self.delayDisplay("Re-fusion from the worker's cached attention")
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        p.layer = 1
        logic.applyFusedAgain(self._poll(logic.startFuseAgain(p)), p)
        self.assertEqual(logic.result.attention.timings["forward"], 0.0)
        self.assertEqual(logic.result.attention.layer, 0)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        refused = slicer.util.arrayFromVolume(output).copy()
        fresh = logic.process(p)  # the blocking path: a new run with layer 1 equals the re-fused map
        self.assertEqual(fresh.GetID(), output.GetID())
        np.testing.assert_allclose(slicer.util.arrayFromVolume(output), refused, atol=1e-5)

        self.delayDisplay("Scoring")
        scores = self._poll(logic.startScore(p))
        self.assertTrue(0.0 <= scores["deletion_auc"] <= 1.0 and 0.0 <= scores["insertion_auc"] <= 1.0)
        self.assertEqual(scores["device"], logic.result.model.device)

        self.delayDisplay("Segment statistics")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Nodule")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        sphere = vtk.vtkSphereSource()
        sphere.SetCenter(*noduleRas)
        sphere.SetRadius(8.0)
        sphere.Update()
        segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "nodule", [1.0, 0.0, 0.0])
        p.segmentation = segmentation
        rows = mrml.read_table(logic.segmentStatistics(p))
        self.assertEqual(list(rows), ["nodule"])
        self.assertTrue(0.0 <= rows["nodule"]["mass_fraction"] <= 1.0)
        self.assertGreater(rows["nodule"]["mass_ratio"], 1.0)  # more attention than its volume share
        worker.stop_shared_worker()
        self.delayDisplay("Test passed")
