"""MRML glue: Slicer nodes <-> arrays, attention grids -> overlay volumes, tables.

Qt-free: imports only ``slicer`` (MRML classes, works with the full app and with ``slicer-core``),
``vtk``, ``numpy`` and the library. Every function takes its nodes as arguments and works in the
scene those nodes belong to (never ``slicer.mrmlScene`` implicitly), so it runs headless in tests.

Conventions: arrays handed to and returned from this module are indexed (I, J, K) (or (C, I, J, K));
Slicer's own arrays are (K, J, I) and are converted here. ``ijk_to_ras`` matrices are 4x4 float64 in
world RAS (millimetres), i.e. with the node's parent transforms applied.

Nothing here modifies an input node. Output nodes are created only after all inputs were checked,
and an existing output node is reused instead of adding a new one on every run.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .core.geometry import check_ijk_to_ras
from .errors import AttentionMapError
from .render import shared_scale

HEAT_COLOR_NODE_NAME = "AttentionMapHeat"
HEAT_TRANSPARENT_BELOW = 0.1  # colours for values < 10 % of the window are fully transparent
HEAT_OPAQUE_FROM = 0.3  # alpha ramps linearly from 0 to 1 between the two fractions
STATISTICS_COLUMNS = ("mass_fraction", "mean", "max", "volume_fraction", "mass_ratio", "pointing_hit")
ATTRIBUTE_PREFIX = "AttentionMap."
CASE_ATTRIBUTE = ATTRIBUTE_PREFIX + "caseOf"  # on a multi-case output: the ID of the volume it explains


# ---------------------------------------------------------------- matrices and geometry
# 4x4 matrices go to and from VTK through slicer.util.vtkMatrixFromArray / arrayFromVTKMatrix
# (Slicer v5.8.0 Base/Python/slicer/util.py lines 1976 and 2000; also in slicer-core).

def _node_to_world(node: Any, what: str) -> np.ndarray:
    """4x4 from the node's local coordinates to world RAS; identity without a parent transform."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise AttentionMapError(
            f"{what} '{node.GetName()}' is under the non-linear transform '{parent.GetName()}': harden the "
            "transform (Data module, right-click > Harden transform) or remove it, then run again")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_geometry(volume_node: Any) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """((I, J, K) voxel counts, 4x4 IJK-to-world-RAS) of a volume node, parent transform applied."""
    if volume_node is None or not volume_node.IsA("vtkMRMLVolumeNode"):
        raise AttentionMapError(f"volume: expected a volume node, got {volume_node!r}")
    image = volume_node.GetImageData()
    if image is None:
        raise AttentionMapError(f"volume '{volume_node.GetName()}': the node holds no voxels (image data is empty)")
    local = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(local)
    ijk_to_ras = _node_to_world(volume_node, "volume") @ slicer.util.arrayFromVTKMatrix(local)
    dims = image.GetDimensions()
    return (int(dims[0]), int(dims[1]), int(dims[2])), ijk_to_ras


def _check_scalars(volume_node: Any) -> None:
    """Refuse a volume node whose image data holds no voxel values (no scalars, or no voxels)."""
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfTuples() == 0 or 0 in image.GetDimensions():
        raise AttentionMapError(f"volume '{volume_node.GetName()}': the node's image data holds no voxel values "
                                "(no scalars); load or compute the volume first")


def volume_to_array(volume_node: Any) -> Tuple[np.ndarray, np.ndarray]:
    """A float32 copy of the voxels and their geometry: (array_ijk, ijk_to_ras).

    array_ijk is (I, J, K) for scalar volumes, (C, I, J, K) for vector volumes; ijk_to_ras maps voxel
    indices to world RAS (mm) including a linear parent transform. A non-linear parent transform is
    refused with a message saying how to fix it. The node is not modified.
    """
    _, ijk_to_ras = volume_geometry(volume_node)
    _check_scalars(volume_node)
    kji = slicer.util.arrayFromVolume(volume_node)  # a view (K, J, I) or (K, J, I, C)
    axes = (2, 1, 0) if kji.ndim == 3 else (3, 2, 1, 0)
    array_ijk = np.array(kji.transpose(axes), dtype=np.float32, order="C", copy=True)
    return array_ijk, ijk_to_ras


# ---------------------------------------------------------------- attention grid -> volume node

