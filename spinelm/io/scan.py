"""One scan reader: the checks every input image gets, shared by ``validate``, ``predict`` and
dataset loading, and the one grouping of image files into cases and channels.

:func:`inspect_image` collects every problem of one file (``spinelm validate`` reports them
all); :func:`read_scan` reads a case's channels for prediction or training and raises a
:class:`ScanError` naming the file and its first problem (a batch records it and goes on).

The limits below are anatomical, so that a broken header is refused in milliseconds, before any
resampling: a file with 50 mm voxels (72 x 112 x 48, a "body" 3.6 m x 5.6 m x 2.4 m) would
otherwise be resampled to a 3 mm plan as 1.8e9 voxels, hours of work and tens of GB.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinelm.io.image import Geometry, ImageReadError, image_ending, nifti_integrity

#: An image needs at least this many voxels along every axis ...
MIN_VOXELS_PER_AXIS = 4
#: ... and at least this extent (mm) along every axis to hold a vertebra (a lumbar body is about
#: 30 mm high and 40 mm wide; 15 mm is half a small cervical one).
MIN_EXTENT_MM = 15.0
#: No axis of a human scan spans more than this (mm): the tallest adults measure about 2.1 m and
#: whole-body CT or MR tables cover under 2 m; in-plane fields of view are under 0.7 m.
MAX_EXTENT_MM = 2200.0
#: Voxels coarser than this (mm) along any axis cannot separate two vertebrae (centres 15-35 mm
#: apart); the thickest clinical slices are about 8 mm.
MAX_SPACING_MM = 15.0
#: The largest magnitude float32 holds; larger values cannot be represented after conversion.
FLOAT32_MAX = float(np.finfo(np.float32).max)

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class ScanError(ValueError):
    """A scan that cannot be used; the message names the file and the problem in plain words."""


@dataclass(frozen=True)
class ImageProblem:
    """One problem of one image file: what is wrong, and how to fix it."""

    path: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# ------------------------------------------------------------------------------ case grouping


def split_channel(name: str) -> tuple[str, int] | None:
    """``CASE_0001.nii.gz -> ("CASE", 1)``; None for names without an image ending or channel suffix."""
    ending = image_ending(name)
    if ending is None:
        return None
    m = _CHANNEL_RE.match(name[: -len(ending)])
    if not m:
        return None
    return m.group("case"), int(m.group("channel"))


def group_channels(files: list[Path], base: Path | None = None, require_suffix: bool = True
                   ) -> tuple[dict[str, dict[int, Path]], list[ImageProblem]]:
    """Group image files into ``{case: {channel: path}}`` (files without an image ending are skipped).

    ``CASE_0000<ending>``, ``CASE_0001...`` are the channels of ``CASE``. Without
    ``require_suffix`` a file lacking the suffix is channel 0 of a case named by its stem (a
    single-channel model labelling ordinary files). Files in subfolders of ``base`` get the folder
    in their case id (``sub__CASE``), so that two ``scan.nii.gz`` in different folders do not collide.
    """
    groups: dict[str, dict[int, Path]] = {}
    problems: list[ImageProblem] = []
    for p in files:
        ending = image_ending(p.name)
        if ending is None:
            continue
        parsed = split_channel(p.name)
        if parsed is None and require_suffix:
            problems.append(ImageProblem(str(p), f"image name lacks the channel suffix: expected CASE_0000{ending}",
                                         f"rename to {p.name[: -len(ending)]}_0000{ending} (one file per channel)"))
            continue
        case, ch = parsed if parsed else (p.name[: -len(ending)], 0)
        if base is not None:
            rel = p.parent.relative_to(base)
            if rel.parts:
                case = "__".join(rel.parts + (case,))
        if ch in groups.setdefault(case, {}):
            problems.append(ImageProblem(str(p), f"duplicated case: channel {ch:04d} of case {case!r} also exists "
                                                 f"as {groups[case][ch].name}", "keep one file per case and channel"))
            continue
        groups[case][ch] = p
    return groups, problems


def channel_problem(case: str, channels, n_channels: int) -> str | None:
    """What is wrong with a case's channel numbers (None when they are exactly 0..n-1)."""
    expected = list(range(n_channels))
    if sorted(channels) == expected:
        return None
    missing = [f"{c:04d}" for c in expected if c not in channels]
    extra = [f"{c:04d}" for c in sorted(channels) if c not in expected]
    what = "; ".join(x for x in (f"missing channel(s) {', '.join(missing)}" if missing else "",
                                 f"unexpected channel(s) {', '.join(extra)}" if extra else "") if x)
    return f"case {case!r}: expected channels {', '.join(f'{c:04d}' for c in expected)}, {what}"


