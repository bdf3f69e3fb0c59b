"""``spinelm validate``: check a dataset folder before any heavy work and report every problem at once.

Errors (training would fail or learn garbage): unreadable or truncated files, 2-D/4-D/vector
images, non-positive spacing, NaN/Inf voxels, channels or masks whose geometry differs from the
image, mask values outside the VerSe convention or not integers, centroids outside the image or
with unknown/duplicated labels, cases without any annotation, duplicated cases, malformed
``classesTr.csv``.

Warnings (suspicious but legal): empty masks, a centroid more than
:data:`CENTROID_DISTANCE_WARNING_MM` from the voxels of its own label, centroids of vertebrae
missing from the mask, identical images under two case names, class rows for vertebrae the case
does not show.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinelm import labels as L
from spinelm.dataset import Case, Dataset, Problem, discover_dataset
from spinelm.io.image import Geometry
from spinelm.io.scan import inspect_image
from spinelm.io.landmarks import read_landmarks

#: A centroid further than this from every voxel of its own label is reported (warning). Not an
#: error: a whole-vertebra centre of mass can sit in the canal behind a thoracic body.
CENTROID_DISTANCE_WARNING_MM = 10.0
#: Centroids may lie this many voxels outside the outermost voxel centres (partial volumes).
CENTROID_OUTSIDE_MARGIN_VOXELS = 0.5


@dataclass
class ValidationReport:
    """All problems of a dataset; ``ok`` when there is no error."""

    root: Path
    n_cases: int
    n_unlabelled: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        ordered = self.errors + self.warnings
        return [p.line(self.root) for p in ordered]

    def summary(self) -> str:
        bad_cases = sorted({p.case for p in self.errors if p.case})
        head = (f"{self.root}: {self.n_cases} training case(s), {self.n_unlabelled} unlabelled; "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        if bad_cases:
            head += f"; cases with errors: {', '.join(bad_cases[:20])}" + (" ..." if len(bad_cases) > 20 else "")
        return head


def _check_image_file(path: Path, case: str, is_mask: bool = False
                     ) -> tuple[Geometry | None, np.ndarray | None, list[Problem]]:
    """Every problem of one image file (the checks ``predict`` and training share, see
    :func:`spinelm.io.scan.inspect_image`), as validation problems."""
    found = inspect_image(path, is_mask=is_mask)
    probs = [Problem("error", p.path, p.message, p.fix, case) for p in found.problems]
    return found.geometry, (found.array() if found.image is not None else None), probs


def _check_mask(case: Case, geom: Geometry) -> tuple[np.ndarray | None, Geometry | None, list[Problem]]:
    path = case.mask
    mgeom, mask, probs = _check_image_file(path, case.case_id, is_mask=True)
    if mask is None or mgeom is None:
        return None, None, probs
    diffs = mgeom.differences(geom)
    if diffs:
        probs.append(Problem("error", str(path), f"mask geometry differs from its image ({'; '.join(diffs)})",
                             "resample the mask onto the image grid or fix its header", case.case_id))
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)):
            return None, None, probs
        if np.any(mask != np.round(mask)):
            probs.append(Problem("error", str(path), "mask holds non-integer values; expected integer VerSe "
                                 "labels", "round the mask or re-export it as an integer type", case.case_id))
        mask = np.round(mask)
    values = np.unique(mask).astype(np.int64)
    bad = [int(v) for v in values if v != L.BACKGROUND and not L.is_valid_label(int(v)) and v != case.ignore_value
           and L.structure_of(int(v)) is None]
    if bad:
        probs.append(Problem("error", str(path), f"label(s) {bad} outside the VerSe convention; expected 0 "
                             f"(background) or 1-{L.MAX_LABEL} (1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6, "
                             f"26 sacrum, 27 coccyx, 28 T13), or auxiliary structures (100 + vertebra: the disc "
                             f"below it, 200 + vertebra: its endplate, 60 cord, 61 canal)",
                             "relabel the mask to the VerSe convention", case.case_id))
    if np.all(values == L.BACKGROUND):
        probs.append(Problem("warning", str(path), "mask is empty (only background)",
                             "check the annotation; an empty mask teaches 'no vertebra here'", case.case_id))
    return mask.astype(np.int64, copy=False), mgeom, probs


def _check_centroids(case: Case, geom: Geometry, mask: np.ndarray | None) -> list[Problem]:
    path, cid = case.centroids, case.case_id
    probs: list[Problem] = []
    try:
        lms = read_landmarks(path, geom)
    except (ValueError, FileNotFoundError) as exc:
        return [Problem("error", str(path), str(exc).split(": ", 1)[-1], "fix the file", cid)]
    seen = set()
    for lm in lms:
        if lm.label in seen:
            probs.append(Problem("error", str(path), f"vertebra {lm.name} listed twice", "keep one centroid per "
                                 "vertebra", cid))
        seen.add(lm.label)
    if not lms:
        probs.append(Problem("warning", str(path), "no centroids in the file", "", cid))
    present = set(np.unique(mask).tolist()) if mask is not None else set()
    boxes = None
    if mask is not None:
        from scipy import ndimage
        boxes = ndimage.find_objects(np.clip(mask, 0, L.MAX_LABEL + 1).astype(np.int32))
    for lm in lms:
        pos = np.asarray(lm.position_mm)
        if not geom.contains(pos, CENTROID_OUTSIDE_MARGIN_VOXELS):
            idx = geom.world_to_index(pos)
            probs.append(Problem("error", str(path), f"centroid {lm.name} at {_mm(pos)} mm lies outside the image "
                                 f"(voxel {_mm(idx)}, image size {geom.size})", "check the coordinate system "
                                 "(LPS vs RAS) and that the file belongs to this image", cid))
            continue
        if mask is None:
            continue
        if lm.label not in present:
            if not (case.ignore_value is not None and case.ignore_value in present):  # partial: on purpose
                probs.append(Problem("warning", str(path), f"centroid {lm.name} has no voxels in the mask",
                                     "annotate the vertebra in the mask or drop the centroid", cid))
            continue
        box = boxes[lm.label - 1]
        sub = np.argwhere(mask[box] == lm.label) + np.array([s.start for s in box])
        dist = float(np.min(np.linalg.norm(geom.array_index_to_world(sub) - pos, axis=1)))
        if dist > CENTROID_DISTANCE_WARNING_MM:
            probs.append(Problem("warning", str(path), f"centroid {lm.name} is {dist:.1f} mm from the nearest "
                                 f"voxel of its label (expected within {CENTROID_DISTANCE_WARNING_MM:g} mm)",
                                 "check the label assignment of this centroid", cid))
    return probs


def _check_scribbles(case: Case, geom: Geometry) -> list[Problem]:
    """A scribble file: readable, on the image's grid, values 0 (background strokes), vertebra labels or the
    dataset's ignore value (no stroke), and at least one stroke."""
    path, cid = case.scribbles, case.case_id
    sgeom, arr, probs = _check_image_file(path, cid, is_mask=True)
    if arr is None or sgeom is None:
        return probs
    diffs = sgeom.differences(geom)
    if diffs:
        probs.append(Problem("error", str(path), f"scribble geometry differs from its image ({'; '.join(diffs)})",
                             "draw the scribbles on the image itself or fix the header", cid))
    values = np.unique(np.round(arr)).astype(np.int64)
    bad = [int(v) for v in values if v != L.BACKGROUND and not L.is_valid_label(int(v)) and v != case.ignore_value]
    if bad:
        probs.append(Problem("error", str(path), f"value(s) {bad} in the scribbles; expected 0 (a background "
                             f"stroke), a vertebra label 1-{L.MAX_LABEL} (a stroke on that vertebra) or the 'ignore' "
                             f"value of dataset.json ({case.ignore_value}: no stroke)", "relabel the strokes", cid))
    if case.ignore_value is not None and np.all(values == case.ignore_value):
        probs.append(Problem("warning", str(path), "no stroke in the scribbles (every voxel is 'ignore')",
                             "draw the strokes or remove the file", cid))
    return probs


