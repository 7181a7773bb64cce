"""AttentionMapLogic, the part of AttentionMap.py the self-test and the widget call, run on a real
slicer-core scene with the real worker process: the self-test's steps (explain, apply, re-fuse,
blocking run, score, 3D, query point, segment statistics, multi-case) outside Slicer.

slicer-core has no Qt, no ScriptedLoadableModule and no parameterNodeWrapper: stand-ins take their
place (empty base classes, a namespace for the parameter node with the wrapper's defaults); MRML,
the volume rendering logic, torch and MONAI are the real ones. Runs in a child process so that the
stand-ins never reach the other tests.
"""
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def import_module_with_standins():
    """AttentionMap.py imported with stand-ins for the GUI-only modules; slicer.mrmlScene set up."""
    import slicer

    from AttentionMapLib import mrml

    for name in ("ctk", "qt"):
        sys.modules[name] = types.ModuleType(name)
    loadable = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(loadable, name, type(name, (), {"__init__": lambda self, *args: None}))
    sys.modules["slicer.ScriptedLoadableModule"] = loadable
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    wrapper.parameterNodeWrapper = lambda cls: cls
    sys.modules["slicer.parameterNodeWrapper"] = wrapper
    slicer.util.VTKObservationMixin = object
    scene, app = mrml.headless_scene()
    slicer.mrmlScene, slicer.modules = scene, SimpleNamespace()  # no module logics: the library makes its own
    import AttentionMap  # AttentionMap/AttentionMap.py (pytest puts AttentionMap/ on the path, as Slicer does)

    return AttentionMap, scene, app


def parameters(module, volume):
    """The parameter node's fields with the defaults the @parameterNodeWrapper class declares."""
    cls = module.AttentionMapParameterNode
    fields = {name: getattr(cls, name, None) for name in cls.__annotations__}
    return SimpleNamespace(**{**fields, "inputVolume": volume, "modelPath": "", "device": "cpu"})


