"""AttentionMapLib.mrml against a real slicer-core scene: geometry, display, what the slice view draws,
segment statistics, multi-case scale, re-fusion, and that the input node is never modified.

Volumes are oblique (30 deg about S, then 20 deg about R), anisotropic (0.8 x 0.9 x 2.5 mm) and
non-cubic (48 x 40 x 24); the attention comes from the oracle ViT (Testing/oracle.py), whose
attention peaks on the brightest patch by construction.
"""
import hashlib

import numpy as np
import pytest
import slicer
import torch
import vtk
from vtk.util import numpy_support

from AttentionMapLib import AttentionMapError, mrml
from AttentionMapLib.core.geometry import rotation
from AttentionMapLib.core.metrics import mask_statistics
from AttentionMapLib.core.volume import explain_volume
from AttentionMapLib.render import shared_scale
from oracle import make_oracle_vit

IMG_SIZE = (32, 32, 32)
PATCH = (8, 8, 8)
SHAPE = (48, 40, 24)
CUBE = (slice(30, 38), slice(8, 16), slice(14, 19))  # IJK, asymmetric
OTHER = (slice(4, 14), slice(26, 36), slice(2, 8))
PREPROCESSING = {"orientation": "RAS", "spacing": None,
                 "intensity": {"a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
                 "spatial": {"mode": "resize"}}


def ct_affine(origin=(-30.0, 20.0, -40.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(2, 30) @ rotation(0, 20) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = origin
    return affine


def ct_array(cube=CUBE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = (0.2 + 0.1 * rng.random(SHAPE)).astype(np.float32)
    array[cube] = 1.0
    return array


def add_volume(scene, array_ijk, affine, name="CT"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(0.0, 1.2)
    return node


def node_state(node):
    """Everything about an input node that must not change: voxels, geometry, display, transform."""
    voxels = slicer.util.arrayFromVolume(node)
    return (hashlib.sha256(voxels.tobytes()).hexdigest(), voxels.dtype.str, voxels.shape,
            slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node)).tobytes(), node.GetDisplayNodeID(),
            node.GetParentTransformNode(), node.GetName(), sorted(node.GetAttributeNames() or []))


def _ijk_to_ras(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


@pytest.fixture(scope="module")
def oracle():
    torch.manual_seed(0)
    return make_oracle_vit(IMG_SIZE, PATCH, classification=True, num_layers=2)


def explain(model, array, affine, **options):
    return explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE, **options)


@pytest.fixture
def case(slicer_scene, oracle):
    """A CT node in the scene and the oracle's rollout attention for it, computed from the node."""
    node = add_volume(slicer_scene.scene, ct_array(), ct_affine())
    array, affine = mrml.volume_to_array(node)
    return node, explain(oracle, array, affine)


# ---------------------------------------------------------------- volume node -> arrays

def test_volume_to_array_is_an_ijk_copy_with_world_geometry(slicer_scene):
    array, affine = ct_array(), ct_affine()
    node = add_volume(slicer_scene.scene, array, affine)
    got, got_affine = mrml.volume_to_array(node)
    assert got.dtype == np.float32 and got.shape == SHAPE
    np.testing.assert_array_equal(got, array)
    np.testing.assert_allclose(got_affine, affine, atol=1e-9)
    got[:] = -5.0  # a copy: the node's voxels stay
    assert float(slicer.util.arrayFromVolume(node).min()) >= 0.2

    transform = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation(1, 15)
    to_parent[:3, 3] = (5.0, -7.0, 11.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    _, world = mrml.volume_to_array(node)
    np.testing.assert_allclose(world, to_parent @ affine, atol=1e-9)


def test_vector_volume_becomes_channels_first(slicer_scene):
    channels = np.stack([ct_array(seed=s) for s in range(3)])  # (C, I, J, K)
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(channels.transpose(3, 2, 1, 0)))  # (K, J, I, C)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ct_affine()))
    got, affine = mrml.volume_to_array(node)
    assert got.shape == (3, *SHAPE)
    np.testing.assert_array_equal(got, channels)
    np.testing.assert_allclose(affine, ct_affine(), atol=1e-9)


def test_non_linear_parent_transform_is_refused(slicer_scene):
    node = add_volume(slicer_scene.scene, ct_array(), ct_affine())
    grid_transform = slicer_scene.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    displacement = vtk.vtkImageData()
    displacement.SetDimensions(3, 3, 3)
    displacement.AllocateScalars(vtk.VTK_DOUBLE, 3)
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(displacement)
    grid_transform.SetAndObserveTransformFromParent(grid)
    node.SetAndObserveTransformNodeID(grid_transform.GetID())
    with pytest.raises(AttentionMapError, match="non-linear transform 'warp'.*Harden"):
        mrml.volume_to_array(node)


def test_empty_or_wrong_node_is_refused(slicer_scene):
    empty = slicer_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(AttentionMapError, match="'empty'.*no voxels"):
        mrml.volume_to_array(empty)
    table = slicer_scene.scene.AddNewNodeByClass("vtkMRMLTableNode")
    with pytest.raises(AttentionMapError, match="expected a volume node"):
        mrml.volume_to_array(table)


# ---------------------------------------------------------------- attention -> volume node

def test_output_node_has_the_grids_exact_geometry_and_is_reused(slicer_scene, case):
    ct, attention = case
    scene = slicer_scene.scene
    node = mrml.attention_to_volume(attention, scene, name="Attention")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node).transpose(2, 1, 0), attention.grid)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node)), attention.ijk_to_ras, atol=1e-9)
    peak_ijk = np.unravel_index(int(np.argmax(attention.grid)), attention.grid.shape)
    peak_ras = _ijk_to_ras(node).MultiplyPoint((*map(float, peak_ijk), 1.0))[:3]
    np.testing.assert_allclose(peak_ras, attention.peak_ras(), atol=1e-6)
    # the peak lies on the bright cube (within half a token diagonal of its centre)
    cube_centre = ct_affine() @ np.array([33.5, 11.5, 16.0, 1.0])
    token_diagonal = np.linalg.norm(attention.ijk_to_ras[:3, :3], axis=0)
    assert np.linalg.norm(attention.peak_ras() - cube_centre[:3]) <= 0.5 * np.linalg.norm(token_diagonal)
    assert node.GetAttribute("AttentionMap.method") == "rollout"

    count = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    again = mrml.attention_to_volume(attention.fuse_again(method="raw"), scene, output_node=node)
    assert again is node and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count
    assert node.GetAttribute("AttentionMap.method") == "raw"


