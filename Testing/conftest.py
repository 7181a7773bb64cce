"""Shared pytest fixtures (each helper appends its own below, with a comment naming its owner)."""
from types import SimpleNamespace

import pytest


# ---- slicer-core scene (owner: SLICER helper) --------------------------------------------------
def _register_segmentation_converters(slicer):
    """Closed surface <-> binary labelmap rules, registered once per process as Slicer's Segmentations
    module does at start-up (slicer-core has the rule classes but registers none)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())


@pytest.fixture
def slicer_scene():
    """A real MRML scene set up as the Slicer application does, with a window-less red slice view.

    Returns a namespace: scene, app (vtkSlicerApplicationLogic), slice_logic (vtkMRMLSliceLogic of
    the "Red" view; ``slice_logic.GetImageDataConnection().GetProducer()`` renders the RGBA image the
    view would draw) and add_slice_view(name) -> vtkMRMLSliceLogic for more views.
    """
    import slicer
    import vtk

    _register_segmentation_converters(slicer)
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetSliceLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    views = []

    def add_slice_view(name):
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        logic.AddSliceNode(name)
        views.append(logic)
        return logic

    red = add_slice_view("Red")
    yield SimpleNamespace(scene=scene, app=app, slice_logic=red, add_slice_view=add_slice_view)
    for logic in views:
        logic.SetMRMLScene(None)
    scene.Clear(1)
