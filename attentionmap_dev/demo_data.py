"""Data for the demo lung-nodule ViT: real chest CT, lung masks, synthetic nodules, training crops, held-out set.

Used by ``tools/train_demo_model.py``, ``tools/evaluate_demo_model.py`` and the tests, so that training,
evaluation and inference see the same preprocessing as the demo model card:
LoadImage -> EnsureChannelFirst -> Orientation("RAS") -> Spacing(2 mm; bilinear, labels nearest)
-> ScaleIntensityRange(-1000..400 HU -> 0..1, clip).
Synthetic nodules are inserted in HU on the resampled grid, before the intensity step.

Arrays are indexed (I, J, K) on the RAS 2 mm grid: I = right -> left, J = posterior -> anterior,
K = inferior -> superior (K is the direction of the 5 mm source slices).

Held-out split (regions, not only seeds): for each lung CT a z-slab (`HELDOUT_SLABS`, K indices on the 2 mm
grid) holds the centres of every held-out nodule; training nodule centres stay at least `SLAB_MARGIN`
voxels (22 mm, more than the largest nodule's reach) away from that slab, so no training nodule ever
touches a held-out nodule position. Held-out crops use their own seed. Both real tumours (lung1's
small one and lung2's large one, bounding boxes widened by `TUMOUR_MARGIN`) are kept out of every
training and held-out crop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from AttentionMapLib.errors import AttentionMapError

if TYPE_CHECKING:
    from attentionmap_dev.lesions import LesionFamily

SPACING_MM = 2.0
CROP = 48
HU_RANGE = (-1000.0, 400.0)
RADIUS_MM = (3.0, 15.0)
SMALL_RADIUS_MM = (3.0, 7.0)  # the small nodules, oversampled by `train_demo_model --small-fraction`
NODULE_HU = (-300.0, 100.0)
NOISE_HU = (10.0, 30.0)
AXIS_SCALE = (0.8, 1.25)
EDGE_MM = (0.5, 1.5)
Z_BLUR = np.array([0.25, 0.5, 0.25], dtype=np.float32)
MAX_REACH_VOX = 11  # 15 mm * 1.25 + edge + z-blur < 22 mm
TUMOUR_MARGIN = 4  # voxels (8 mm) added to each side of a real tumour's bounding box
SLAB_MARGIN = MAX_REACH_VOX
HELDOUT_SLABS: Dict[str, Tuple[int, int]] = {"lung1": (36, 52), "lung2": (100, 116)}
HELDOUT_SEED = 20261128
LUNG_HU = -400.0
REGRID_MAX_DEGREES = (12.0, 12.0, 20.0)  # random re-griddings: largest rotation about R, A and S
REGRID_IN_PLANE_MM = (0.6, 1.5)  # spacing range along the first two axes
REGRID_SLICE_MM = (1.25, 5.0)  # spacing range across slices


@dataclass
class LungCT:
    """One chest CT on the RAS 2 mm grid.

    hu: float32 (I, J, K) Hounsfield units; lung: bool (I, J, K); tumour: bool (I, J, K) real tumour label;
    ijk_to_ras: (4, 4), possibly oblique; name: e.g. "lung2", or "lung2~1" for a re-gridded copy of lung2;
    heldout_s_mm: the S (superior, mm) range of the voxel centres of the scan's held-out slab (`HELDOUT_SLABS`).
    """

    name: str
    hu: np.ndarray
    lung: np.ndarray
    tumour: np.ndarray
    ijk_to_ras: np.ndarray
    heldout_s_mm: Tuple[float, float] = (0.0, 0.0)

    @property
    def scan(self) -> str:
        """The source scan's name ("lung2" for "lung2" and its re-gridded copies "lung2~1", ...)."""
        return self.name.split("~")[0]

    def tumour_box(self, margin: int = TUMOUR_MARGIN) -> Tuple[np.ndarray, np.ndarray]:
        """Inclusive lower and exclusive upper (I, J, K) corners of the tumour bounding box, widened."""
        idx = np.argwhere(self.tumour)
        return idx.min(0) - margin, idx.max(0) + 1 + margin