@dataclass
class ScanInput:
    """One case to predict: its channel files, or why it cannot be predicted."""

    case_id: str
    paths: list[Path]
    error: str | None = None


def collect_inputs(input_path: str | os.PathLike, n_channels: int = 1, recursive: bool = False,
                   pattern: str | None = None) -> list[ScanInput]:
    """The scans under ``input_path`` (a folder or one file), grouped by case, sorted by case id.

    With a single-channel model any image file is a case (``CASE_0000`` suffixes are optional);
    a multi-channel model needs them.
    """
    root = Path(input_path)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        it = root.rglob(pattern or "*") if recursive else root.glob(pattern or "*")
        files, base = sorted(p for p in it if p.is_file() and not p.name.startswith(".")), root
    else:
        raise FileNotFoundError(f"{root}: no such file or folder")
    groups, problems = group_channels(files, base, require_suffix=n_channels > 1)
    out = []
    for prob in problems:  # files that could not be grouped still show up as failed cases
        path = Path(prob.path)
        case = "__".join(path.parent.relative_to(base).parts + (path.name[: -len(image_ending(path.name))],))
        if case not in groups:
            out.append(ScanInput(case, [path], f"{prob} -> {prob.fix}"))
    for case in sorted(groups):
        chans = groups[case]
        paths = [chans[c] for c in sorted(chans)]
        err = channel_problem(case, chans, n_channels)
        out.append(ScanInput(case, paths, f"{paths[0]}: the model needs {n_channels} channel(s); {err}" if err
                             else None))
    return sorted(out, key=lambda s: s.case_id)


# ---------------------------------------------------------------------------------- checks