def test_reused_output_node_leaves_its_parent_transform(slicer_scene, case):
    _, attention = case
    scene = slicer_scene.scene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "old result")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    mrml.attention_to_volume(attention, scene, output_node=node)
    assert node.GetParentTransformNode() is None  # the grid's geometry is world RAS


@pytest.mark.parametrize("grid, affine, message", [
    (np.full((4, 4, 4), np.nan, np.float32), np.eye(4), "NaN"),
    (np.zeros((4, 4), np.float32), np.eye(4), "3D array"),
    (np.zeros((4, 4, 4), np.float32), np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
    (np.zeros((4, 4, 4), np.float32), np.eye(3), "4x4"),
])
def test_bad_grid_leaves_no_node(slicer_scene, grid, affine, message):
    scene = slicer_scene.scene
    before = scene.GetNumberOfNodes()
    with pytest.raises(AttentionMapError, match=message):
        mrml.grid_to_volume(grid, affine, scene)
    assert scene.GetNumberOfNodes() == before


def test_wrong_output_node_is_refused_before_anything_changes(slicer_scene, case):
    _, attention = case
    scene = slicer_scene.scene
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    before = scene.GetNumberOfNodes()
    with pytest.raises(AttentionMapError, match="'labels'.*scalar volume"):
        mrml.attention_to_volume(attention, scene, output_node=labelmap)
    assert scene.GetNumberOfNodes() == before and labelmap.GetImageData() is None


# ---------------------------------------------------------------- display

def test_display_settings_as_chosen(slicer_scene, case):
    _, attention = case
    node = mrml.attention_to_volume(attention, slicer_scene.scene)
    display = mrml.configure_display(node, threshold=0.25)
    heat = slicer_scene.scene.GetFirstNodeByName(mrml.HEAT_COLOR_NODE_NAME)
    assert display.GetColorNodeID() == heat.GetID()
    assert display.GetAutoWindowLevel() == 0
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
    assert display.GetApplyThreshold() == 1 and display.GetLowerThreshold() == pytest.approx(0.25)
    assert display.GetInterpolate() == 1

    display = mrml.configure_display(node, window=(0.2, 0.8), threshold=None, interpolate=False)
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.2, 0.8))
    assert display.GetApplyThreshold() == 0 and display.GetInterpolate() == 0
    assert mrml.heat_color_node(slicer_scene.scene) is heat  # one table per scene
    with pytest.raises(AttentionMapError, match="low < high"):
        mrml.configure_display(node, window=(1.0, 1.0))