@dataclass
class CropSet:
    """Crops ready for the model.

    images: float32 (N, 1, 48, 48, 48) in 0..1; labels: int64 (N,) 1 = nodule; masks: bool (N, 48, 48, 48)
    nodule voxels (all False for negatives); origins: int (N, 3) crop corner on the source grid;
    sources: list of CT names; radii_mm: float (N,) nodule mean radius (0 for negatives).
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    origins: np.ndarray
    sources: List[str]
    radii_mm: np.ndarray


def preprocessing_transforms(label: bool = False):
    """The demo card's geometric preprocessing as MONAI array transforms (loading is done by `io`).

    Orientation("RAS") -> Spacing(2 mm, bilinear; nearest when `label`), applied to a channel-first MetaTensor.
    """
    from monai.transforms import Compose, Orientation, Spacing

    mode = "nearest" if label else "bilinear"
    return Compose(
        [
            Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacing(pixdim=(SPACING_MM,) * 3, mode=mode),
        ]
    )


def intensity_transform():
    """ScaleIntensityRange(-1000..400 HU -> 0..1, clip), as in the demo card."""
    from monai.transforms import ScaleIntensityRange

    return ScaleIntensityRange(a_min=HU_RANGE[0], a_max=HU_RANGE[1], b_min=0.0, b_max=1.0, clip=True)


def scale_intensity(hu: np.ndarray) -> np.ndarray:
    """HU array (any shape) -> float32 0..1 with the card's intensity transform."""
    return np.asarray(intensity_transform()(np.asarray(hu, dtype=np.float32)), dtype=np.float32)


def _preprocess(array: np.ndarray, ijk_to_ras: np.ndarray, label: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(I, J, K) array + RAS affine -> the card's RAS 2 mm grid: (array float32, affine (4, 4))."""
    import torch
    from monai.data import MetaTensor

    tensor = MetaTensor(torch.as_tensor(array[None].astype(np.float32)), affine=torch.as_tensor(ijk_to_ras))
    out = preprocessing_transforms(label)(tensor)
    return np.asarray(out[0], dtype=np.float32), np.asarray(out.affine, dtype=np.float64)


def _resample(path: Path, label: bool) -> Tuple[np.ndarray, np.ndarray]:
    from AttentionMapLib.io import read_volume

    return _preprocess(*read_volume(path), label=label)


def regrid(image, label, direction_lps: np.ndarray, spacing: Sequence[float]):
    """SimpleITK `image` (linear, outside = its minimum) and `label` (nearest, outside = 0; None: no label) resampled
    onto a grid with `direction_lps` (3, 3) and `spacing` (mm) whose box covers the image's corners: a scan as
    another scanner or reconstruction would have gridded it. Returns (image float32, label or None)."""
    import SimpleITK as sitk

    size = np.array(image.GetSize())
    corners = np.array([[a, b, c] for a in (0, size[0] - 1) for b in (0, size[1] - 1) for c in (0, size[2] - 1)], float)
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in corners])
    local = points @ direction_lps  # coordinates along the new axes
    lo, hi = local.min(0), local.max(0)
    out_size = [int(np.ceil((h - low) / s)) + 1 for low, h, s in zip(lo, hi, spacing)]
    reference = sitk.Image(out_size, image.GetPixelID())
    reference.SetDirection(tuple(direction_lps.ravel()))
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetOrigin(tuple(float(v) for v in direction_lps @ lo))
    air = float(sitk.GetArrayViewFromImage(image).min())
    moved = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, air, sitk.sitkFloat32)
    if label is None:
        return moved, None
    moved_label = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return moved, moved_label


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Lung voxels of a chest CT in HU (I, J, K), K axial: air below -400 HU enclosed by the body
    (`region.enclosed_air`: per axial slice, components not touching the slice border, >= 100 voxels)."""
    from AttentionMapLib.core.region import enclosed_air

    return enclosed_air(hu < LUNG_HU)


def load_lung_ct(image_path: Path, label_path: Path, name: str) -> LungCT:
    """Read a chest CT and its tumour label, resample both to RAS 2 mm, and compute the lung mask."""
    hu, affine = _resample(Path(image_path), label=False)
    label, _ = _resample(Path(label_path), label=True)
    z0, z1 = HELDOUT_SLABS[name]
    s_range = tuple(float(affine[2, :3] @ [0, 0, k] + affine[2, 3]) for k in (z0, z1 - 1))
    return LungCT(name=name, hu=hu, lung=lung_mask(hu), tumour=label > 0.5, ijk_to_ras=affine,
                  heldout_s_mm=(min(s_range), max(s_range)))


def random_grid(rng: np.random.Generator, max_degrees: Sequence[float], in_plane_mm: Tuple[float, float],
                slice_mm: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """A random voxel grid for `regrid`: (degrees (3,) about R, A, S, each uniform within +-max_degrees, direction
    (3, 3), spacing (mm): uniform in `in_plane_mm` along the first two axes and in `slice_mm` across slices)."""
    from AttentionMapLib.core.geometry import rotation

    degrees = rng.uniform(-1, 1, 3) * np.broadcast_to(np.asarray(max_degrees, dtype=float), (3,))
    direction = rotation(2, degrees[2]) @ rotation(1, degrees[1]) @ rotation(0, degrees[0])
    return degrees, direction, (*rng.uniform(*in_plane_mm, 2), rng.uniform(*slice_mm))


def regridded_ct(ct: LungCT, image_path: Path, label_path: Path, rng: np.random.Generator, index: int) -> LungCT:
    """`ct`'s source files re-gridded at random (`regrid`: rotated up to `REGRID_MAX_DEGREES` about R, A and S,
    spacing uniform in `REGRID_IN_PLANE_MM` in-plane and `REGRID_SLICE_MM` across slices), then through the card's
    preprocessing: the same anatomy with other interpolation, other faces and other padding. Named
    "<ct.name>~<index>"; keeps `ct`'s held-out slab (in S mm)."""
    import SimpleITK as sitk

    from AttentionMapLib.io import image_arrays

    _, direction, spacing = random_grid(rng, REGRID_MAX_DEGREES, REGRID_IN_PLANE_MM, REGRID_SLICE_MM)
    image, label = regrid(sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path)), direction, spacing)
    hu, affine = _preprocess(*image_arrays(image), label=False)
    tumour, _ = _preprocess(*image_arrays(label), label=True)
    return LungCT(name=f"{ct.name}~{index}", hu=hu, lung=lung_mask(hu), tumour=tumour > 0.5, ijk_to_ras=affine,
                  heldout_s_mm=ct.heldout_s_mm)


