"""Vertebra boxes: a loose annotation (one box per vertebra), in world LPS millimetres.

Formats read (``boxesTr/CASE.json`` or ``boxesTr/CASE.mrk.json``):

- spinelm JSON::

    {"coordinate_system": "LPS", "unit": "mm",
     "boxes": [{"label": 20, "name": "L1", "center_mm": [x, y, z], "size_mm": [a, b, c],
                "axes": [[ux, uy, uz], [vx, vy, vz], [wx, wy, wz]]}]}

  ``axes`` (optional, default the world axes) are the directions of the box's three edges, the
  edge lengths being ``size_mm`` in the same order; a world-axis-aligned box may instead give
  ``"min_mm"`` and ``"max_mm"``. ``"coordinate_system": "RAS"`` flips x and y.
- 3D Slicer ROI markups (``.mrk.json``, one ``"type": "ROI"`` node per vertebra, named by vertebra,
  e.g. ``L1``): ``center`` (or the first control point), ``orientation`` (3x3 row-major, the box's
  axes as columns) and ``size``; LPS or RAS.

What a box teaches (:func:`rasterize_boxes`): its centre is the vertebra's centroid (unless the case
also has a centroid file), its inside is unknown (the segmentation loss skips it: a box around a
whole vertebra also holds canal and discs), and, between the highest and the lowest box along the
head-foot axis, every voxel outside all boxes is background. The class head grades the vertebra
from the voxels inside its box. No SimpleITK here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from spinelm import labels as L
from spinelm.io.files import read_json, write_json_atomic
from spinelm.io.landmarks import _label  # the same message for an unknown vertebra in every annotation file

BOXES_FORMAT_VERSION = 1
_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Box:
    """One vertebra's box in world LPS mm: ``axes`` rows are the unit directions of its edges,
    ``size_mm`` their lengths."""

    label: int
    center_mm: np.ndarray
    axes: np.ndarray
    size_mm: np.ndarray

    @property
    def name(self) -> str:
        return L.name_of(self.label)

    def corners(self) -> np.ndarray:
        """(8, 3) corner positions, LPS mm."""
        signs = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=np.float64)
        return self.center_mm + (signs * (self.size_mm / 2)) @ self.axes

    def in_index_space(self, to_index) -> tuple[np.ndarray, np.ndarray]:
        """``(centre, half_axes)`` under an affine world-to-index map ``to_index`` ((N, 3) -> (N, 3)): the
        centre and the three vectors from it to the middle of the faces (a box stays a parallelepiped)."""
        ends = self.center_mm[None] + self.axes * (self.size_mm[:, None] / 2)
        c = to_index(self.center_mm[None])[0]
        return c, to_index(ends) - c

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which of the (..., 3) world points lie inside (edges included)."""
        local = (np.asarray(points, dtype=np.float64) - self.center_mm) @ self.axes.T
        return np.all(np.abs(local) <= self.size_mm / 2 + 1e-6, axis=-1)