def test_heat_table_is_transparent_at_low_values(slicer_scene):
    heat = mrml.heat_color_node(slicer_scene.scene)
    rgba = [0.0] * 4
    alphas = []
    for index in range(heat.GetNumberOfColors()):
        heat.GetColor(index, rgba)
        alphas.append(rgba[3])
    alphas = np.array(alphas)
    values = np.linspace(0, 1, heat.GetNumberOfColors())
    assert np.all(alphas[values < mrml.HEAT_TRANSPARENT_BELOW] == 0.0)
    assert np.all(alphas[values >= mrml.HEAT_OPAQUE_FROM] == 1.0)
    assert np.all(np.diff(alphas) >= 0)
    heat.GetColor(heat.GetNumberOfColors() - 1, rgba)
    assert rgba[:3] == pytest.approx([1.0, 1.0, 1.0])


def test_overlay_goes_to_every_slice_view(slicer_scene, case):
    ct, attention = case
    for name in ("Yellow", "Green"):
        slicer_scene.add_slice_view(name)
    node = mrml.attention_to_volume(attention, slicer_scene.scene)
    assert mrml.show_overlay(node, ct, opacity=0.4) == 3
    scene = slicer_scene.scene
    for i in range(3):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    mrml.set_overlay_opacity(scene, node, 0.7)
    assert scene.GetNthNodeByClass(2, "vtkMRMLSliceCompositeNode").GetForegroundOpacity() == pytest.approx(0.7)
    with pytest.raises(AttentionMapError, match="opacity"):
        mrml.show_overlay(node, ct, opacity=1.5)


# ---------------------------------------------------------------- what the slice view draws

def _render(slice_logic) -> np.ndarray:
    return mrml.render_slice(slice_logic).astype(float)


def _pixel_of(slice_node, ras):
    xy_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS())
    x, y, z, _ = np.linalg.solve(xy_to_ras, np.append(ras, 1.0))
    assert abs(z) < 1e-3, "the point is not on the slice plane"
    return int(round(x)), int(round(y))


def _ras_of(slice_node, pixel):
    return (slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS()) @ np.array([*pixel, 0.0, 1.0]))[:3]


def _heat_rgb(slice_scene, value):
    heat = mrml.heat_color_node(slice_scene)
    index = int(np.clip(np.floor(value * heat.GetNumberOfColors()), 0, heat.GetNumberOfColors() - 1))
    rgba = [0.0] * 4
    heat.GetColor(index, rgba)
    return np.array(rgba[:3]) * 255.0, rgba[3]


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_slice_view_shows_overlay_colour_at_peak_and_background_elsewhere(slicer_scene, case, orientation):
    ct, attention = case
    scene, logic = slicer_scene.scene, slicer_scene.slice_logic
    opacity = 0.6
    overlay = mrml.attention_to_volume(attention, scene)
    mrml.configure_display(overlay)
    mrml.show_overlay(overlay, ct, opacity=opacity)
    slice_node = logic.GetSliceNode()
    slice_node.SetDimensions(256, 256, 1)
    peak = attention.peak_ras()
    if orientation == "axial":
        slice_node.SetOrientation("Axial")
        logic.FitSliceToBackground()
        logic.SetSliceOffset(peak[2])
    else:
        normal = rotation(0, 25) @ rotation(1, -35) @ np.array([0.0, 0.0, 1.0])
        slice_node.SetSliceToRASByNTP(*normal, 1.0, 0.0, 0.0, *peak, 0)
        logic.FitSliceToBackground()
        logic.SetSliceOffset(float(normal @ peak))
    composite = logic.GetSliceCompositeNode()
    shown = _render(logic)
    composite.SetForegroundVolumeID(None)
    background = _render(logic)
    composite.SetForegroundVolumeID(overlay.GetID())

    x, y = _pixel_of(slice_node, peak)
    # the attention the view interpolates at this pixel's centre, mapped through the heat table
    value = float(attention.resample_to((1, 1, 1), _translation(_ras_of(slice_node, (x, y))))[0, 0, 0])
    assert value > 0.9
    rgb, alpha = _heat_rgb(scene, value)
    expected = (1 - opacity * alpha) * background[y, x, :3] + opacity * alpha * rgb
    np.testing.assert_allclose(shown[y, x, :3], expected, atol=6)
    assert np.abs(shown[y, x, :3] - background[y, x, :3]).max() > 40  # visibly coloured

    # far from the peak, where the attention is below the transparent part of the table: untouched CT
    values = _attention_on_pixels(attention, slice_node, shown.shape[:2])
    inside_ct = background[..., :3].sum(axis=2) > 0
    far = (values < 0.5 * mrml.HEAT_TRANSPARENT_BELOW) & inside_ct
    assert far.sum() > 1000
    np.testing.assert_allclose(shown[far], background[far], atol=1)
    ys, xs = np.nonzero(far)
    farthest = np.argmax((xs - x) ** 2 + (ys - y) ** 2)
    assert np.hypot(xs[farthest] - x, ys[farthest] - y) > 40