def _check_output_node(node: Any, scene: Any) -> None:
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise AttentionMapError(
            f"output volume '{node.GetName()}': expected a scalar volume node, got {node.GetClassName()}")
    if node.GetScene() is not scene:
        raise AttentionMapError(f"output volume '{node.GetName()}': the node is not in the scene of the input")


def _check_grid(grid: Any, ijk_to_ras: Any) -> Tuple[np.ndarray, np.ndarray]:
    values = np.asarray(grid)
    if values.ndim != 3 or min(values.shape) < 1:
        raise AttentionMapError(f"attention grid: expected a 3D array (n1, n2, n3), got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise AttentionMapError("attention grid: contains NaN or infinite values")
    return values, check_ijk_to_ras(ijk_to_ras, "attention grid")


def grid_to_volume(grid: np.ndarray, ijk_to_ras: np.ndarray, scene: Any, output_node: Any = None,
                   name: str = "Attention", attributes: Optional[Dict[str, str]] = None) -> Any:
    """Write a token grid (n1, n2, n3) indexed IJK with its exact geometry into a scalar volume node.

    Reuses ``output_node`` when given (its parent transform is removed: the geometry is world RAS),
    otherwise adds a new node named ``name``. Inputs are checked before any node is touched.
    """
    values, affine = _check_grid(grid, ijk_to_ras)
    if output_node is not None:
        _check_output_node(output_node, scene)
    node = output_node or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.float32))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
    node.SetAndObserveTransformNodeID(None)
    for key, value in (attributes or {}).items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
    return node


def attention_attributes(attention: Any) -> Dict[str, str]:
    """The options that produced a VolumeAttention, as strings to store on its node."""
    keys = ("method", "layer", "target", "head_fusion", "discard_ratio")
    return {key: str(getattr(attention, key)) for key in keys if hasattr(attention, key)}


def attention_to_volume(attention: Any, scene: Any, output_node: Any = None, name: str = "Attention") -> Any:
    """A VolumeAttention (``.grid`` IJK, ``.ijk_to_ras``) as a scalar volume node; see grid_to_volume."""
    return grid_to_volume(attention.grid, attention.ijk_to_ras, scene, output_node, name,
                          attention_attributes(attention))


# ---------------------------------------------------------------- display

