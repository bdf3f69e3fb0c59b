"""Vertebra centroid files in three formats, all converted to world LPS millimetres.

- spinelm JSON: ``{"coordinate_system": "LPS", "unit": "mm", "vertebrae": [{"label": 20,
  "name": "L1", "position_mm": [x, y, z], "score": 0.97}]}``
- VerSe ``*_ctd.json``: ``[{"direction": ["P", "I", "R"]}, {"label": 20, "X": .., "Y": .., "Z": ..}]``
  with X/Y/Z voxel indices of the image reoriented (axes permuted/flipped) to ``direction``;
  converting needs that image's geometry.
- 3D Slicer markups ``.mrk.json``: a fiducial node whose control points are named by vertebra.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from spinelm import labels as L
from spinelm.io.files import read_json, write_json_atomic
from spinelm.io.image import Geometry, original_to_reoriented_index, reoriented_to_original_index

SPINELM_FORMAT_VERSION = 1
SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                 "Resources/Schema/markups-schema-v1.0.3.json#")
#: Reorientation VerSe uses for its centroid files.
VERSE_DEFAULT_AXCODES = "PIR"


@dataclass(frozen=True)
class Landmark:
    """One vertebra centroid.

    Attributes:
        label: VerSe label.
        position_mm: world position, LPS mm.
        score: confidence in [0, 1] for predictions, None for annotations.
    """

    label: int
    position_mm: tuple[float, float, float]
    score: float | None = field(default=None, compare=False)
    confidence: float | None = field(default=None, compare=False)  # calibrated P(identified), predictions
    class_probabilities: dict | None = field(default=None, compare=False)  # {class name: p}, with a class head

    @property
    def name(self) -> str:
        return L.name_of(self.label)

    @property
    def class_name(self) -> str | None:
        """The most probable class, when the vertebra was classified."""
        if not self.class_probabilities:
            return None
        return max(self.class_probabilities, key=self.class_probabilities.get)


def landmarks_from_arrays(labels: Sequence[int], positions: np.ndarray,
                          scores: Sequence[float] | None = None) -> list[Landmark]:
    """Build landmarks from parallel label and position arrays."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    return [Landmark(int(lab), tuple(float(v) for v in pos), None if scores is None else float(scores[i]))
            for i, (lab, pos) in enumerate(zip(labels, positions))]


def as_dict(landmarks: Iterable[Landmark]) -> dict[int, np.ndarray]:
    """``{label: position}`` for quick look-ups."""
    return {lm.label: np.asarray(lm.position_mm) for lm in landmarks}


def detect_format(path: str | os.PathLike, data=None) -> str:
    """``"spinelm"``, ``"verse"`` or ``"slicer"`` from the file name and content."""
    path = Path(path)
    if data is None:
        data = read_json(path)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "direction" in data[0]:
        return "verse"
    if isinstance(data, dict) and "markups" in data:
        return "slicer"
    if isinstance(data, dict) and "vertebrae" in data:
        return "spinelm"
    raise ValueError(f"{path}: unknown centroid format; expected spinelm JSON (key 'vertebrae'), VerSe "
                     f"ctd JSON (a list starting with {{'direction': [...]}}) or a Slicer .mrk.json")


def read_landmarks(path: str | os.PathLike, geometry: Geometry | None = None) -> list[Landmark]:
    """Read centroids from any supported format, in world LPS mm, cranio-caudally sorted.

    Args:
        path: centroid file.
        geometry: geometry of the image the centroids belong to; required for VerSe files.

    Raises:
        FileNotFoundError / ValueError: with the file and the problem.
    """
    path = Path(path)
    data = read_json(path)
    fmt = detect_format(path, data)
    if fmt == "spinelm":
        out = _parse_spinelm(path, data)
    elif fmt == "slicer":
        out = _parse_slicer(path, data)
    else:
        if geometry is None:
            raise ValueError(f"{path}: VerSe centroids are voxel coordinates; the image geometry is needed "
                             f"to convert them")
        out = _parse_verse(path, data, geometry)
    return sorted(out, key=lambda lm: L.cranio_caudal_rank(lm.label))