def _translation(ras):
    affine = np.eye(4)
    affine[:3, 3] = ras
    return affine


def _attention_on_pixels(attention, slice_node, shape):
    """The attention at every pixel centre of the slice (I = x, J = y of the slice's XY grid)."""
    xy_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS())
    values = attention.resample_to((shape[1], shape[0], 1), xy_to_ras)
    return values[:, :, 0].T


# ---------------------------------------------------------------- 3D

def test_volume_rendering_uses_the_colour_table(slicer_scene, case):
    _, attention = case
    node = mrml.attention_to_volume(attention, slicer_scene.scene)
    mrml.configure_display(node)
    display = mrml.show_volume_rendering(node)
    assert display.IsA("vtkMRMLVolumeRenderingDisplayNode") and display.GetVisibility() == 1
    prop = display.GetVolumePropertyNode().GetVolumeProperty()
    assert prop.GetScalarOpacity().GetValue(0.05) == pytest.approx(0.0)
    assert prop.GetScalarOpacity().GetValue(1.0) == pytest.approx(0.4)
    assert prop.GetRGBTransferFunction().GetColor(1.0) == pytest.approx((1.0, 1.0, 1.0))
    again = mrml.show_volume_rendering(node, visible=False)
    assert again is display and display.GetVisibility() == 0


# ---------------------------------------------------------------- segment statistics

def _labelmap(mask_ijk, ijk_to_ras):
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, mask_ijk.shape[0] - 1, 0, mask_ijk.shape[1] - 1, 0, mask_ijk.shape[2] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask_ijk.transpose(2, 1, 0).ravel()
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    return image


def _box_mask(box):
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[box] = 1
    return mask


@pytest.mark.parametrize("segmentation_transformed", [False, True])
def test_segment_statistics_agree_with_numpy(slicer_scene, case, segmentation_transformed):
    ct, attention = case
    scene = slicer_scene.scene
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "findings")
    labelmap_affine = ct_affine()
    if segmentation_transformed:  # the same boxes in world, stored under a linear transform
        to_parent = np.eye(4)
        to_parent[:3, :3] = rotation(2, -12)
        to_parent[:3, 3] = (3.0, -4.0, 6.0)
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
        segmentation.SetAndObserveTransformNodeID(transform.GetID())
        labelmap_affine = np.linalg.inv(to_parent) @ labelmap_affine
    for name, box in (("nodule", CUBE), ("elsewhere", OTHER)):
        segmentation.AddSegmentFromBinaryLabelmapRepresentation(_labelmap(_box_mask(box), labelmap_affine),
                                                                name, [1.0, 0.0, 0.0])
    before = node_state(ct)
    table = mrml.segment_statistics(attention, segmentation, ct)
    rows = mrml.read_table(table)
    assert list(rows) == ["nodule", "elsewhere"]
    values = attention.resample_to(SHAPE, ct_affine())
    for name, box in (("nodule", CUBE), ("elsewhere", OTHER)):
        mask = _box_mask(box).astype(bool)
        expected = mask_statistics(values, mask)
        for key in mrml.STATISTICS_COLUMNS:
            assert rows[name][key] == pytest.approx(float(expected[key]), rel=1e-5, abs=1e-7), (name, key)
        # and plainly, without the metrics module
        assert rows[name]["mass_fraction"] == pytest.approx(values[mask].sum() / values.sum(), rel=1e-5)
        assert rows[name]["volume_fraction"] == pytest.approx(mask.mean(), rel=1e-6)
        assert rows[name]["max"] == pytest.approx(values[mask].max(), rel=1e-6)
    assert rows["elsewhere"]["pointing_hit"] == 0.0
    assert rows["nodule"]["mass_ratio"] > 5 * rows["elsewhere"]["mass_ratio"]
    assert node_state(ct) == before

    count = scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    assert mrml.segment_statistics(attention, segmentation, ct, table_node=table) is table
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == count