def heat_color_node(scene: Any) -> Any:
    """Our heat colour table (black-red-yellow-white, transparent at low values), one per scene."""
    existing = scene.GetFirstNodeByName(HEAT_COLOR_NODE_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    node.SetAttribute("Category", "AttentionMap")
    for index, value in enumerate(np.linspace(0.0, 1.0, 256)):
        red, green, blue = (float(np.clip(3.0 * value - offset, 0.0, 1.0)) for offset in (0.0, 1.0, 2.0))
        alpha = float(np.clip((value - HEAT_TRANSPARENT_BELOW) / (HEAT_OPAQUE_FROM - HEAT_TRANSPARENT_BELOW), 0, 1))
        node.SetColor(index, f"{value:.3f}", red, green, blue, alpha)
    return node


def configure_display(volume_node: Any, color_node: Any = None, window: Tuple[float, float] = (0.0, 1.0),
                      threshold: Optional[float] = None, interpolate: bool = True) -> Any:
    """Colour, fixed window [lo, hi], optional lower threshold and interpolation of an attention volume.

    ``color_node`` defaults to heat_color_node(scene). Values below ``threshold`` are not drawn.
    Only the display node changes: the voxels are untouched. Returns the display node.
    """
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise AttentionMapError(f"display window: expected low < high, got ({low}, {high})")
    scene = volume_node.GetScene()
    color_node = color_node or heat_color_node(scene)
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    with _batch_modify(display):
        display.SetAndObserveColorNodeID(color_node.GetID())
        display.SetAutoWindowLevel(0)
        display.SetWindowLevelMinMax(low, high)
        display.SetAutoThreshold(0)
        display.SetApplyThreshold(1 if threshold is not None else 0)
        if threshold is not None:
            display.SetThreshold(float(threshold), max(high, float(threshold)) + 1e6)
        display.SetInterpolate(1 if interpolate else 0)
    return display


class _batch_modify:
    """Group a node's modifications into one Modified event (StartModify/EndModify)."""

    def __init__(self, node: Any) -> None:
        self._node, self._state = node, 0

    def __enter__(self) -> Any:
        self._state = self._node.StartModify()
        return self._node

    def __exit__(self, *exc: Any) -> None:
        self._node.EndModify(self._state)


def show_overlay(overlay_node: Any, background_node: Any = None, opacity: float = 0.5) -> int:
    """Show the attention volume as foreground of every slice view (composite node) of its scene.

    ``background_node`` (e.g. the CT) becomes the background when given. Returns the number of slice
    views updated.
    """
    if not 0.0 <= opacity <= 1.0:
        raise AttentionMapError(f"overlay opacity: expected a value in [0, 1], got {opacity}")
    scene = overlay_node.GetScene()
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    for composite in composites:
        with _batch_modify(composite):
            if background_node is not None:
                composite.SetBackgroundVolumeID(background_node.GetID())
            composite.SetForegroundVolumeID(overlay_node.GetID())
            composite.SetForegroundOpacity(float(opacity))
    return len(composites)


def set_overlay_opacity(scene: Any, overlay_node: Any, opacity: float) -> None:
    """Change the foreground opacity of the slice views that show ``overlay_node``."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() == overlay_node.GetID():
            composite.SetForegroundOpacity(float(opacity))


def show_volume_rendering(volume_node: Any, visible: bool = True, color_node: Any = None,
                          window: Tuple[float, float] = (0.0, 1.0), logic: Any = None,
                          max_opacity: float = 0.4) -> Any:
    """Show (or hide) the attention volume in 3D with colours and opacity taken from the colour table.

    ``logic``: the application's volume rendering logic (``slicer.modules.volumerendering.logic()``);
    without it a vtkSlicerVolumeRenderingLogic is made for the node's scene. Raises AttentionMapError
    when this Slicer build has no volume rendering, and for a node that is not a volume or holds no voxel
    values. Returns the volume rendering display node.
    """
    volume_geometry(volume_node)
    _check_scalars(volume_node)
    if logic is None:
        logic_class = getattr(slicer, "vtkSlicerVolumeRenderingLogic", None)
        if logic_class is None:
            raise AttentionMapError("show in 3D: volume rendering is not available in this Slicer build "
                                    "(no vtkSlicerVolumeRenderingLogic)")
        logic = logic_class()
        logic.SetMRMLScene(volume_node.GetScene())
    display = logic.GetFirstVolumeRenderingDisplayNode(volume_node)
    if display is None:
        if not visible:
            return None
        if volume_node.GetDisplayNode() is None:
            configure_display(volume_node, color_node, window)
        display = logic.CreateDefaultVolumeRenderingNodes(volume_node)
    if visible:
        _set_transfer_functions(display.GetVolumePropertyNode(),
                                color_node or heat_color_node(volume_node.GetScene()), window, max_opacity)
    display.SetVisibility(1 if visible else 0)
    return display


def _set_transfer_functions(property_node: Any, color_node: Any, window: Tuple[float, float],
                            max_opacity: float) -> None:
    """Colour and opacity functions from the colour table, set through the vtkMRMLVolumePropertyNode:
    its SetColor / SetScalarOpacity move the node's observers onto the new functions (Slicer v5.8.0
    vtkMRMLVolumePropertyNode.cxx, SetColor), so later edits (Volume Rendering module) reach the node;
    setting them on the vtkVolumeProperty directly would leave the node observing the old ones."""
    low, high = float(window[0]), float(window[1])
    colors, opacity = vtk.vtkColorTransferFunction(), vtk.vtkPiecewiseFunction()
    count = color_node.GetNumberOfColors()
    rgba = [0.0, 0.0, 0.0, 0.0]
    for index in range(count):
        color_node.GetColor(index, rgba)
        value = low + (high - low) * index / max(count - 1, 1)
        colors.AddRGBPoint(value, rgba[0], rgba[1], rgba[2])
        opacity.AddPoint(value, rgba[3] * max_opacity)
    with _batch_modify(property_node):
        property_node.SetColor(colors)
        property_node.SetScalarOpacity(opacity)


# ---------------------------------------------------------------- query point

def _defined_points(markups_node: Any) -> List[int]:
    """Indices of the control points with a defined position (not the preview a placement shows)."""
    return [i for i in range(markups_node.GetNumberOfControlPoints())
            if markups_node.GetNthControlPointPositionStatus(i) == markups_node.PositionDefined]


def keep_newest_control_point(markups_node: Any) -> bool:
    """Leave only the most recently placed (defined) control point of a point list: placing again
    moves the query instead of adding a second point that would be ignored. A preview point shown
    while placing is left alone. Returns True if points were removed."""
    defined = _defined_points(markups_node)
    if len(defined) <= 1:
        return False
    with _batch_modify(markups_node):
        for index in reversed(defined[:-1]):
            markups_node.RemoveNthControlPoint(index)
    return True


def query_point_ras(markups_node: Any) -> Optional[np.ndarray]:
    """World RAS (3,) of the newest defined control point, or None (no node, or nothing placed yet)."""
    defined = _defined_points(markups_node) if markups_node is not None else []
    if not defined:
        return None
    position = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(defined[-1], position)
    return np.array(position)


# ---------------------------------------------------------------- region (where to look)

def region_from_node(node: Any, shape_ijk: Sequence[int], ijk_to_ras: np.ndarray) -> Optional[Dict[str, Any]]:
    """The region a markups ROI or a segmentation node defines, as plain data for `region.region_from_spec`.

    vtkMRMLMarkupsROINode: a box in world (RAS) coordinates, parent transforms and rotation (oblique ROI)
    included: centre, edge lengths and the three unit axes (Slicer v5.8.0
    Modules/Loadable/Markups/MRML/vtkMRMLMarkupsROINode.h: GetCenterWorld, GetSizeWorld, GetAxisWorld).
    vtkMRMLSegmentationNode: the union of its segments rasterised on the input's grid (`segment_mask`:
    shape_ijk, ijk_to_ras). None: no node.
    """
    if node is None:
        return None
    name = node.GetName() or "region"
    if node.IsA("vtkMRMLMarkupsROINode"):
        centre, size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        node.GetCenterWorld(centre)
        node.GetSizeWorld(size)
        axes = np.zeros((3, 3))
        for index in range(3):
            axis = [0.0, 0.0, 0.0]
            node.GetAxisWorld(index, axis)
            axes[:, index] = np.asarray(axis) / max(np.linalg.norm(axis), 1e-12)
        return {"kind": "box", "centre_ras": list(centre), "size_mm": list(size), "axes": axes.tolist(), "name": name}
    if node.IsA("vtkMRMLSegmentationNode"):
        mask = np.zeros(tuple(int(s) for s in shape_ijk), dtype=bool)
        for segment_id in _segment_ids(node, None):
            mask |= segment_mask(node, segment_id, shape_ijk, ijk_to_ras)
        if not mask.any():
            raise AttentionMapError(f"region '{name}': the segmentation has no voxel inside the input volume")
        return {"kind": "mask", "mask": mask, "ijk_to_ras": np.asarray(ijk_to_ras, dtype=np.float64), "name": name}
    raise AttentionMapError(f"region: expected a markups ROI or a segmentation node, got {node.GetClassName()}")


def segment_target_spec(target_class: Any, segmentation_node: Any, segment_id: Optional[str],
                        shape_ijk: Sequence[int], ijk_to_ras: np.ndarray) -> Dict[str, Any]:
    """'Why this segment' as plain data for `worker.explain_job(segment=...)`: the class (name or index) and the
    segment rasterised on the input's grid (`segment_mask`), or no region (the network's own labels of the class)
    when no segmentation is chosen. ``segment_id`` None: the segmentation's only segment (several: refused)."""
    if target_class is None or str(target_class).strip() == "":
        raise AttentionMapError("why this segment: choose the target class to explain (run the model once to fill "
                                "the class list, or type it in the model card's classes)")
    if segmentation_node is None:
        return {"class": target_class, "region": None}
    ids = _segment_ids(segmentation_node, None if segment_id is None else [segment_id])
    if len(ids) != 1:
        raise AttentionMapError(f"why this segment: segmentation '{segmentation_node.GetName()}' holds {len(ids)} "
                                "segments; choose one")
    mask = segment_mask(segmentation_node, ids[0], shape_ijk, ijk_to_ras)
    name = segmentation_node.GetSegmentation().GetSegment(ids[0]).GetName()
    if not mask.any():
        raise AttentionMapError(f"why this segment: segment '{name}' has no voxel inside the input volume")
    return {"class": target_class,
            "region": {"kind": "mask", "mask": mask, "ijk_to_ras": np.asarray(ijk_to_ras, dtype=np.float64),
                       "name": name}}