def run_self_test_steps() -> None:
    import numpy as np
    import slicer
    import vtk

    from AttentionMapLib import module_logic, mrml, worker

    module, scene, app = import_module_with_standins()
    red = mrml.add_slice_view(scene, app, "Red")  # a slice view for show_overlay (kept referenced)
    logic = module.AttentionMapLogic()
    array, ijk_to_ras, nodule = module_logic.self_test_phantom()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Phantom CT")
    slicer.util.updateVolumeFromArray(volume, array.transpose(2, 1, 0).copy())
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    p = parameters(module, volume)
    assert p.method == "rollout" and p.normalize == "percentile" and p.colorNode is None and p.useDefaultRegion
    assert p.testTimeAveraging == "model default"
    p.testTimeAveraging = "off"  # one pass per window until the last step, which runs the card's default
    assert logic.modelSummary(p) == (["no lesion", "lesion"], 4, 4)  # from the card, before any run
    assert scene.GetFirstNodeByName(mrml.HEAT_COLOR_NODE_NAME) is None

    def poll(job):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            for event in job.poll():
                if event.kind in worker.FINAL_KINDS:
                    assert event.kind == worker.DONE, (event.value, event.detail)
                    return event.value
            time.sleep(0.05)
        raise AssertionError("no result")

    output = logic.applyResult(poll(logic.startExplain(p)), p)
    attention = logic.result.attention
    assert np.linalg.norm(attention.peak_ras() - nodule) <= module_logic.patch_size_mm(attention.ijk_to_ras)
    assert p.colorNode.GetName() == mrml.HEAT_COLOR_NODE_NAME and p.outputVolume is output
    composite = red.GetSliceCompositeNode()  # shown over the CT in the slice view
    assert (composite.GetForegroundVolumeID(), composite.GetBackgroundVolumeID()) == (output.GetID(), volume.GetID())
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output).transpose(2, 1, 0), attention.grid)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume).transpose(2, 1, 0), array)
    count = scene.GetNumberOfNodes()
    p.layer = 1
    assert module_logic.fusion_differs(attention, logic.fusionOptions(p), logic.numLayers)
    logic.applyFusedAgain(poll(logic.startFuseAgain(p)), p)
    assert logic.result.attention.layer == 0 and logic.result.attention.timings["forward"] == 0.0
    assert scene.GetNumberOfNodes() == count
    refused = slicer.util.arrayFromVolume(output).copy()
    assert logic.process(p).GetID() == output.GetID()  # the blocking path reuses the node
    np.testing.assert_allclose(slicer.util.arrayFromVolume(output), refused, atol=1e-5)
    scores = poll(logic.startScore(p))
    assert 0 <= scores["deletion_auc"] <= 1 and scores["device"] == logic.result.model.device == "cpu"
    p.show3D = True
    logic.updateDisplay(p)
    query = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    query.AddControlPoint(list(nodule))
    p.queryPoint = query
    np.testing.assert_allclose(logic.fusionOptions(p)["query_ras"], nodule)
    logic.applyFusedAgain(poll(logic.startFuseAgain(p)), p)
    np.testing.assert_allclose(logic.result.attention.query_ras, nodule)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Nodule")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*nodule)
    sphere.SetRadius(8.0)
    sphere.Update()
    segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "nodule", [1.0, 0.0, 0.0])
    p.segmentation = segmentation
    rows = mrml.read_table(logic.segmentStatistics(p))
    assert list(rows) == ["nodule"] and rows["nodule"]["mass_ratio"] > 1.0
    first = logic.processCases([volume], p)
    count = scene.GetNumberOfNodes()
    assert logic.processCases([volume], p)[0].GetID() == first[0].GetID() and scene.GetNumberOfNodes() == count
    assert logic.result.attention.flip_axes == () and not logic.result.attention.shift_average
    assert logic.explainOptions(p)["flip_axes"] == "none" and logic.explainOptions(p)["shift_average"] == "off"
    p.testTimeAveraging = "8 flips"
    assert logic.explainOptions(p)["flip_axes"] == [0, 1, 2] and logic.explainOptions(p)["shift_average"] == "off"
    p.testTimeAveraging = "8 flips + half-patch shifts"
    assert logic.explainOptions(p)["flip_axes"] == [0, 1, 2] and logic.explainOptions(p)["shift_average"] == "on"
    p.testTimeAveraging = "model default"  # the demo card's default_flip_axes and default_shift_average, in the worker
    assert logic.explainOptions(p)["flip_axes"] == "default" and logic.explainOptions(p)["shift_average"] == "default"
    flipped = poll(logic.startExplain(p)).attention
    assert flipped.flip_axes == (0, 1, 2) and flipped.shift_average
    assert flipped.prediction["rule"].endswith("each the mean over 8 flipped views and 7 half-patch-shifted views")
    assert np.linalg.norm(flipped.peak_ras() - nodule) <= module_logic.patch_size_mm(flipped.ijk_to_ras)
    worker.stop_shared_worker()
    p.modelKind, p.modelPath = module.MODEL_KINDS[2], "/bundles/a"  # trust: one bundle path, this session only
    assert not logic.bundleTrusted(p)
    logic.trustBundle(p, True)
    assert logic.bundleTrusted(p) and not hasattr(module.AttentionMapParameterNode, "trustBundle")
    p.modelPath = "/bundles/b"
    assert not logic.bundleTrusted(p)  # another bundle is not trusted
    p.modelPath, p.modelKind = "/bundles/a", module.MODEL_KINDS[1]
    assert not logic.bundleTrusted(p)  # nor is a card at that path
    print("SELF-TEST STEPS PASSED")


def test_the_self_tests_steps_pass_on_slicer_core():
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "AttentionMap")})
    assert "SELF-TEST STEPS PASSED" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]


if __name__ == "__main__":
    run_self_test_steps()