def test_segment_from_a_closed_surface_is_rasterised_on_the_volume_grid(slicer_scene, case):
    """The self-test's path: a sphere drawn as a surface, converted to a binary labelmap by the
    segmentation's own converter, placed on the CT grid (oblique, anisotropic)."""
    ct, attention = case
    segmentation = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "sphere")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    centre = (ct_affine() @ np.array([20.0, 18.0, 12.0, 1.0]))[:3]
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*centre)
    sphere.SetRadius(9.0)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    segment_id = segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", [1.0, 0.0, 0.0])
    mask = mrml.segment_mask(segmentation, segment_id, SHAPE, ct_affine())
    voxel_mm3 = abs(np.linalg.det(ct_affine()[:3, :3]))
    assert mask.sum() * voxel_mm3 == pytest.approx(4 / 3 * np.pi * 9.0 ** 3, rel=0.15)
    centroid = (ct_affine() @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]
    assert np.linalg.norm(centroid - centre) < 1.5  # right place, axes not swapped
    rows = mrml.read_table(mrml.segment_statistics(attention, segmentation, ct))
    assert rows["ball"]["volume_fraction"] == pytest.approx(mask.mean(), rel=1e-6)


def test_segment_statistics_bad_input(slicer_scene, case):
    ct, attention = case
    scene = slicer_scene.scene
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    before = scene.GetNumberOfNodes()
    with pytest.raises(AttentionMapError, match="'nothing'.*no segments"):
        mrml.segment_statistics(attention, empty, ct)
    with pytest.raises(AttentionMapError, match="segmentation node"):
        mrml.segment_statistics(attention, ct, ct)
    outside = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "far away")
    far_affine = ct_affine(origin=(500.0, 500.0, 500.0))  # a segment that misses the CT entirely
    outside.AddSegmentFromBinaryLabelmapRepresentation(_labelmap(_box_mask(CUBE), far_affine), "lost", [0, 1, 0])
    before = scene.GetNumberOfNodes()
    with pytest.raises(AttentionMapError, match="segment 'lost' of 'far away': empty on the grid of 'CT'"):
        mrml.segment_statistics(attention, outside, ct)
    with pytest.raises(AttentionMapError, match="no segment with ID 'nope'"):
        mrml.segment_statistics(attention, outside, ct, segment_ids=["nope"])
    assert scene.GetNumberOfNodes() == before


# ---------------------------------------------------------------- re-fusion and several cases

def test_fusing_again_into_the_same_node_equals_a_fresh_run(slicer_scene, case, oracle):
    ct, attention = case
    scene = slicer_scene.scene
    node = mrml.attention_to_volume(attention, scene)
    array, affine = mrml.volume_to_array(ct)
    query = attention.peak_ras() + np.array([-20.0, 5.0, 0.0])
    for options in ({"method": "raw", "layer": 0}, {"layer": 0, "discard_ratio": 0.5}, {"query_ras": query}):
        refused = attention.fuse_again(**options)
        mrml.attention_to_volume(refused, scene, output_node=node)
        fresh = explain(oracle, array, affine, **{"method": "rollout", **options})
        np.testing.assert_allclose(slicer.util.arrayFromVolume(node).transpose(2, 1, 0), fresh.grid, atol=1e-6)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node)), fresh.ijk_to_ras, atol=1e-9)