def _check_boxes(case: Case, geom: Geometry) -> list[Problem]:
    """A box file: readable, known vertebrae, one box each, every box centre inside the image."""
    from spinelm.io.boxes import read_boxes

    path, cid = case.boxes, case.case_id
    try:
        boxes = read_boxes(path)
    except (ValueError, FileNotFoundError) as exc:
        return [Problem("error", str(path), str(exc).split(": ", 1)[-1], "fix the file", cid)]
    probs: list[Problem] = []
    if not boxes:
        probs.append(Problem("warning", str(path), "no boxes in the file", "", cid))
    for b in boxes:
        if not geom.contains(b.center_mm, CENTROID_OUTSIDE_MARGIN_VOXELS):
            probs.append(Problem("error", str(path), f"the box of {b.name} is centred at {_mm(b.center_mm)} mm, "
                                 f"outside the image (voxel {_mm(geom.world_to_index(b.center_mm))}, image size "
                                 f"{geom.size})", "check the coordinate system (LPS vs RAS) and that the file "
                                 "belongs to this image", cid))
    if case.mask is not None and boxes:
        probs.append(Problem("warning", str(path), "the case also has a mask: training learns from the mask, "
                             "the boxes are not used", "remove one of them", cid))
    return probs


def _mm(v) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in np.asarray(v).ravel()) + ")"