def _label(path: Path, value, where: str) -> int:
    try:
        return L.vertebra(value).label
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{path}: {where}: unknown vertebra {value!r}; expected a VerSe label 1-{L.MAX_LABEL} "
                         f"or a name such as 'L1'") from None


def _vector(path: Path, value, where: str) -> tuple[float, float, float]:
    try:
        vec = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        vec = ()
    if len(vec) != 3:
        raise ValueError(f"{path}: {where}: expected a position [x, y, z], found {value!r}")
    return vec


def _parse_spinelm(path: Path, data: dict) -> list[Landmark]:
    system = str(data.get("coordinate_system", "LPS")).upper()
    if system not in ("LPS", "RAS"):
        raise ValueError(f"{path}: coordinate_system {system!r} not supported; expected 'LPS' or 'RAS'")
    unit = str(data.get("unit", "mm")).lower()
    if unit != "mm":
        raise ValueError(f"{path}: unit {unit!r} not supported; expected 'mm'")
    flip = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
    out = []
    for i, item in enumerate(data.get("vertebrae", [])):
        where = f"vertebrae[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{path}: {where}: expected an object with 'label' and 'position_mm'")
        key = item.get("label", item.get("name"))
        label = _label(path, key, where)
        pos = np.asarray(_vector(path, item.get("position_mm"), where)) * flip
        score, conf, cp = item.get("score"), item.get("confidence"), item.get("class_probabilities")
        out.append(Landmark(label, tuple(pos.tolist()), None if score is None else float(score),
                            None if conf is None else float(conf),
                            {str(k): float(v) for k, v in cp.items()} if isinstance(cp, dict) else None))
    return out


def _parse_slicer(path: Path, data: dict) -> list[Landmark]:
    out = []
    for m, markup in enumerate(data.get("markups", [])):
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        flip = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
        for i, cp in enumerate(markup.get("controlPoints", [])):
            where = f"markups[{m}].controlPoints[{i}]"
            if cp.get("positionStatus", "defined") != "defined":
                continue
            label = _label(path, cp.get("label"), where)
            pos = np.asarray(_vector(path, cp.get("position"), where)) * flip
            out.append(Landmark(label, tuple(pos.tolist())))
    return out


def _parse_verse(path: Path, data: list, geometry: Geometry) -> list[Landmark]:
    direction = data[0].get("direction")
    if not isinstance(direction, (list, tuple, str)) or len(direction) != 3:
        raise ValueError(f"{path}: 'direction' must list three axis codes such as ['P', 'I', 'R'], "
                         f"found {direction!r}")
    axcodes = "".join(str(c) for c in direction).upper()
    labels_, reoriented = [], []
    for i, item in enumerate(data[1:], start=1):
        where = f"entry {i}"
        if not isinstance(item, dict) or not all(k in item for k in ("label", "X", "Y", "Z")):
            raise ValueError(f"{path}: {where}: expected {{'label', 'X', 'Y', 'Z'}}, found {item!r}")
        labels_.append(_label(path, item["label"], where))
        reoriented.append(_vector(path, (item["X"], item["Y"], item["Z"]), where))
    if not labels_:
        return []
    try:
        index = reoriented_to_original_index(geometry, np.asarray(reoriented), axcodes)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return landmarks_from_arrays(labels_, geometry.index_to_world(index))