def labels_to_segmentation(labels: np.ndarray, ijk_to_ras: np.ndarray, scene: Any, names: Sequence[str],
                           node: Any = None, name: str = "Network segmentation") -> Any:
    """A network's labels (int (I, J, K), 0 = none) placed by ``ijk_to_ras`` as a segmentation node: one segment
    per label present, named ``names[label]`` (else "label N"); ``node`` (a segmentation node) is emptied and
    reused, else a new one is added. Imported through a temporary labelmap node, removed again."""
    values = [int(v) for v in np.unique(labels) if v != 0]
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(labels.transpose(2, 1, 0), dtype=np.int16))
        labelmap.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=np.float64)))
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            node.CreateDefaultDisplayNodes()
        node.GetSegmentation().RemoveAllSegments()
        if values and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
            raise AttentionMapError("network segmentation: Slicer could not import the labels")
    finally:
        scene.RemoveNode(labelmap)
    segmentation = node.GetSegmentation()
    for index, value in enumerate(values):  # imported in increasing label order
        segmentation.GetNthSegment(index).SetName(names[value] if value < len(names) else f"label {value}")
    return node


# ---------------------------------------------------------------- segment statistics

def segment_mask(segmentation_node: Any, segment_id: str, shape_ijk: Sequence[int],
                 ijk_to_ras: np.ndarray) -> np.ndarray:
    """A segment rasterised (nearest neighbour) on a voxel grid: bool array (I, J, K).

    Uses the segmentation's binary labelmap representation (created when missing) and follows the
    segmentation's parent transforms, linear or not.
    """
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        raise AttentionMapError(
            f"segmentation '{segmentation_node.GetName()}': no segment with ID '{segment_id}'")
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if not segmentation_node.GetSegmentation().ContainsRepresentation(binary):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, int(shape_ijk[0]) - 1, 0, int(shape_ijk[1]) - 1, 0, int(shape_ijk[2]) - 1)
    reference.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(segmentation_node.GetParentTransformNode(), None, to_world)
    resampled = slicer.vtkOrientedImageData()
    ext = labelmap.GetExtent()
    if ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5]:  # empty segment
        return np.zeros(tuple(int(s) for s in shape_ijk), dtype=bool)
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, False, to_world, 0)
    kji = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    dims = resampled.GetDimensions()
    return kji.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0) > 0