def test_several_cases_share_one_display_scale(slicer_scene, oracle):
    scene = slicer_scene.scene
    other_cube = (slice(6, 14), slice(28, 36), slice(3, 8))
    cases = []
    for i, (cube, bright) in enumerate(((CUBE, 1.0), (other_cube, 0.6))):
        array = ct_array(cube, seed=i)
        array[cube] = bright
        node = add_volume(scene, array, ct_affine(origin=(-30.0 + 50 * i, 20.0, -40.0)), f"CT{i}")
        cases.append(explain(oracle, *mrml.volume_to_array(node), normalize="none"))
    low = min(float(c.grid.min()) for c in cases)
    high = max(float(c.grid.max()) for c in cases)
    assert cases[0].grid.max() != pytest.approx(cases[1].grid.max())
    nodes = mrml.show_cases(cases, scene, names=["a", "b"], threshold_fraction=0.2)
    assert [n.GetName() for n in nodes] == ["a", "b"]
    for node, attention in zip(nodes, cases):
        display = node.GetDisplayNode()
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((low, high), rel=1e-6)
        assert display.GetLowerThreshold() == pytest.approx(low + 0.2 * (high - low), rel=1e-6)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node).transpose(2, 1, 0), attention.grid)
    count = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    assert mrml.show_cases(cases, scene, output_nodes=nodes) == nodes
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count
    with pytest.raises(AttentionMapError, match="2 results but 1 output nodes"):
        mrml.show_cases(cases, scene, output_nodes=nodes[:1])


# ---------------------------------------------------------------- the input node is never modified

def test_whole_pipeline_leaves_the_input_node_unchanged(slicer_scene, oracle):
    scene = slicer_scene.scene
    ct = add_volume(scene, ct_array(), ct_affine())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    ct.SetAndObserveTransformNodeID(transform.GetID())
    before = node_state(ct)
    array, affine = mrml.volume_to_array(ct)
    attention = explain(oracle, array, affine)
    node = mrml.attention_to_volume(attention, scene)
    mrml.configure_display(node, threshold=0.3)
    mrml.show_overlay(node, ct, 0.5)
    mrml.show_volume_rendering(node)
    assert node_state(ct) == before


def test_shared_scale_of_constant_maps_is_still_a_valid_window():
    grids = [np.full((2, 2, 2), 0.3, np.float32), np.full((3, 2, 2), 0.3, np.float32)]
    assert shared_scale(grids) == (pytest.approx(0.3), pytest.approx(1.3))
    assert shared_scale([np.zeros((2, 2, 2)), np.full((2, 2, 2), 2.0)]) == (0.0, 2.0)
    with pytest.raises(AttentionMapError, match="at least one"):
        shared_scale([])


# ---------------------------------------------------------------- region nodes