def _check_case(case: Case, labelled: bool) -> tuple[list[Problem], str | None]:
    """All checks of one case; returns problems and a content hash of channel 0 (for duplicates)."""
    probs: list[Problem] = []
    geom0, digest = None, None
    for c, path in enumerate(case.images):
        geom, array, p = _check_image_file(path, case.case_id)
        probs += p
        if geom is None:
            continue
        if c == 0:
            geom0 = geom
            if array is not None:
                digest = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()
        elif geom0 is not None and not geom.same_as(geom0):
            probs.append(Problem("error", str(path), f"channel geometry differs from channel 0 "
                                 f"({'; '.join(geom.differences(geom0))})", "register and resample the channels "
                                 "onto one grid", case.case_id))
    if not labelled or geom0 is None:
        return probs, digest
    mask = None
    if case.mask is not None:
        mask, mgeom, p = _check_mask(case, geom0)
        probs += p
        if mgeom is not None and not mgeom.same_as(geom0):
            mask = None  # geometry mismatch already reported; distances would be meaningless
    if case.scribbles is not None:
        probs += _check_scribbles(case, geom0)
    if case.boxes is not None:
        probs += _check_boxes(case, geom0)
    if case.centroids is not None:
        probs += _check_centroids(case, geom0, mask)
    if case.classes:
        shown = set(np.unique(mask).tolist()) if mask is not None else None
        if shown is None and case.centroids is not None:
            try:
                shown = {lm.label for lm in read_landmarks(case.centroids, geom0)}
            except (ValueError, FileNotFoundError):
                shown = None
        for label in sorted({row[0] for row in case.classes}):
            if shown is not None and label not in shown:
                probs.append(Problem("warning", "classesTr.csv", f"case {case.case_id!r}: class given for "
                                     f"{L.name_of(label)}, which the case does not annotate",
                                     "check the row", case.case_id))
    return probs, digest


def validate_dataset(root: str | os.PathLike, num_workers: int | None = None,
                     progress: bool = True) -> ValidationReport:
    """Check every file of a dataset folder; never raises for bad content, only for a missing folder."""
    from tqdm import tqdm

    root = Path(root)
    try:
        ds: Dataset = discover_dataset(root)
    except FileNotFoundError as exc:
        return ValidationReport(root, 0, 0, [Problem("error", str(root), str(exc).split(": ", 1)[-1])])
    report = ValidationReport(root, len(ds.cases), len(ds.unlabelled), list(ds.problems))
    jobs = [(c, True) for c in ds.cases] + [(c, False) for c in ds.unlabelled]
    workers = num_workers or min(4, os.cpu_count() or 1)
    digests: dict[str, str] = {}
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda job: _check_case(*job), jobs)
        for (case, _), (probs, digest) in tqdm(zip(jobs, results), total=len(jobs), desc="Validating",
                                               unit="case", disable=not progress):
            report.problems += probs
            if digest is None:
                continue
            if digest in digests:
                report.problems.append(Problem("warning", str(case.images[0]), f"identical image to case "
                                               f"{digests[digest]!r} (duplicated case)", "remove one copy; "
                                               "duplicates leak across cross-validation folds", case.case_id))
            else:
                digests[digest] = case.case_id
    return report