def _segment_ids(segmentation_node: Any, segment_ids: Optional[Sequence[str]]) -> List[str]:
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise AttentionMapError(f"segmentation: expected a segmentation node, got {segmentation_node!r}")
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else [
        segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise AttentionMapError(f"segmentation '{segmentation_node.GetName()}': it has no segments")
    return ids


def segment_statistics(attention: Any, segmentation_node: Any, reference_volume_node: Any,
                       table_node: Any = None, segment_ids: Optional[Sequence[str]] = None) -> Any:
    """Attention inside each segment, one table row per segment.

    Attention (VolumeAttention) and segments are both placed on the voxel grid of
    ``reference_volume_node`` (the scanned volume: attention by VolumeAttention.resample_to, segments by
    segment_mask), then metrics.mask_statistics gives mass_fraction, mean, max, volume_fraction,
    mass_ratio and pointing_hit. Writes a vtkMRMLTableNode (reused when given) with a "segment"
    column and one column per statistic. Returns the table node.
    """
    from .core.metrics import mask_statistics  # imported here: the Slicer module loads this file at start-up

    ids = _segment_ids(segmentation_node, segment_ids)
    shape, ijk_to_ras = volume_geometry(reference_volume_node)
    values = np.asarray(attention.resample_to(shape, ijk_to_ras), dtype=np.float32)
    rows = []
    for sid in ids:
        mask = segment_mask(segmentation_node, sid, shape, ijk_to_ras)
        name = segmentation_node.GetSegmentation().GetSegment(sid).GetName()
        if not mask.any():
            raise AttentionMapError(f"segment '{name}' of '{segmentation_node.GetName()}': empty on the grid of "
                                    f"'{reference_volume_node.GetName()}' (nothing painted, or outside the volume)")
        rows.append((name, mask_statistics(values, mask)))
    if table_node is not None and not table_node.IsA("vtkMRMLTableNode"):
        raise AttentionMapError(f"statistics table: expected a table node, got {table_node.GetClassName()}")
    scene = reference_volume_node.GetScene()
    table_node = table_node or scene.AddNewNodeByClass("vtkMRMLTableNode",
                                                      scene.GenerateUniqueName("Attention statistics"))
    _fill_table(table_node, rows)
    return table_node


def _fill_table(table_node: Any, rows: List[Tuple[str, Dict[str, Any]]]) -> None:
    table = vtk.vtkTable()
    names = vtk.vtkStringArray()
    names.SetName("segment")
    for name, _ in rows:
        names.InsertNextValue(name)
    table.AddColumn(names)
    for key in STATISTICS_COLUMNS:
        column = vtk.vtkDoubleArray()
        column.SetName(key)
        for _, stats in rows:
            column.InsertNextValue(float(stats[key]))
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)