def test_oblique_roi_under_a_transform_becomes_the_same_box_in_world(slicer_scene):
    """A rotated markups ROI under a linear transform: region_from_node gives its box in world (RAS)
    coordinates; the region mask equals the box tested voxel by voxel from the ROI's definition."""
    from AttentionMapLib.core.geometry import apply_affine
    from AttentionMapLib.core.region import region_from_spec, region_mask

    scene = slicer_scene.scene
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lung ROI")
    roi.SetSize(30.0, 20.0, 14.0)
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = rotation(2, 25)
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation(0, 10)
    to_parent[:3, 3] = (-4.0, 6.0, 2.0)
    volume_centre = ct_affine() @ np.append((np.array(SHAPE) - 1) * 0.4, 1.0)
    object_to_node[:3, 3] = (np.linalg.inv(to_parent) @ volume_centre)[:3]  # the ROI's centre in node coordinates
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    roi.SetAndObserveTransformNodeID(transform.GetID())

    spec = mrml.region_from_node(roi, SHAPE, ct_affine())
    world = to_parent @ object_to_node  # the box's own frame in RAS
    assert spec["kind"] == "box" and spec["name"] == "lung ROI"
    np.testing.assert_allclose(spec["centre_ras"], world[:3, 3], atol=1e-6)
    np.testing.assert_allclose(spec["size_mm"], (30.0, 20.0, 14.0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(spec["axes"]), world[:3, :3], atol=1e-6)
    region = region_from_spec(spec, None)
    mask = region_mask(region, np.zeros(SHAPE), ct_affine())
    local = apply_affine(
        np.linalg.inv(world), apply_affine(ct_affine(), np.indices(SHAPE).reshape(3, -1).T.astype(float))
    )
    expected = np.all(np.abs(local) <= np.array([15.0, 10.0, 7.0]), axis=1).reshape(SHAPE)
    assert 0 < expected.sum() < expected.size and np.array_equal(mask, expected)


def test_segmentation_becomes_a_mask_on_the_input_grid(slicer_scene):
    from AttentionMapLib.core.region import MaskRegion, region_from_spec

    scene = slicer_scene.scene
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs")
    for name, box in (("left", CUBE), ("right", OTHER)):
        segmentation.AddSegmentFromBinaryLabelmapRepresentation(_labelmap(_box_mask(box), ct_affine()), name,
                                                                [0.0, 1.0, 0.0])
    spec = mrml.region_from_node(segmentation, SHAPE, ct_affine())
    assert spec["kind"] == "mask" and spec["name"] == "lungs"
    assert np.array_equal(spec["mask"], (_box_mask(CUBE) | _box_mask(OTHER)).astype(bool))
    assert isinstance(region_from_spec(spec, None), MaskRegion)
    assert mrml.region_from_node(None, SHAPE, ct_affine()) is None
    with pytest.raises(AttentionMapError, match="markups ROI or a segmentation"):
        mrml.region_from_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"), SHAPE, ct_affine())


def test_a_chosen_segment_becomes_the_segment_target_on_the_input_grid(slicer_scene):
    """Why this segment from a segmentation node: one segment (by ID, or the only one) rasterised on the input's
    grid becomes the worker's segment spec, and that spec the library's SegmentTarget over a MaskRegion."""
    from AttentionMapLib.core.region import MaskRegion, region_from_spec

    scene = slicer_scene.scene
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "findings")
    ids = [segmentation.AddSegmentFromBinaryLabelmapRepresentation(_labelmap(_box_mask(box), ct_affine()), name,
                                                                   [0.0, 1.0, 0.0])
           for name, box in (("nodule", CUBE), ("other", OTHER))]
    spec = mrml.segment_target_spec("lesion", segmentation, ids[0], SHAPE, ct_affine())
    assert spec["class"] == "lesion" and spec["region"]["name"] == "nodule"
    assert np.array_equal(spec["region"]["mask"], _box_mask(CUBE).astype(bool))
    assert isinstance(region_from_spec(spec["region"], None), MaskRegion)
    assert mrml.segment_target_spec(1, None, None, SHAPE, ct_affine()) == {"class": 1, "region": None}
    with pytest.raises(AttentionMapError, match="holds 2 segments; choose one"):
        mrml.segment_target_spec(1, segmentation, None, SHAPE, ct_affine())
    with pytest.raises(AttentionMapError, match="choose the target class"):
        mrml.segment_target_spec("", segmentation, ids[0], SHAPE, ct_affine())
    far = np.eye(4)
    far[:3, 3] = 1000.0
    lost = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lost")
    lost.AddSegmentFromBinaryLabelmapRepresentation(_labelmap(_box_mask(CUBE), far), "far", [0, 1, 0])
    with pytest.raises(AttentionMapError, match="segment 'far' has no voxel inside the input volume"):
        mrml.segment_target_spec(1, lost, None, SHAPE, ct_affine())


def test_a_networks_labels_become_named_segments_on_their_grid(slicer_scene):
    """labels_to_segmentation: one segment per label, named by class, each segment exactly its label's voxels on
    an oblique, anisotropic grid; a reused node is emptied first."""
    scene = slicer_scene.scene
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[CUBE] = 2
    labels[OTHER] = 1
    node = mrml.labels_to_segmentation(labels, ct_affine(), scene, ["background", "vessel", "nodule"])
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == [
        "vessel", "nodule"]
    for index, value in enumerate((1, 2)):
        mask = mrml.segment_mask(node, segmentation.GetNthSegmentID(index), SHAPE, ct_affine())
        assert np.array_equal(mask, labels == value)
    again = mrml.labels_to_segmentation((labels == 2).astype(np.int16), ct_affine(), scene, ["a", "b"], node=node)
    assert again is node and segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "b"
    assert not scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems()
