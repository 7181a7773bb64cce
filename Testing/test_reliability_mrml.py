"""Reliability sweep, MRML (real slicer-core scenes): nodes without voxels, wrong node kinds, bad grids.

Each call raises AttentionMapError naming the node or argument; the scene keeps exactly the nodes it
had (no partial output node) and a real input volume is unchanged (voxels, geometry, display).
"""
import numpy as np
import pytest
import vtk

from AttentionMapLib import mrml
from AttentionMapLib.errors import AttentionMapError
from test_mrml import add_volume, node_state


def _no_scalars(scene):
    """A volume node whose vtkImageData has dimensions but no scalar array (nothing allocated)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "hollow")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 5, 6)
    node.SetAndObserveImageData(image)
    return node


def _empty(scene):
    return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")


def _segmentation(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segs")
    node.GetSegmentation().AddEmptySegment("tumour")
    return node


GRID = np.ones((2, 3, 4), np.float32)

# name -> (call(scene, ct) after the nodes it needs were made, words)
CASES = {
    "volume_to_array no scalars": (lambda s, ct, n: mrml.volume_to_array(n["hollow"]),
                                   "volume 'hollow': the node's image data holds no voxel values"),
    "volume_to_array no image data": (lambda s, ct, n: mrml.volume_to_array(n["empty"]),
                                      "volume 'empty': the node holds no voxels"),
    "volume_to_array None": (lambda s, ct, n: mrml.volume_to_array(None), "volume: expected a volume node, got None"),
    "volume_to_array table": (lambda s, ct, n: mrml.volume_to_array(n["table"]), "volume: expected a volume node"),
    "show_volume_rendering empty node": (lambda s, ct, n: mrml.show_volume_rendering(n["empty"]),
                                         "volume 'empty': the node holds no voxels"),
    "show_volume_rendering no scalars": (lambda s, ct, n: mrml.show_volume_rendering(n["hollow"]),
                                         "volume 'hollow': the node's image data holds no voxel values"),
    "show_volume_rendering None": (lambda s, ct, n: mrml.show_volume_rendering(None), "volume: expected a volume node"),
    "grid_to_volume NaN": (lambda s, ct, n: mrml.grid_to_volume(np.full((2, 2, 2), np.nan), np.eye(4), s),
                           "attention grid: contains NaN"),
    "grid_to_volume 2D": (lambda s, ct, n: mrml.grid_to_volume(np.ones((4, 4)), np.eye(4), s),
                          "attention grid: expected a 3D array (n1, n2, n3), got shape (4, 4)"),
    "grid_to_volume singular": (lambda s, ct, n: mrml.grid_to_volume(GRID, np.diag([1.0, 0.0, 1.0, 1.0]), s),
                                "attention grid: degenerate (non-invertible) 3x3 part"),
    "grid_to_volume output is a table": (lambda s, ct, n: mrml.grid_to_volume(GRID, np.eye(4), s, n["table"]),
                                         "expected a scalar volume node, got vtkMRMLTableNode"),
    "grid_to_volume output is the label map": (lambda s, ct, n: mrml.grid_to_volume(GRID, np.eye(4), s, n["labels"]),
                                               "expected a scalar volume node, got vtkMRMLLabelMapVolumeNode"),
    "segment_mask unknown segment": (lambda s, ct, n: mrml.segment_mask(n["segs"], "nope", (2, 2, 2), np.eye(4)),
                                     "segmentation 'segs': no segment with ID 'nope'"),
    "segment_statistics no segmentation": (lambda s, ct, n: mrml.segment_statistics(None, None, ct),
                                           "segmentation: expected a segmentation node, got None"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mrml_refuses_and_leaves_the_scene_as_it_was(name, slicer_scene):
    scene = slicer_scene.scene
    ct = add_volume(
        scene, np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32), np.diag([0.7, 1.1, 2.5, 1])
    )
    nodes = {"hollow": _no_scalars(scene), "empty": _empty(scene), "segs": _segmentation(scene),
             "table": scene.AddNewNodeByClass("vtkMRMLTableNode", "table"),
             "labels": scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")}
    before_ct = node_state(ct)
    before_ids = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    call, words = CASES[name]
    with pytest.raises(AttentionMapError) as refused:
        call(scene, ct, nodes)
    assert words in str(refused.value), str(refused.value)
    assert sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())) == before_ids
    assert node_state(ct) == before_ct