def load_demo_cts(paths: Optional[Dict[str, Path]] = None) -> List[LungCT]:
    """lung1 and lung2 from the pyradiomics sample data (fetched and cached by `sample_data`)."""
    if paths is None:
        from AttentionMapLib.sample_data import fetch_sample_data

        paths = fetch_sample_data()
    return [load_lung_ct(paths[f"{n}_image"], paths[f"{n}_label"], n) for n in ("lung1", "lung2")]


def load_regridded_cts(cts: Sequence[LungCT], per_scan: int, seed: int,
                       paths: Optional[Dict[str, Path]] = None) -> List[LungCT]:
    """`per_scan` random re-griddings (`regridded_ct`) of each of `cts`, deterministic for a `seed`."""
    if paths is None:
        from AttentionMapLib.sample_data import fetch_sample_data

        paths = fetch_sample_data()
    rng = np.random.default_rng(seed)
    return [regridded_ct(ct, paths[f"{ct.name}_image"], paths[f"{ct.name}_label"], rng, i + 1)
            for ct in cts for i in range(per_scan)]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def nodule_weight(
    shape: Sequence[int], centre: Sequence[float], radius_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Soft occupancy (0..1) of a random ellipsoidal nodule on a 2 mm grid of `shape` (I, J, K).

    Semi-axes = radius_mm * U(0.8, 1.25) each, random orientation, sigmoid edge of width U(0.5, 1.5) mm,
    then blurred along K with [1/4, 1/2, 1/4] (the look of structures reconstructed from 5 mm slices).
    The nodule mask is ``weight > 0.5``. Returns float32 `shape`, zero farther than 11 voxels from `centre`.
    """
    axes = radius_mm * rng.uniform(*AXIS_SCALE, size=3)
    rot = random_rotation(rng)
    edge = rng.uniform(*EDGE_MM)
    box, d = local_offsets_mm(shape, centre)
    return place(shape, box, slice_blur(ellipsoid_occupancy(d @ rot, axes, edge)))


def local_offsets_mm(shape: Sequence[int], centre: Sequence[float]) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """The box of voxels within MAX_REACH_VOX of `centre` (voxels, I J K) inside `shape`, and each box voxel's
    offset from `centre` in mm: float64 (i, j, k, 3)."""
    c = np.asarray(centre, dtype=np.float64)
    lo = np.maximum(np.floor(c).astype(int) - MAX_REACH_VOX, 0)
    hi = np.minimum(np.floor(c).astype(int) + MAX_REACH_VOX + 2, shape)
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    return tuple(slice(a, b) for a, b in zip(lo, hi)), np.stack([(g - ci) * SPACING_MM for g, ci in zip(grids, c)], -1)


def ellipsoid_occupancy(d: np.ndarray, axes: np.ndarray, edge_mm: float) -> np.ndarray:
    """Soft occupancy of the ellipsoid with semi-axes `axes` (mm) at offsets `d` (mm, (..., 3), in the
    ellipsoid's frame): a sigmoid across the surface, of width `edge_mm`."""
    q = np.sqrt(np.sum((d / axes) ** 2, axis=-1))
    return 1.0 / (1.0 + np.exp(np.clip((q - 1.0) * np.mean(axes) / edge_mm, -50, 50)))


def slice_blur(w: np.ndarray) -> np.ndarray:
    """`w` (I, J, K) blurred along K with Z_BLUR: the look of a structure reconstructed from 5 mm slices."""
    padded = np.pad(w, ((0, 0), (0, 0), (1, 1)))
    return Z_BLUR[0] * padded[:, :, :-2] + Z_BLUR[1] * padded[:, :, 1:-1] + Z_BLUR[2] * padded[:, :, 2:]


def place(shape: Sequence[int], box: Tuple[slice, ...], w: np.ndarray) -> np.ndarray:
    """A float32 zero array of `shape` holding `w` in `box`."""
    out = np.zeros(shape, dtype=np.float32)
    out[box] = w
    return out


def insert_nodule(hu: np.ndarray, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of `hu` with a nodule of HU U(-300, 100) plus Gaussian noise (sd U(10, 30) HU) blended in
    by `weight` (same shape). The input is not modified."""
    return blend_lesion(hu, weight, rng.uniform(*NODULE_HU), rng.uniform(*NOISE_HU), rng)


def blend_lesion(hu: np.ndarray, weight: np.ndarray, level: float, sd: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of `hu` with HU `level` plus Gaussian noise (sd `sd` HU) blended in by `weight` (same shape)."""
    out = np.array(hu, dtype=np.float32)
    idx = np.nonzero(weight)
    if idx[0].size:
        box = tuple(slice(i.min(), i.max() + 1) for i in idx)
        w = weight[box]
        noise = rng.standard_normal(size=w.shape, dtype=np.float32) * np.float32(sd)
        out[box] = out[box] * (1.0 - w) + (np.float32(level) + noise) * w
    return out


def _eroded_lung(ct: LungCT) -> np.ndarray:
    """The lung mask eroded by 2 voxels (bool (I, J, K)): nodule centres well inside the parenchyma."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(ct.lung.astype(np.uint8)), [2, 2, 2])) > 0


class CropSampler:
    """Draws 48^3 (CROP) crops with and without a synthetic nodule from the lung CTs.

    region "train": nodule centres in lung (eroded by 2 voxels), at least SLAB_MARGIN voxels from the
    held-out slab; region "heldout": centres inside the held-out slab. Crops never meet a widened real
    tumour box. The whole nodule (reach 11 voxels) lies inside the crop.
    """

    def __init__(self, cts: Sequence[LungCT], region: str = "train"):
        if region not in ("train", "heldout"):
            raise AttentionMapError(f"region: expected 'train' or 'heldout', got {region!r}")
        self.cts = list(cts)
        self.region = region
        self.boxes = [ct.tumour_box() for ct in self.cts]
        eroded = [_eroded_lung(ct) for ct in self.cts]
        self.centres = [self._centres(ct, box, e) for ct, box, e in zip(self.cts, self.boxes, eroded)]
        # juxtapleural / juxtamediastinal centres: the lung's outer 2-voxel rim (next to chest wall or mediastinum)
        self.wall_centres = [self._centres(ct, box, ct.lung & ~e) for ct, box, e in zip(self.cts, self.boxes, eroded)]

    def _centres(self, ct: LungCT, box: Tuple[np.ndarray, np.ndarray], allowed: np.ndarray) -> np.ndarray:
        idx = np.argwhere(allowed)
        z0, z1 = HELDOUT_SLABS[ct.name]
        k = idx[:, 2]
        if self.region == "heldout":
            keep = (k >= z0) & (k < z1)
        else:
            keep = (k < z0 - SLAB_MARGIN) | (k >= z1 + SLAB_MARGIN)
        lo, hi = box
        near_tumour = np.all((idx >= lo - MAX_REACH_VOX) & (idx < hi + MAX_REACH_VOX), axis=1)
        return idx[keep & ~near_tumour]

    def _origin(self, ci: int, centre: np.ndarray, rng: np.random.Generator) -> Optional[np.ndarray]:
        ct = self.cts[ci]
        m = MAX_REACH_VOX + 1
        lo = np.maximum(centre - CROP + m, 0)
        hi = np.minimum(centre - m, np.array(ct.hu.shape) - CROP)
        if np.any(hi < lo):
            return None
        origin = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])
        tlo, thi = self.boxes[ci]
        if np.all((origin < thi) & (origin + CROP > tlo)):
            return None
        return origin

    def sample_pair(self, rng: np.random.Generator, radius_mm: Tuple[float, float] = RADIUS_MM, flip: bool = False,
                    wall_fraction: float = 0.0, lesion: Optional["LesionFamily"] = None):
        """One crop with and one without a nodule, same place.

        Returns (positive_hu, negative_hu, mask, origin, ct_name, radius): HU float32 (48, 48, 48),
        mask bool (48, 48, 48) nodule voxels of the positive. `flip`: random flips of each axis (same for both).
        `wall_fraction`: share of nodules centred on the lung's rim (touching the pleura or the mediastinum)
        instead of inside the eroded lung (0 draws no extra random number, so the held-out set is unchanged).
        `lesion`: a `lesions.LesionFamily` drawing the nodule instead of `nodule_weight` + `insert_nodule`.
        """
        while True:
            ci = int(rng.integers(len(self.cts)))
            wall = wall_fraction > 0 and rng.random() < wall_fraction
            ct, centres = self.cts[ci], (self.wall_centres if wall else self.centres)[ci]
            centre = centres[rng.integers(len(centres))]
            origin = self._origin(ci, centre, rng)
            if origin is not None:
                break
        sl = tuple(slice(o, o + CROP) for o in origin)
        negative = ct.hu[sl]
        radius = float(rng.uniform(*radius_mm))
        draw, insert = (nodule_weight, insert_nodule) if lesion is None else (lesion.weight, lesion.insert)
        weight = draw(negative.shape, centre - origin + rng.uniform(-0.5, 0.5, 3), radius, rng)
        positive = insert(negative, weight, rng)
        mask = weight > 0.5
        negative = negative.copy()
        if flip:
            for axis in range(3):
                if rng.random() < 0.5:
                    positive, negative, mask = (np.flip(a, axis) for a in (positive, negative, mask))
        return (
            np.ascontiguousarray(positive),
            np.ascontiguousarray(negative),
            np.ascontiguousarray(mask),
            origin,
            ct.name,
            radius,
        )

    def batches(
        self,
        rng: np.random.Generator,
        pairs: int,
        radius_mm: Tuple[float, float] = RADIUS_MM,
        flip: bool = True,
        wall_fraction: float = 0.0,
        small_pairs: int = 0,
        lesion: Optional["LesionFamily"] = None,
        lesion_pairs: int = 0,
    ) -> CropSet:
        """`pairs` paired samples as a CropSet of 2 * pairs crops (positive then its negative); the last
        `small_pairs` of them with a small nodule (radius in SMALL_RADIUS_MM) instead of one in `radius_mm`;
        the first `lesion_pairs` of them with a nodule drawn by `lesion` (a `lesions.LesionFamily`)."""
        images, labels, masks, origins, sources, radii = [], [], [], [], [], []
        empty = np.zeros((CROP,) * 3, dtype=bool)
        for i in range(pairs):
            drawn = SMALL_RADIUS_MM if i >= pairs - small_pairs else radius_mm
            family = lesion if i < lesion_pairs else None
            pos, neg, mask, origin, name, radius = self.sample_pair(rng, drawn, flip, wall_fraction, family)
            images += [pos, neg]
            labels += [1, 0]
            masks += [mask, empty]
            origins += [origin, origin]
            sources += [name, name]
            radii += [radius, 0.0]
        return CropSet(
            images=scale_intensity(np.stack(images))[:, None],
            labels=np.array(labels, dtype=np.int64),
            masks=np.stack(masks),
            origins=np.array(origins),
            sources=sources,
            radii_mm=np.array(radii),
        )


def heldout_set(cts: Sequence[LungCT], pairs: int = 128, seed: int = HELDOUT_SEED) -> CropSet:
    """The fixed held-out set: `pairs` nodules (radius U(3, 15) mm) centred in the held-out slabs, each
    crop also given without its nodule (2 * pairs crops), no flips. Deterministic for a given seed;
    the first n pairs of a larger set equal the set drawn with pairs=n."""
    return CropSampler(cts, "heldout").batches(np.random.default_rng(seed), pairs, flip=False)


def heldout_batches(cts: Sequence[LungCT], pairs: int, seed: int = HELDOUT_SEED, chunk: int = 16,
                    lesion: Optional["LesionFamily"] = None) -> Iterator[CropSet]:
    """`heldout_set` in chunks of `chunk` pairs (same crops, same order), to bound memory; with `lesion`
    (a `lesions.LesionFamily`), the held-out slabs' pairs with that generator's nodules instead."""
    sampler = CropSampler(cts, "heldout")
    rng = np.random.default_rng(seed)
    done = 0
    while done < pairs:
        n = min(chunk, pairs - done)
        yield sampler.batches(rng, n, flip=False, lesion=lesion, lesion_pairs=n)
        done += n


def token_labels(masks: np.ndarray, patch: int = 8) -> np.ndarray:
    """Per-patch "contains nodule" labels: bool (N, n1, n2, n3) from masks (N, I, J, K), C order over patches."""
    n, i, j, k = masks.shape
    m = masks.reshape(n, i // patch, patch, j // patch, patch, k // patch, patch)
    return m.any(axis=(2, 4, 6))


def crop_around(ct: LungCT, centre: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """A 48^3 crop whose centre is nearest `centre` (I, J, K) while staying inside the volume.

    Returns (image float32 (1, 48, 48, 48) in 0..1, origin (3,) int)."""
    half = CROP // 2
    origin = np.clip(np.asarray(centre, dtype=int) - half, 0, np.array(ct.hu.shape) - CROP)
    sl = tuple(slice(o, o + CROP) for o in origin)
    return scale_intensity(ct.hu[sl])[None], origin


CARD_PREPROCESSING: Dict[str, object] = {
    "orientation": "RAS",
    "spacing": [SPACING_MM] * 3,
    "intensity": {"a_min": HU_RANGE[0], "a_max": HU_RANGE[1], "b_min": 0.0, "b_max": 1.0, "clip": True},
    # Gaussian blending (weights favouring window centres): on whole lung1 / lung2, as shipped and re-gridded, the
    # flip-averaged rollout peak is steadier than with the mean (docs/TRAINING.md)
    "spatial": {"mode": "sliding_window", "overlap": 0.5, "sw_batch_size": 4, "blend": "gaussian"},
}
PATCH = 8
WINDOW_KINDS = ("inference_grid", "patch_grid", "any")


def model_input_volume(ct: LungCT) -> Tuple[np.ndarray, np.ndarray]:
    """The whole scan as the model sees it at inference: intensity-scaled, then padded by the card's
    `preprocess.fitting_transforms` (SpatialPad to the window, DivisiblePad to the patch, symmetric, value 0).

    Returns (volume float32 (I', J', K') in 0..1, offset (3,) int: index of the scan's voxel (0, 0, 0) in it).
    """
    import torch
    from monai.data import MetaTensor

    from AttentionMapLib.core.preprocess import fitting_transforms, parse_preprocessing

    image = MetaTensor(torch.from_numpy(scale_intensity(ct.hu)[None]), affine=torch.from_numpy(ct.ijk_to_ras))
    padded = fitting_transforms(parse_preprocessing(CARD_PREPROCESSING), (CROP,) * 3, (PATCH,) * 3)(image)
    origin = np.linalg.solve(np.asarray(padded.affine, dtype=np.float64), ct.ijk_to_ras[:, 3])[:3]
    return np.asarray(padded[0], dtype=np.float32), np.round(origin).astype(int)


class WholeScanSampler:
    """Lesion-free CROP^3 windows from anywhere in the whole scans, exactly as sliding-window inference cuts them.

    Each scan is taken as `model_input_volume` (padded like inference, so windows at the scan's faces hold the
    same padding). A window is allowed when it does not meet the real tumour's widened box; region "train"
    keeps the windows that do not meet the held-out slab (`LungCT.heldout_s_mm`), region "heldout"
    keeps the windows that meet it. Window starts are drawn, in equal shares, from the inference grid
    (`volume.window_starts` with the card's overlap), from the patch grid (multiples of 8) and anywhere.
    `heldout_cts`: the scans whose slab is held out (default all); a window is 48 voxels tall, so a slab
    keeps about 110 voxels (220 mm) of its scan out of training (for lung2: everything above K 52,
    its upper chest and neck), and the other scans are used whole (tumour excepted).
    """

    def __init__(self, cts: Sequence[LungCT], region: str = "train", heldout_cts: Optional[Sequence[str]] = None):
        if region not in ("train", "heldout"):
            raise AttentionMapError(f"region: expected 'train' or 'heldout', got {region!r}")
        self.cts = list(cts)
        self.region = region
        self.heldout_cts = [ct.scan for ct in self.cts] if heldout_cts is None else list(heldout_cts)
        if region == "heldout":
            self.cts = [ct for ct in self.cts if ct.scan in self.heldout_cts]
        self.volumes: List[np.ndarray] = []
        self.allowed: List[np.ndarray] = []
        for ct in self.cts:
            volume, offset = model_input_volume(ct)
            self.volumes.append(volume)
            self.allowed.append(self._allowed_starts(ct, volume.shape, offset))

    def _allowed_starts(self, ct: LungCT, shape: Sequence[int], offset: np.ndarray) -> np.ndarray:
        """bool (I'-CROP+1, J'-CROP+1, K'-CROP+1): may a window start there (see the class docstring).

        A window meets the held-out slab when the S ranges (mm) of its voxel centres and of the slab's overlap,
        which on an axis-aligned grid is the K-index test and also holds on an oblique (re-gridded) grid."""
        axes = [np.arange(n - CROP + 1) for n in shape]
        lo, hi = ct.tumour_box()
        meets = [(a + CROP > low + o) & (a < h + o) for a, low, h, o in zip(axes, lo, hi, offset)]
        tumour = meets[0][:, None, None] & meets[1][None, :, None] & meets[2][None, None, :]
        row = ct.ijk_to_ras[2, :3]  # S mm per index step; the window start a is scan index a - offset
        start_s = sum(row[d] * (axes[d] - offset[d]).reshape([-1 if e == d else 1 for e in range(3)]) for d in range(3))
        start_s = start_s + ct.ijk_to_ras[2, 3]
        reach = [sum(row[d] * c[d] for d in range(3)) for c in np.ndindex(2, 2, 2)]
        s_low = start_s + (CROP - 1) * min(reach)
        s_high = start_s + (CROP - 1) * max(reach)
        slab_low, slab_high = ct.heldout_s_mm
        slab = (s_high >= slab_low - 1e-3) & (s_low <= slab_high + 1e-3)
        if ct.scan not in self.heldout_cts:
            slab = np.zeros_like(slab)
        keep = slab if self.region == "heldout" else ~slab
        return ~tumour & keep

    def inference_grid(self, ci: int) -> np.ndarray:
        """Allowed starts (N, 3) of the windows sliding-window inference cuts from scan `ci`."""
        from AttentionMapLib.core.volume import window_starts

        overlap = float(CARD_PREPROCESSING["spatial"]["overlap"])
        axes = [window_starts(n, CROP, PATCH, overlap) for n in self.volumes[ci].shape]
        starts = np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).T
        return starts[self.allowed[ci][tuple(starts.T)]]

    def draw_start(self, rng: np.random.Generator, ci: int, kind: str) -> np.ndarray:
        """One allowed start (3,) of scan `ci`, of a `WINDOW_KINDS` kind."""
        if kind == "inference_grid":
            grid = self.inference_grid(ci)
            return grid[rng.integers(len(grid))]
        step = PATCH if kind == "patch_grid" else 1
        allowed = self.allowed[ci][::step, ::step, ::step]
        flat = np.flatnonzero(allowed)
        return np.array(np.unravel_index(flat[rng.integers(len(flat))], allowed.shape)) * step

    def window(self, ci: int, start: Sequence[int]) -> np.ndarray:
        """The window (CROP, CROP, CROP) float32 in 0..1 of scan `ci` at `start` (a view)."""
        return self.volumes[ci][tuple(slice(int(s), int(s) + CROP) for s in start)]

    def jittered(self, rng: np.random.Generator, ci: int, start: Sequence[int], jitter: int) -> np.ndarray:
        """`start` moved by up to `jitter` voxels per axis, if the moved start is allowed (else `start`)."""
        moved = np.asarray(start) + rng.integers(-jitter, jitter + 1, size=3)
        limit = np.array(self.allowed[ci].shape) - 1
        if np.all(moved >= 0) and np.all(moved <= limit) and self.allowed[ci][tuple(moved)]:
            return moved
        return np.asarray(start)

    def sample(self, rng: np.random.Generator, n: int, hard: Optional[np.ndarray] = None, hard_fraction: float = 0.0,
               flip: bool = True, jitter: int = 4) -> CropSet:
        """`n` negative windows as a CropSet (label 0, empty masks; origins are starts in the padded volume).

        hard: optional (H, 4) int rows (scan index, start I, J, K) of mined false alarms; a share
        `hard_fraction` of the windows is drawn from them (moved by up to `jitter` voxels), the rest
        uniformly over scans and `WINDOW_KINDS`. `flip`: random flips of each axis, as for the positives.
        """
        images, origins, sources = [], [], []
        for _ in range(n):
            if hard is not None and len(hard) and rng.random() < hard_fraction:
                row = hard[rng.integers(len(hard))]
                ci, start = int(row[0]), self.jittered(rng, int(row[0]), row[1:], jitter)
            else:
                ci = int(rng.integers(len(self.cts)))
                start = self.draw_start(rng, ci, WINDOW_KINDS[rng.integers(len(WINDOW_KINDS))])
            image = self.window(ci, start)
            if flip:
                for axis in range(3):
                    if rng.random() < 0.5:
                        image = np.flip(image, axis)
            images.append(np.ascontiguousarray(image))
            origins.append(start)
            sources.append(self.cts[ci].name)
        return CropSet(
            images=np.stack(images)[:, None],
            labels=np.zeros(n, dtype=np.int64),
            masks=np.zeros((n, CROP, CROP, CROP), dtype=bool),
            origins=np.array(origins),
            sources=sources,
            radii_mm=np.zeros(n),
        )


def concatenate(sets: Sequence[CropSet]) -> CropSet:
    """One CropSet holding the crops of `sets` in order."""
    return CropSet(
        images=np.concatenate([s.images for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        masks=np.concatenate([s.masks for s in sets]),
        origins=np.concatenate([s.origins for s in sets]),
        sources=[name for s in sets for name in s.sources],
        radii_mm=np.concatenate([s.radii_mm for s in sets]),
    )