def geometry_problems(path: str | os.PathLike, geom: Geometry) -> list[ImageProblem]:
    """Header checks that need no voxels: spacing, orientation, and an extent a human scan can have."""
    p = str(path)
    spacing = np.asarray(geom.spacing, dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        return [ImageProblem(p, f"voxel spacing must be positive, found {geom.spacing}",
                             "fix the header (pixdim) of the file")]
    out = []
    d = np.asarray(geom.direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1) > 1e-2:
        out.append(ImageProblem(p, "direction matrix is not a rotation (degenerate header)",
                                "fix the orientation (sform/qform) of the file"))
    extent = np.asarray(geom.size) * spacing
    ext = tuple(round(float(e), 1) for e in extent)
    if min(geom.size) == 1:
        out.append(ImageProblem(p, f"expected a 3-D volume, found size {geom.size} (a single slice)",
                                "use the whole 3-D scan"))
    elif min(geom.size) < MIN_VOXELS_PER_AXIS or extent.min() < MIN_EXTENT_MM:
        out.append(ImageProblem(p, f"image too small to hold a vertebra: size {geom.size} voxels of "
                                   f"{_mm(geom.spacing)} mm, extent {ext} mm (needs >= {MIN_VOXELS_PER_AXIS} voxels "
                                   f"and >= {MIN_EXTENT_MM:g} mm along every axis)",
                                "check the voxel size in the header (mm expected) or use a 3-D scan"))
    elif extent.max() > MAX_EXTENT_MM:
        out.append(ImageProblem(p, f"implausible physical size: {geom.size} voxels of {_mm(geom.spacing)} mm "
                                   f"span {ext} mm, more than a human body ({MAX_EXTENT_MM / 1000:g} m along any "
                                   f"axis)", "check the voxel size in the header (mm expected, not cm or m)"))
    elif spacing.max() > MAX_SPACING_MM:
        out.append(ImageProblem(p, f"voxels of {_mm(geom.spacing)} mm are too coarse to separate vertebrae (at "
                                   f"most {MAX_SPACING_MM:g} mm along every axis)",
                                "check the voxel size in the header (mm expected)"))
    return out


def voxel_problems(path: str | os.PathLike, array: np.ndarray, n_nonfinite: int = 0,
                   is_mask: bool = False) -> list[ImageProblem]:
    """Checks on the voxel values: NaN/Inf, values float32 cannot hold, an image without content."""
    p = str(path)
    if array.dtype.kind == "c":
        return [ImageProblem(p, f"complex-valued voxels ({array.dtype}); expected real intensities",
                             "store the magnitude image")]
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        n_nonfinite = n_nonfinite or int(array.size - np.count_nonzero(finite))
        if n_nonfinite:
            return [ImageProblem(p, f"{n_nonfinite} voxel(s) are NaN or Inf; expected finite values",
                                 "replace them (e.g. by the background value)")]
        big = float(np.abs(array).max()) if array.size else 0.0
        if not is_mask and array.dtype.itemsize > 4 and big > FLOAT32_MAX:
            return [ImageProblem(p, f"voxel values up to {big:.3g} are beyond what float32 holds "
                                    f"({FLOAT32_MAX:.3g}); expected image intensities",
                                 "rescale the image or fix its scaling (scl_slope) in the header")]
    elif n_nonfinite:
        return [ImageProblem(p, f"{n_nonfinite} voxel(s) are NaN or Inf; expected finite values",
                             "replace them (e.g. by the background value)")]
    if not is_mask and array.size and float(array.max()) == float(array.min()):
        return [ImageProblem(p, f"every voxel has the value {float(array.min()):g}; the image is empty",
                             "check the export of this scan")]
    return []


@dataclass
class InspectedImage:
    """What :func:`inspect_image` found: geometry and voxels when readable, and every problem."""

    geometry: Geometry | None
    image: object | None  # SimpleITK.Image as stored, or None
    problems: list[ImageProblem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def array(self) -> np.ndarray:
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(self.image)


def inspect_image(path: str | os.PathLike, is_mask: bool = False, read_voxels: bool = True) -> InspectedImage:
    """Every problem of one image file, header first (milliseconds), voxels only when the header is sound.

    Never raises for bad content; a missing file is a problem too.
    """
    from spinelm.io.image import read_geometry, read_image

    path = Path(path)
    if not path.is_file():
        return InspectedImage(None, None, [ImageProblem(str(path), "file not found", "check the path")])
    problem, n_bad, header = nifti_integrity(path)
    if problem:
        return InspectedImage(None, None, [ImageProblem(str(path), f"unreadable image ({problem})",
                                                        "re-copy or re-export the file")])
    if header:
        return InspectedImage(None, None, [ImageProblem(str(path), header, "fix the header (pixdim) of the file")])
    try:
        geom = read_geometry(path)
    except (ImageReadError, FileNotFoundError) as exc:
        return InspectedImage(None, None, [ImageProblem(str(path), _without_path(exc, path),
                                                        "re-export the file as a 3-D NIfTI, MHA or NRRD")])
    probs = geometry_problems(path, geom)
    if probs or not read_voxels:
        return InspectedImage(geom, None, probs)
    try:
        image = read_image(path, verify=False)
    except (ImageReadError, FileNotFoundError) as exc:
        return InspectedImage(geom, None, [ImageProblem(str(path), _without_path(exc, path),
                                                        "re-export the file as a 3-D NIfTI, MHA or NRRD")])
    import SimpleITK as sitk

    probs = voxel_problems(path, sitk.GetArrayViewFromImage(image), n_bad, is_mask)
    return InspectedImage(geom, None if probs else image, probs)


def read_scan(paths: list[Path] | list[str]):
    """Read and check a case's channels: ``(canonical (C, z, y, x) float32, canonical geometry,
    SimpleITK image of channel 0 as stored)``.

    Raises:
        ScanError: naming the file and its first problem (see :func:`inspect_image`), or channels
            on different grids.
    """
    import SimpleITK as sitk

    from spinelm.io.image import to_canonical

    arrays, geom, first = [], None, None
    for path in paths:
        found = inspect_image(path)
        if found.problems:
            raise ScanError(str(found.problems[0]))
        canonical = to_canonical(found.image)
        g = Geometry.from_sitk(canonical)
        if geom is not None and not g.same_as(geom):
            raise ScanError(f"{path}: geometry differs from channel 0 ({'; '.join(g.differences(geom))}); register "
                            f"and resample the channels onto one grid")
        geom = geom or g
        first = first if first is not None else found.image
        arrays.append(sitk.GetArrayFromImage(canonical).astype(np.float32, copy=False))
    return np.stack(arrays), geom, first


def _without_path(exc: Exception, path: Path) -> str:
    msg = str(exc)
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.3g}" for v in values) + ")"


__all__ = ["FLOAT32_MAX", "ImageProblem", "InspectedImage", "MAX_EXTENT_MM", "MAX_SPACING_MM",
           "MIN_EXTENT_MM", "MIN_VOXELS_PER_AXIS", "ScanError", "ScanInput", "channel_problem", "collect_inputs",
           "geometry_problems", "group_channels", "inspect_image", "read_scan", "split_channel", "voxel_problems"]
