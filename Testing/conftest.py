"""Shared pytest fixtures."""
from types import SimpleNamespace

import pytest

from reliability import tiny_weights, work  # noqa: F401 (fixtures of the reliability sweeps, found here by pytest)


# ---- slicer-core scene ---------------------------------------------------------------------------
@pytest.fixture
def slicer_scene():
    """A real MRML scene set up as the Slicer application does, with a window-less red slice view.

    Returns a namespace: scene, app (vtkSlicerApplicationLogic), slice_logic (vtkMRMLSliceLogic of
    the "Red" view; AttentionMapLib.mrml.render_slice(slice_logic) is the RGBA image the view would
    draw) and add_slice_view(name) -> vtkMRMLSliceLogic for more views.
    """
    from AttentionMapLib import mrml

    scene, app = mrml.headless_scene()
    views = []

    def add_slice_view(name):
        views.append(mrml.add_slice_view(scene, app, name))
        return views[-1]

    red = add_slice_view("Red")
    yield SimpleNamespace(scene=scene, app=app, slice_logic=red, add_slice_view=add_slice_view)
    for logic in views:
        logic.SetMRMLScene(None)
    scene.Clear(1)
