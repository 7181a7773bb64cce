"""MRML parts of the Slicer module's defects, on a real slicer-core scene: volume rendering edits
reach the volume property node, the query point list keeps one point, multi-case runs reuse their nodes."""
from types import SimpleNamespace

import numpy as np
import slicer
import vtk

from AttentionMapLib import mrml


def grid_node(scene, value=1.0):
    grid = np.zeros((4, 3, 5), np.float32)
    grid[1, 2, 3] = value
    affine = np.diag([6.0, 7.0, 8.0, 1.0])
    return mrml.grid_to_volume(grid, affine, scene), SimpleNamespace(grid=grid, ijk_to_ras=affine)


def test_volume_rendering_goes_through_the_property_node(slicer_scene):
    """An edit of the transfer functions (as the Volume Rendering module makes) reaches the
    vtkMRMLVolumePropertyNode: the functions were set through the node, which observes them."""
    node, _ = grid_node(slicer_scene.scene)
    mrml.configure_display(node)
    display = mrml.show_volume_rendering(node)
    property_node = display.GetVolumePropertyNode()
    assert property_node.GetColor() is property_node.GetVolumeProperty().GetRGBTransferFunction()
    assert property_node.GetColor().GetColor(1.0) == (1.0, 1.0, 1.0)  # the heat table's top
    modified = []
    property_node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: modified.append(event))
    property_node.GetColor().AddRGBPoint(0.5, 0.0, 1.0, 0.0)
    property_node.GetScalarOpacity().AddPoint(0.5, 0.9)
    assert len(modified) == 2, "the property node does not observe its transfer functions"


def test_placing_the_query_point_again_moves_it(slicer_scene):
    points = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query")
    assert mrml.query_point_ras(points) is None and mrml.query_point_ras(None) is None
    points.AddControlPoint([1.0, 2.0, 3.0])
    assert not mrml.keep_newest_control_point(points)
    points.AddControlPoint([0.0, 0.0, 0.0])
    points.SetNthControlPointPosition(1, 7.0, 8.0, 9.0, points.PositionPreview)  # the cursor while placing
    assert not mrml.keep_newest_control_point(points)  # a preview does not replace the placed point
    assert list(mrml.query_point_ras(points)) == [1.0, 2.0, 3.0]
    points.SetNthControlPointPosition(1, 4.0, 5.0, 6.0)  # placed: defined
    assert mrml.keep_newest_control_point(points)
    assert points.GetNumberOfControlPoints() == 1 and list(mrml.query_point_ras(points)) == [4.0, 5.0, 6.0]
    transform = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4, k=3)))
    points.SetAndObserveTransformNodeID(transform.GetID())
    assert list(mrml.query_point_ras(points)) == [5.0, 5.0, 6.0]  # world RAS


def test_explaining_the_same_cases_again_reuses_their_nodes(slicer_scene):
    scene = slicer_scene.scene
    volumes = [grid_node(scene)[0] for _ in range(2)]
    attentions = [grid_node(scene, value)[1] for value in (1.0, 3.0)]
    assert mrml.case_output_nodes(volumes) == [None, None]
    first = mrml.show_cases(attentions, scene, mrml.case_output_nodes(volumes), source_nodes=volumes)
    count = scene.GetNumberOfNodes()
    again = mrml.show_cases(attentions, scene, mrml.case_output_nodes(volumes), source_nodes=volumes)
    assert [n.GetID() for n in again] == [n.GetID() for n in first] and scene.GetNumberOfNodes() == count
    assert mrml.case_output_nodes(volumes[1:]) == [first[1]]