def read_table(table_node: Any) -> Dict[str, Dict[str, float]]:
    """Segment name -> {statistic: value} from a table written by segment_statistics."""
    table = table_node.GetTable()
    names = table.GetColumnByName("segment")
    return {names.GetValue(row): {key: table.GetColumnByName(key).GetValue(row) for key in STATISTICS_COLUMNS}
            for row in range(table.GetNumberOfRows())}


# ---------------------------------------------------------------- several cases, one scale

def case_output_nodes(volume_nodes: Sequence[Any]) -> List[Optional[Any]]:
    """The attention node made earlier for each input volume by show_cases (None where there is none),
    so that explaining the same cases again reuses their nodes."""
    found = []
    for volume in volume_nodes:
        scene = volume.GetScene()
        nodes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                 for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
        found.append(next((n for n in nodes if n.GetAttribute(CASE_ATTRIBUTE) == volume.GetID()), None))
    return found


def show_cases(attentions: Sequence[Any], scene: Any, output_nodes: Optional[Sequence[Any]] = None,
               names: Optional[Sequence[str]] = None, color_node: Any = None,
               threshold_fraction: Optional[float] = None, source_nodes: Optional[Sequence[Any]] = None) -> List[Any]:
    """Several VolumeAttention results as volume nodes with one shared display window and colours.

    ``output_nodes`` (same length, entries may be None) are reused; ``threshold_fraction`` is a
    fraction of the shared window; ``source_nodes`` (the explained volumes) are recorded on the
    nodes for case_output_nodes. Returns the volume nodes in input order.
    """
    count = len(attentions)
    output_nodes = list(output_nodes) if output_nodes is not None else [None] * count
    names = list(names) if names is not None else [f"Attention case {i + 1}" for i in range(count)]
    if len(output_nodes) != count or len(names) != count or len(source_nodes or attentions) != count:
        raise AttentionMapError(f"multi-case: {count} results but {len(output_nodes)} output nodes, "
                                f"{len(names)} names and {len(source_nodes or attentions)} source volumes")
    for attention in attentions:  # every case is checked before the first node is made
        _check_grid(attention.grid, attention.ijk_to_ras)
    window = shared_scale([a.grid for a in attentions])
    threshold = None if threshold_fraction is None else window[0] + threshold_fraction * (window[1] - window[0])
    nodes = [attention_to_volume(a, scene, node, name) for a, node, name in zip(attentions, output_nodes, names)]
    for index, node in enumerate(nodes):
        configure_display(node, color_node, window, threshold)
        if source_nodes is not None:
            node.SetAttribute(CASE_ATTRIBUTE, source_nodes[index].GetID())
    return nodes


# ---------------------------------------------------------------- window-less slice views (slicer-core)

def headless_scene() -> Tuple[Any, Any]:
    """(scene, application logic) set up as the Slicer application does at start-up: default colour
    tables, slice orientation presets, segmentation converter rules. Keep the application logic
    referenced while the scene is in use: slice logics do not hold a reference to it."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():  # once per process, as the Segmentations module does
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                     slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
            factory.RegisterConverterRule(rule())
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetSliceLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    return scene, app


def add_slice_view(scene: Any, app: Any, name: str, orientation: Optional[str] = None) -> Any:
    """A slice view without a window ("Red", "Green", ...): its vtkMRMLSliceLogic."""
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(app)
    logic.SetMRMLScene(scene)
    node = logic.AddSliceNode(name)
    if orientation:
        node.SetOrientation(orientation)
    return logic


def render_slice(slice_logic: Any) -> np.ndarray:
    """The RGBA image (rows, columns, 4) uint8 the view would draw: background, foreground and label
    layers blended by vtkMRMLSliceLogic. Row y, column x is the slice's XY pixel (x, y) (bottom-up)."""
    producer = slice_logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutput()
    width, height, _ = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1).copy()