def _vec(path: Path, value, where: str, what: str) -> np.ndarray:
    try:
        v = np.asarray([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        v = np.zeros(0)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{path}: {where}: expected {what} as three numbers, found {value!r}")
    return v


def _make(path: Path, where: str, label: int, center, axes, size, flip: np.ndarray) -> Box:
    axes = np.asarray(axes, dtype=np.float64).reshape(3, 3) * flip[None, :]
    norms = np.linalg.norm(axes, axis=1)
    if np.any(norms < 1e-6) or abs(abs(np.linalg.det(axes / norms[:, None])) - 1) > 1e-3:
        raise ValueError(f"{path}: {where}: the box's axes are not three perpendicular directions ({axes.tolist()})")
    if np.any(size <= 0):
        raise ValueError(f"{path}: {where}: box size must be positive in all three directions, found {size.tolist()}")
    return Box(label, center * flip, axes / norms[:, None], size)


def _parse_spinelm(path: Path, data: dict) -> list[Box]:
    system = str(data.get("coordinate_system", "LPS")).upper()
    if system not in ("LPS", "RAS"):
        raise ValueError(f"{path}: coordinate_system {system!r} not supported; expected 'LPS' or 'RAS'")
    if str(data.get("unit", "mm")).lower() != "mm":
        raise ValueError(f"{path}: unit {data.get('unit')!r} not supported; expected 'mm'")
    flip = _RAS if system == "RAS" else np.ones(3)
    items = data.get("boxes")
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list under 'boxes'")
    out = []
    for i, item in enumerate(items):
        where = f"boxes[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{path}: {where}: expected an object with 'label', 'center_mm' and 'size_mm'")
        label = _label(path, item.get("label", item.get("name")), where)
        if "min_mm" in item or "max_mm" in item:
            lo, hi = _vec(path, item.get("min_mm"), where, "min_mm"), _vec(path, item.get("max_mm"), where, "max_mm")
            lo, hi = lo * flip, hi * flip  # corners in LPS; then one world-aligned box
            out.append(_make(path, where, label, (lo + hi) / 2, np.eye(3), np.abs(hi - lo), np.ones(3)))
            continue
        center = _vec(path, item.get("center_mm"), where, "center_mm")
        size = _vec(path, item.get("size_mm"), where, "size_mm")
        axes = item.get("axes", np.eye(3).tolist())
        try:
            axes = np.asarray(axes, dtype=np.float64).reshape(3, 3)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {where}: 'axes' must be three directions [[x, y, z], [x, y, z], "
                             f"[x, y, z]], found {item.get('axes')!r}") from None
        out.append(_make(path, where, label, center, axes, size, flip))
    return out


def _parse_slicer(path: Path, data: dict) -> list[Box]:
    out = []
    for m, markup in enumerate(data.get("markups", [])):
        if str(markup.get("type", "")).upper() != "ROI":
            continue
        where = f"markups[{m}]"
        flip = _RAS if str(markup.get("coordinateSystem", "LPS")).upper() == "RAS" else np.ones(3)
        label = _label(path, markup.get("name"), f"{where}.name")
        center = markup.get("center")
        if center is None and markup.get("controlPoints"):
            center = markup["controlPoints"][0].get("position")
        center = _vec(path, center, where, "the ROI's center")
        size = _vec(path, markup.get("size"), where, "the ROI's size")
        try:
            axes = np.asarray([float(v) for v in markup.get("orientation", np.eye(3).ravel())]).reshape(3, 3).T
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {where}: 'orientation' must be 9 numbers (a 3x3 matrix)") from None
        out.append(_make(path, where, label, center, axes, size, flip))
    if not out and data.get("markups"):
        raise ValueError(f"{path}: no ROI markups in the file; boxes are Slicer ROI nodes named by vertebra "
                         f"(e.g. 'L1')")
    return out


def read_boxes(path: str | os.PathLike) -> list[Box]:
    """Read vertebra boxes (spinelm JSON or Slicer ROI markups), in world LPS mm, cranio-caudally sorted.

    Raises:
        FileNotFoundError / ValueError: naming the file and the problem.
    """
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and "markups" in data:
        boxes = _parse_slicer(path, data)
    elif isinstance(data, dict) and "boxes" in data:
        boxes = _parse_spinelm(path, data)
    else:
        raise ValueError(f"{path}: unknown box format; expected spinelm JSON (key 'boxes') or Slicer ROI markups "
                         f"(.mrk.json)")
    seen = set()
    for b in boxes:
        if b.label in seen:
            raise ValueError(f"{path}: vertebra {b.name} has two boxes; keep one box per vertebra")
        seen.add(b.label)
    return sorted(boxes, key=lambda b: L.cranio_caudal_rank(b.label))


def write_boxes_json(path: str | os.PathLike, boxes: Iterable[Box], **extra) -> Path:
    """Write spinelm box JSON (LPS mm) atomically; ``extra`` keys go to the top level."""
    items = [{"label": b.label, "name": b.name, "center_mm": [round(float(v), 3) for v in b.center_mm],
              "size_mm": [round(float(v), 3) for v in b.size_mm],
              "axes": [[round(float(v), 6) for v in row] for row in b.axes]}
             for b in sorted(boxes, key=lambda b: L.cranio_caudal_rank(b.label))]
    return write_json_atomic(path, {"format": "spinelm-boxes", "version": BOXES_FORMAT_VERSION,
                                    "coordinate_system": "LPS", "unit": "mm", **extra, "boxes": items})


def boxes_from_mask(mask: np.ndarray, geometry) -> list[Box]:
    """The box of every vertebra label of a (z, y, x) mask, along the image's own axes (tight around its
    voxels, half a voxel beyond the outermost centres). ``geometry``: :class:`spinelm.io.image.Geometry`."""
    from scipy import ndimage

    mask = np.asarray(mask)
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    axes_zyx = direction.T[::-1]  # rows: world directions of the array axes z, y, x
    spacing_zyx = np.asarray(geometry.array_spacing)
    out = []
    objects = ndimage.find_objects(np.where(np.isin(mask, L.VALID_LABELS), mask, 0).astype(np.int32))
    for lab, sl in enumerate(objects, start=1):
        if sl is None or not L.is_valid_label(lab):
            continue
        lo = np.array([s.start for s in sl], dtype=np.float64) - 0.5
        hi = np.array([s.stop for s in sl], dtype=np.float64) - 0.5
        center = geometry.array_index_to_world((lo + hi) / 2)
        out.append(Box(lab, center, axes_zyx.copy(), (hi - lo) * spacing_zyx))
    return sorted(out, key=lambda b: L.cranio_caudal_rank(b.label))


def box_local_coordinates(shape, center, half_axes) -> tuple[tuple[slice, ...], np.ndarray]:
    """The voxels of an array of ``shape`` around a box in index space (``center`` +- the rows of
    ``half_axes``, :meth:`Box.in_index_space`): the slices of the box's bounding region and, for each
    voxel of that region, its coordinates along the three half-axes ((*region, 3); inside the box
    where every coordinate lies in [-1, 1]). The region is empty when the box misses the array."""
    c = np.asarray(center, dtype=np.float64)
    h = np.asarray(half_axes, dtype=np.float64).reshape(3, 3)
    reach = np.abs(h).sum(axis=0)
    lo = np.clip(np.floor(c - reach).astype(int), 0, shape)
    hi = np.clip(np.ceil(c + reach).astype(int) + 1, 0, shape)
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    local = np.linalg.solve(h.T, (grid - c).reshape(-1, 3).T).T  # coordinates along the half-axes
    return region, local.reshape(grid.shape)


def parallelepiped_mask(shape, center, half_axes) -> np.ndarray:
    """Boolean mask (array of ``shape``) of the voxels whose index lies in ``center`` +- the rows of
    ``half_axes`` (a box in index space: :meth:`Box.in_index_space`)."""
    out = np.zeros(shape, dtype=bool)
    region, local = box_local_coordinates(shape, center, half_axes)
    if local.size:
        out[region] = np.all(np.abs(local) <= 1 + 1e-6, axis=-1)
    return out


def box_mask(box: Box, geometry, shape) -> np.ndarray:
    """Boolean (z, y, x) mask of the voxels whose centres lie inside the box."""
    return parallelepiped_mask(shape, *box.in_index_space(geometry.world_to_array_index))


def rasterize_boxes(boxes: list[Box], geometry, ignore_value: int) -> np.ndarray:
    """A (z, y, x) int16 training mask on ``geometry``'s grid: ``ignore_value`` inside every box and beyond
    the head-foot span of the boxes, background (0) elsewhere."""
    shape = tuple(geometry.shape)
    out = np.full(shape, ignore_value, dtype=np.int16)
    if not boxes:
        return out
    heights = np.concatenate([b.corners()[:, 2] for b in boxes])  # LPS z: head-foot
    m = geometry.matrix  # world = origin + m @ itk_index; itk index = array index reversed
    coef = m[2][::-1]  # world z per unit array index (z, y, x)
    wz = geometry.origin[2] + sum(coef[a] * np.arange(shape[a]).reshape([-1 if i == a else 1 for i in range(3)])
                                  for a in range(3))
    out[np.broadcast_to((wz >= heights.min()) & (wz <= heights.max()), shape)] = 0
    for b in boxes:
        out[box_mask(b, geometry, shape)] = ignore_value
    return out