def write_spinelm_json(path: str | os.PathLike, landmarks: Iterable[Landmark], **extra) -> Path:
    """Write spinelm LPS-mm JSON atomically; ``extra`` keys (e.g. ``source``) go to the top level."""
    items = []
    for lm in sorted(landmarks, key=lambda x: L.cranio_caudal_rank(x.label)):
        item = {"label": lm.label, "name": lm.name, "position_mm": [round(v, 3) for v in lm.position_mm]}
        if lm.score is not None:
            item["score"] = round(float(lm.score), 4)
        if lm.confidence is not None:
            item["confidence"] = round(float(lm.confidence), 4)
        if lm.class_probabilities:
            item["class"] = lm.class_name
            item["class_probabilities"] = {k: round(float(v), 4) for k, v in lm.class_probabilities.items()}
        items.append(item)
    doc = {"format": "spinelm-centroids", "version": SPINELM_FORMAT_VERSION, "coordinate_system": "LPS",
           "unit": "mm", **extra, "vertebrae": items}
    return write_json_atomic(path, doc)


def write_verse_json(path: str | os.PathLike, landmarks: Iterable[Landmark], geometry: Geometry,
                     axcodes: str = VERSE_DEFAULT_AXCODES) -> Path:
    """Write VerSe ``*_ctd.json`` (voxel indices of the image reoriented to ``axcodes``)."""
    lms = sorted(landmarks, key=lambda x: L.cranio_caudal_rank(x.label))
    doc: list[dict] = [{"direction": list(axcodes.upper())}]
    if lms:
        idx = geometry.world_to_index(np.asarray([lm.position_mm for lm in lms]))
        reo = original_to_reoriented_index(geometry, idx, axcodes)
        doc += [{"label": lm.label, "X": round(float(r[0]), 3), "Y": round(float(r[1]), 3),
                 "Z": round(float(r[2]), 3)} for lm, r in zip(lms, reo)]
    return write_json_atomic(path, doc)


def write_slicer_markups(path: str | os.PathLike, landmarks: Iterable[Landmark]) -> Path:
    """Write a 3D Slicer fiducial markups file (LPS), one control point per vertebra, named by vertebra."""
    lms = sorted(landmarks, key=lambda x: L.cranio_caudal_rank(x.label))
    points = []
    for i, lm in enumerate(lms, start=1):
        desc = ", ".join(([] if lm.class_name is None else
                          [f"class {lm.class_name} ({lm.class_probabilities[lm.class_name]:.2f})"])
                         + ([] if lm.confidence is None else [f"confidence {lm.confidence:.2f}"])
                         + ([] if lm.score is None else [f"score {lm.score:.3f}"]))
        points.append({"id": str(i), "label": lm.name, "description": desc, "associatedNodeID": "",
                       "position": [round(v, 3) for v in lm.position_mm],
                       "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
                       "selected": True, "locked": False, "visibility": True, "positionStatus": "defined"})
    doc = {"@schema": SLICER_SCHEMA,
           "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                        "locked": False, "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
                        "lastUsedControlPointNumber": len(points), "controlPoints": points,
                        "measurements": [],
                        "display": {"visibility": True, "opacity": 1.0, "color": [0.4, 1.0, 1.0],
                                    "selectedColor": [1.0, 0.5, 0.5], "propertiesLabelVisibility": True,
                                    "pointLabelsVisibility": True, "textScale": 3.0, "glyphType": "Sphere3D",
                                    "glyphScale": 3.0, "glyphSize": 5.0, "useGlyphScale": True}}]}
    return write_json_atomic(path, doc)


def centroids_from_mask(mask: np.ndarray, geometry: Geometry) -> list[Landmark]:
    """Centre of mass (world LPS mm) of every valid label in a (z, y, x) mask.

    Labels outside the convention are ignored here (validation reports them).
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    present = [int(v) for v in np.unique(mask) if v != L.BACKGROUND and L.is_valid_label(int(v))]
    if not present:
        return []
    coms = ndimage.center_of_mass(np.ones(mask.shape, dtype=np.uint8), mask, present)
    world = geometry.array_index_to_world(np.asarray(coms))
    return sorted(landmarks_from_arrays(present, world), key=lambda lm: L.cranio_caudal_rank(lm.label))
