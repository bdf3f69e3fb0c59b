"""Images and their geometry: the one place where voxel and world coordinates meet.

World coordinates are ITK/DICOM LPS millimetres. A voxel index ``(i, j, k)`` in ITK order
(``i`` fastest along the file's first axis) maps to the world as

    p = origin + D @ (spacing * (i, j, k))

with ``D`` the full 3x3 direction matrix (oblique allowed). NumPy arrays obtained from
SimpleITK are indexed the other way round, ``array[k, j, i]``; the ``array_*`` helpers take and
return indices in that NumPy order so callers never reverse axes by hand.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

#: File endings spinelm reads as images (through SimpleITK).
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")

#: Orientation every array is brought to for fingerprinting, planning and training: ITK axes
#: pointing to patient Left, Posterior, Superior, so NumPy axis 0 is cranio-caudal.
CANONICAL_ORIENTATION = "LPS"

# letter for the positive and negative end of each LPS world axis
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))
_OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}


class ImageReadError(ValueError):
    """An image file exists but cannot be used; the message names the file and the problem."""


def image_ending(path: str | os.PathLike) -> str | None:
    """The recognised image ending of ``path`` (``".nii.gz"``), or None."""
    name = str(path).lower()
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return ending
    return None


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie in the world.

    Attributes:
        size: number of voxels per ITK axis (x, y, z).
        spacing: voxel size in mm per ITK axis.
        origin: world position (LPS mm) of voxel (0, 0, 0)'s centre.
        direction: row-major 3x3 direction matrix; column ``a`` is the world direction of ITK axis ``a``.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(s) for s in image.GetOrigin()), tuple(float(s) for s in image.GetDirection()))

    @property
    def matrix(self) -> np.ndarray:
        """3x3 matrix ``D @ diag(spacing)``: world displacement per unit ITK index."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing)[None, :]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape in NumPy order (z, y, x)."""
        return tuple(reversed(self.size))

    @property
    def array_spacing(self) -> tuple[float, float, float]:
        """Spacing in NumPy axis order (z, y, x)."""
        return tuple(reversed(self.spacing))

    def index_to_world(self, index: np.ndarray | Sequence[float]) -> np.ndarray:
        """Continuous ITK indices ``(..., 3)`` to LPS mm ``(..., 3)``."""
        idx = np.asarray(index, dtype=np.float64)
        return idx @ self.matrix.T + np.asarray(self.origin)

    def world_to_index(self, points: np.ndarray | Sequence[float]) -> np.ndarray:
        """LPS mm ``(..., 3)`` to continuous ITK indices ``(..., 3)``."""
        pts = np.asarray(points, dtype=np.float64) - np.asarray(self.origin)
        return np.linalg.solve(self.matrix, pts.reshape(-1, 3).T).T.reshape(pts.shape)

    def array_index_to_world(self, index_zyx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Continuous NumPy indices ``(..., 3)`` in (z, y, x) order to LPS mm."""
        return self.index_to_world(np.asarray(index_zyx, dtype=np.float64)[..., ::-1])

    def world_to_array_index(self, points: np.ndarray | Sequence[float]) -> np.ndarray:
        """LPS mm to continuous NumPy indices in (z, y, x) order."""
        return self.world_to_index(points)[..., ::-1]

    def contains(self, points: np.ndarray | Sequence[float], margin_voxels: float = 0.5) -> np.ndarray:
        """Whether world points lie inside the image (voxel centres +- ``margin_voxels``)."""
        idx = self.world_to_index(points)
        lo = -margin_voxels
        hi = np.asarray(self.size, dtype=np.float64) - 1 + margin_voxels
        return np.all((idx >= lo) & (idx <= hi), axis=-1)

    def axis_codes(self) -> str:
        """Anatomical direction each ITK axis points towards, closest match (``"LPS"``, ``"PIR"``).

        For oblique images the assignment maximises the total alignment, so every world axis is
        used exactly once.
        """
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        best = max(itertools.permutations(range(3)),
                   key=lambda perm: sum(abs(d[perm[a], a]) for a in range(3)))
        return "".join(_AXIS_LETTERS[best[a]][0 if d[best[a], a] >= 0 else 1] for a in range(3))

    def cranio_caudal_array_axis(self) -> int:
        """NumPy axis (0, 1 or 2) that runs closest to the head-foot direction."""
        codes = self.axis_codes()
        itk_axis = next(a for a, c in enumerate(codes) if c in "SI")
        return 2 - itk_axis

    def same_as(self, other: "Geometry", rtol: float = 1e-3, atol_mm: float = 1e-2) -> bool:
        """Whether the two grids coincide (within the tolerances of :meth:`differences`)."""
        return not self.differences(other, rtol, atol_mm)

    def differences(self, other: "Geometry", rtol: float = 1e-3, atol_mm: float = 1e-2) -> list[str]:
        """Differences to ``other`` as readable strings (empty when the grids coincide)."""
        diffs = []
        if self.size != other.size:
            diffs.append(f"size {self.size} vs {other.size}")
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=1e-4):
            diffs.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        tol = max(atol_mm, 0.05 * min(self.spacing))
        if not np.allclose(self.origin, other.origin, atol=tol):
            diffs.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, atol=1e-3):
            diffs.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return diffs

    def to_json(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_json(cls, data: dict) -> "Geometry":
        """Inverse of :meth:`to_json`."""
        return cls(tuple(int(v) for v in data["size"]), tuple(float(v) for v in data["spacing"]),
                   tuple(float(v) for v in data["origin"]), tuple(float(v) for v in data["direction"]))


@dataclass(frozen=True)
class Frame:
    """Where the voxels of a preprocessed array lie in the world: the canonical geometry of the scan
    and nnU-Net's transpose, crop and resampling (voxel centres: ``x' = (x + 0.5) * new / old - 0.5``).

    Attributes:
        geometry: canonical geometry of the scan.
        transpose_forward: the plan's axis transpose (canonical -> network order).
        bbox: crop box per network axis, ``((start, stop), ...)``.
        shape_after_cropping: array shape after the crop, before resampling.
        shape: preprocessed array shape.
    """

    geometry: Geometry
    transpose_forward: tuple[int, int, int]
    bbox: tuple[tuple[int, int], ...]
    shape_after_cropping: tuple[int, int, int]
    shape: tuple[int, int, int]

    @classmethod
    def from_info(cls, geometry: Geometry, transpose_forward, info: dict) -> "Frame":
        """From the preprocessor's ``info`` (``bbox``, ``shape_after_cropping``, ``shape``) or a cached
        case's properties (``bbox_used_for_cropping`` instead of ``bbox``)."""
        bbox = info["bbox"] if "bbox" in info else info["bbox_used_for_cropping"]
        return cls(geometry, tuple(int(a) for a in transpose_forward), tuple(tuple(int(v) for v in b) for b in bbox),
                   tuple(int(v) for v in info["shape_after_cropping"]), tuple(int(v) for v in info["shape"]))

    def _scale(self) -> np.ndarray:
        return np.asarray(self.shape, dtype=np.float64) / np.asarray(self.shape_after_cropping, dtype=np.float64)

    def to_world(self, index: np.ndarray) -> np.ndarray:
        """Continuous preprocessed voxel indices ``(N, 3)`` -> world LPS mm ``(N, 3)``."""
        idx = (np.asarray(index, dtype=np.float64).reshape(-1, 3) + 0.5) / self._scale() - 0.5
        idx = idx + np.asarray([b[0] for b in self.bbox], dtype=np.float64)
        canonical = np.empty_like(idx)
        canonical[:, list(self.transpose_forward)] = idx
        return self.geometry.array_index_to_world(canonical)

    def from_world(self, points_mm: np.ndarray) -> np.ndarray:
        """World LPS mm ``(N, 3)`` -> continuous preprocessed voxel indices (inverse of :meth:`to_world`)."""
        idx = self.geometry.world_to_array_index(np.asarray(points_mm, dtype=np.float64).reshape(-1, 3))
        idx = idx[:, list(self.transpose_forward)] - np.asarray([b[0] for b in self.bbox], dtype=np.float64)
        return (idx + 0.5) * self._scale() - 0.5


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def opposite_code(letter: str) -> str:
    """``"L" -> "R"`` etc."""
    return _OPPOSITE[letter.upper()]


def _axis_map(geometry: Geometry, axcodes: str) -> list[tuple[int, bool]]:
    """For each axis of the image reoriented to ``axcodes``: (original ITK axis, flipped?)."""
    codes = geometry.axis_codes()
    axcodes = axcodes.upper()
    _check_axcodes(axcodes)
    return [(codes.index(c), False) if c in codes else (codes.index(opposite_code(c)), True) for c in axcodes]


def reoriented_to_original_index(geometry: Geometry, index: np.ndarray, axcodes: str) -> np.ndarray:
    """Map voxel indices of the image reoriented (permute/flip only) to ``axcodes`` back to ITK indices.

    This is the voxel space of VerSe centroid files: ``axcodes`` such as ``"PIR"`` names, for each
    axis of the reoriented image, the direction it points towards.
    """
    index = np.asarray(index, dtype=np.float64)
    out = np.empty_like(index)
    for r, (a, flipped) in enumerate(_axis_map(geometry, axcodes)):
        out[..., a] = geometry.size[a] - 1 - index[..., r] if flipped else index[..., r]
    return out


def original_to_reoriented_index(geometry: Geometry, index: np.ndarray, axcodes: str) -> np.ndarray:
    """Inverse of :func:`reoriented_to_original_index`."""
    index = np.asarray(index, dtype=np.float64)
    out = np.empty_like(index)
    for r, (a, flipped) in enumerate(_axis_map(geometry, axcodes)):
        out[..., r] = geometry.size[a] - 1 - index[..., a] if flipped else index[..., a]
    return out


def _check_axcodes(axcodes: str) -> None:
    worlds = sorted("LPS".index(c) if c in "LPS" else "RAI".index(c) for c in axcodes if c in "LPSRAI")
    if len(axcodes) != 3 or worlds != [0, 1, 2]:
        raise ValueError(f"axis codes {axcodes!r} are not a valid orientation: expected one letter of "
                         f"L/R, P/A and S/I each, e.g. 'PIR'")


_NIFTI_FLOAT_TYPES = {16: np.float32, 64: np.float64}
_NIFTI_COMPLEX_TYPES = {32: "complex64", 1792: "complex128", 2048: "complex256"}
_GZIP_MAGIC = b"\x1f\x8b"

# Where the fields spinelm checks lie in the two NIfTI headers (byte offset, struct code); checked
# against nibabel's Nifti1Header / Nifti2Header dtypes in tests/test_io.py.
_NIFTI_LAYOUT = {
    1: {"size": 348, "dim": (40, "8h"), "datatype": (70, "2h"), "pixdim": (76, "8f"), "vox_offset": (108, "f"),
        "codes": (252, "2h"), "quatern": (256, "6f"), "srow": (280, "12f")},
    2: {"size": 540, "dim": (16, "8q"), "datatype": (12, "2h"), "pixdim": (104, "8d"), "vox_offset": (168, "q"),
        "codes": (344, "2i"), "quatern": (352, "6d"), "srow": (400, "12d")},
}


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that spinelm checks, as stored."""

    version: int  # 1 or 2
    endian: str  # struct byte-order character
    compressed: bool  # gzip data, whatever the file is called
    dim: tuple[int, ...]  # dim[0] (number of axes) .. dim[7]
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]
    vox_offset: int
    qform_code: int
    sform_code: int
    quatern: tuple[float, ...]  # quatern_b, c, d, qoffset_x, y, z
    srow: tuple[float, ...]  # srow_x, srow_y, srow_z (4 values each)

    @property
    def header_size(self) -> int:
        return _NIFTI_LAYOUT[self.version]["size"]

    @property
    def size(self) -> tuple[int, ...]:
        """Sizes of the axes the header declares (``dim[1:dim[0]+1]``)."""
        return tuple(self.dim[1:self.dim[0] + 1]) if 1 <= self.dim[0] <= 7 else ()

    @property
    def n_voxels(self) -> int:
        return int(np.prod([max(d, 1) for d in self.size], dtype=np.int64)) if self.size else 0


def _is_nifti_name(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _open_nifti(path: Path):
    """Open a NIfTI file for reading its decompressed bytes, gzip or not (judged by content, not name)."""
    import gzip

    with open(path, "rb") as fh:
        compressed = fh.read(2) == _GZIP_MAGIC
    return (gzip.open(path, "rb") if compressed else open(path, "rb")), compressed


def _parse_nifti_header(head: bytes, compressed: bool) -> _NiftiHeader | None:
    """Parse the first bytes of a decompressed NIfTI file; None when ``sizeof_hdr`` is neither 348 nor 540."""
    import struct

    if len(head) < 4:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", head[:4])[0]
        version = {348: 1, 540: 2}.get(sizeof_hdr)
        if version is not None:
            break
    else:
        return None
    layout = _NIFTI_LAYOUT[version]
    if len(head) < layout["size"]:
        return None

    def field(name):
        offset, code = layout[name]
        return struct.unpack_from(endian + code, head, offset)

    datatype, bitpix = field("datatype")
    qform_code, sform_code = field("codes")
    return _NiftiHeader(version, endian, compressed, tuple(int(d) for d in field("dim")), int(datatype),
                        int(bitpix), tuple(float(p) for p in field("pixdim")), int(field("vox_offset")[0]),
                        int(qform_code), int(sform_code), tuple(float(q) for q in field("quatern")),
                        tuple(float(s) for s in field("srow")))


def _read_nifti_header(path: Path) -> tuple[_NiftiHeader | None, str | None]:
    """``(header, None)``; ``(None, plain problem)`` when the header cannot be read; ``(None, None)``
    when the file does not start with a NIfTI-1 or NIfTI-2 header."""
    import zlib

    try:
        fh, compressed = _open_nifti(path)
        with fh:
            head = fh.read(_NIFTI_LAYOUT[2]["size"])
    except (EOFError, OSError, zlib.error) as exc:
        return None, f"corrupt or truncated compressed data ({exc})"
    if not head:
        return None, "the file is empty"
    header = _parse_nifti_header(head, compressed)
    if header is None and len(head) < _NIFTI_LAYOUT[2]["size"]:
        short = _parse_nifti_header(head + bytes(_NIFTI_LAYOUT[2]["size"]), compressed)
        if short is not None or len(head) < _NIFTI_LAYOUT[1]["size"]:
            return None, f"file too short for a NIfTI header ({len(head)} bytes)"
    return header, None


def _dimension_problem(dim: int, size: Sequence[int]) -> str | None:
    """Why an image of ``dim`` axes and ``size`` cannot be used as a 3-D scan, or None."""
    size = tuple(int(s) for s in size)
    if dim == 2:
        return (f"expected a 3-D image, found 2-D image of size {size}; a single slice cannot be used, "
                f"export the whole 3-D scan")
    if dim != 3:
        return (f"expected a 3-D image, found {dim}-D with size {size}; split 4-D series into one file per "
                f"channel (_0000, _0001, ...)")
    return None


def _components_problem(ncomp: int) -> str:
    return (f"expected one value per voxel, found {ncomp} components (RGB or vector image); store each "
            f"channel as its own file")


def _complex_problem(type_name: str) -> str:
    return (f"complex-valued voxels ({type_name}); expected real intensities (store the magnitude as a "
            f"real-valued image)")


_HEADER_HINT = "the header is damaged; re-export the image from its source"
_READ_HINT = "check the file is complete and in NIfTI, MHA or NRRD format"


def _nifti_header_problem(header: _NiftiHeader) -> str | None:
    """What makes a NIfTI header unusable, as the message after ``"{path}: "``, or None."""
    n_axes = header.dim[0]
    if not 1 <= n_axes <= 7:
        return f"unreadable image (the header declares {n_axes} axes; expected 1 to 7); {_HEADER_HINT}"
    if any(d <= 0 for d in header.size):
        return f"unreadable image (dimension sizes {header.size} in the header must be positive); {_HEADER_HINT}"
    if header.datatype in _NIFTI_COMPLEX_TYPES:
        return _complex_problem(_NIFTI_COMPLEX_TYPES[header.datatype])
    orientation = (header.srow if header.sform_code > 0 else ()) + (header.quatern if header.qform_code > 0 else ())
    if not all(np.isfinite(orientation)):
        return (f"unreadable image (the orientation (sform/qform affine) in the header holds NaN or Inf); "
                f"{_HEADER_HINT}")
    size = list(header.size)
    while len(size) > 3 and size[-1] == 1:
        size.pop()  # trailing singleton axes (e.g. a 4-D file with one time point) are 3-D
    if len(size) == 5 and size[3] == 1:
        return None  # NIfTI vector image (components along axis 5): left to the readers' component check
    return _dimension_problem(len(size), size)


def nifti_integrity(path: str | os.PathLike) -> tuple[str | None, int, str | None]:
    """Check a NIfTI-1 or NIfTI-2 file as stored: ``(unreadable problem, number of NaN/Inf voxels, header problem)``.

    ITK's NIfTI reader fills a truncated ``.nii.gz`` with zeros, turns NaN into 0 and reads a zero
    voxel size as 1 mm, all without a word, so these are checked here on the raw bytes. Compressed
    files are recognised by their content, so a gzip file named ``.nii`` is checked too. Only truly
    non-finite voxels count as NaN/Inf (a float64 ``1e300`` is finite). Other formats return
    ``(None, 0, None)``.
    """
    import zlib

    path = Path(path)
    if not _is_nifti_name(path):
        return None, 0, None
    try:
        fh, compressed = _open_nifti(path)
        with fh:
            data = fh.read()
    except (EOFError, OSError, zlib.error) as exc:
        return f"corrupt or truncated file ({exc})", 0, None
    if len(data) < _NIFTI_LAYOUT[1]["size"]:
        return f"file too short for a NIfTI header ({len(data)} bytes)", 0, None
    header = _parse_nifti_header(data, compressed)
    if header is None:
        if _parse_nifti_header(data + bytes(_NIFTI_LAYOUT[2]["size"]), compressed) is not None:
            return f"file too short for a NIfTI header ({len(data)} bytes)", 0, None
        return None, 0, None  # not NIfTI: leave it to the reader
    n_vox = header.n_voxels
    vox_offset = max(header.vox_offset, 0)
    expected = vox_offset + n_vox * header.bitpix // 8
    if len(data) < expected:
        return f"truncated file: {len(data)} bytes of voxel data and header, {expected} expected", 0, None
    pixdim = header.pixdim[1:min(max(header.dim[0], 1), 3) + 1]
    problem = None
    if any(not np.isfinite(p) or p <= 0 for p in pixdim):
        problem = (f"voxel size (pixdim) {tuple(round(float(p), 4) for p in pixdim)} in the header is not "
                   f"positive; readers would silently assume 1 mm")
    n_bad = 0
    if header.datatype in _NIFTI_FLOAT_TYPES and n_vox:
        raw = np.frombuffer(data, dtype=np.dtype(_NIFTI_FLOAT_TYPES[header.datatype]).newbyteorder(header.endian),
                            count=n_vox, offset=vox_offset)
        n_bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))  # in the stored type: 1e300 is finite
    return None, n_bad, problem


_ITK_LEAKS = (".cxx", ".hxx", ".h:", ".txx", "Exception thrown", "SimpleITK", "itk::", "sitk::", "0x", "/Modules/")


def _plain_itk_reason(text: str) -> str:
    """A plain-words reason for a SimpleITK read failure, without ITK source paths or class names."""
    import re

    generic = "the image library could not decode it"
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    nrrd = [re.sub(r"^\[nrrd\]\s*[\w]+:\s*", "", ln) for ln in lines if ln.startswith("[nrrd]")]
    nrrd = [ln for ln in nrrd if ln and not ln.startswith("trouble")]
    if nrrd:
        reason = f"invalid NRRD header: {nrrd[-1]}"
    elif "Unable to determine ImageIO reader" in text:
        reason = "its contents are not in a recognised image format"
    elif "File cannot be read" in text or "not read completely" in text:
        reason = "its voxel data could not be read; the file may be truncated"
    else:
        error_lines = [ln for ln in lines if "ERROR:" in ln]
        reason = error_lines[-1].rsplit("ERROR:", 1)[-1] if error_lines else (lines[-1] if lines else "")
        reason = re.sub(r"^\s*[\w:]+\(0x[0-9a-fA-F]+\):\s*", "", reason).strip().rstrip(".")
    if not reason or any(leak.lower() in reason.lower() for leak in _ITK_LEAKS):
        return generic
    return reason[:160]


def _unreadable_reason(path: Path, exc: Exception) -> str:
    """Why SimpleITK could not read ``path``: from the file's own bytes where it is NIfTI, else from ITK."""
    if _is_nifti_name(path):
        header, problem = _read_nifti_header(path)
        if problem:
            return problem
        if header is None:
            return "not a NIfTI file: its header size field is neither 348 (NIfTI-1) nor 540 (NIfTI-2)"
        problem, _, _ = nifti_integrity(path)
        if problem:
            return problem
    return _plain_itk_reason(str(exc))


class _HeaderInfo:
    """Image information read through nibabel; answers the questions ``read_geometry`` asks a
    ``SimpleITK.ImageFileReader`` after ``ReadImageInformation``."""

    def __init__(self, path: Path, size, spacing, origin, direction, dtype):
        self._path, self._size, self._spacing = path, tuple(size), tuple(spacing)
        self._origin, self._direction, self.dtype = tuple(origin), tuple(direction), dtype

    def GetFileName(self) -> str:
        return str(self._path)

    def GetDimension(self) -> int:
        return len(self._size)

    def GetNumberOfComponents(self) -> int:
        return 1

    def GetSize(self) -> tuple[int, ...]:
        return self._size

    def GetSpacing(self) -> tuple[float, ...]:
        return self._spacing

    def GetOrigin(self) -> tuple[float, ...]:
        return self._origin

    def GetDirection(self) -> tuple[float, ...]:
        return self._direction


def _itk_geometry_from_nibabel(header) -> tuple[tuple, tuple, tuple]:
    """``(spacing, origin, direction)`` in ITK's LPS convention from a nibabel NIfTI header."""
    if header["sform_code"] <= 0 and header["qform_code"] <= 0:
        # no orientation stored: ITK places the grid at the origin along the LPS axes
        spacing = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64))
        return tuple(spacing.tolist()), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel().tolist())
    lps = np.asarray(header.get_best_affine(), dtype=np.float64).copy()
    lps[:2] *= -1  # nibabel's RAS world to ITK's LPS
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if not np.all(np.isfinite(lps)) or np.any(spacing <= 0):
        raise ValueError("the orientation (sform/qform affine) in the header is degenerate (an axis of length 0)")
    return (tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple((lps[:3, :3] / spacing).ravel().tolist()))


def _read_with_nibabel(path: Path, nifti: _NiftiHeader, header_only: bool, verify: bool):
    """Read a NIfTI file SimpleITK cannot (NIfTI-2, gzip named ``.nii``) into an equivalent SimpleITK image."""
    import zlib

    import nibabel as nib
    import SimpleITK as sitk
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    header_class = nib.Nifti2Header if nifti.version == 2 else nib.Nifti1Header
    problem = None
    try:
        fh, _ = _open_nifti(path)
        with fh:
            header = header_class.from_fileobj(fh)
            shape = list(header.get_data_shape())
            dtype = header.get_data_dtype()
            spacing, origin, direction = _itk_geometry_from_nibabel(header)
            while len(shape) > 3 and shape[-1] == 1:
                shape.pop()
            ncomp = len(dtype.fields) if dtype.fields else 1
            if len(shape) == 5 and shape[3] == 1:
                ncomp, shape = ncomp * shape[4], shape[:3]
            if dtype.kind == "c":
                problem = _complex_problem(dtype.name)
            elif ncomp != 1:
                problem = _components_problem(ncomp)
            else:
                problem = _dimension_problem(len(shape), shape)
            if problem is None and not header_only:
                if verify:
                    unreadable, _, _ = nifti_integrity(path)
                    if unreadable:
                        problem = (f"unreadable image ({unreadable}); check the file is complete "
                                   f"(re-copy or re-export it)")
                if problem is None:
                    array = np.asarray(header.data_from_fileobj(fh)).reshape(shape, order="F")
    except (ValueError, OSError, EOFError, zlib.error, HeaderDataError, ImageFileError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ImageReadError(f"{path}: unreadable image ({detail}); {_READ_HINT}") from None
    if problem:
        raise ImageReadError(f"{path}: {problem}")
    if header_only:
        return _HeaderInfo(path, shape, spacing, origin, direction, dtype)
    array = np.ascontiguousarray(array.transpose(2, 1, 0))
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        image = sitk.GetImageFromArray(array, isVector=False)
    except (TypeError, RuntimeError):
        raise ImageReadError(f"{path}: voxel type {array.dtype} is not supported; store the image as "
                             f"integers or float32/float64") from None
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def read_image(path: str | os.PathLike, header_only: bool = False, verify: bool = True):
    """Read an image with SimpleITK, failing with a message that names the file and the problem in plain words.

    NIfTI files are first checked on their own header bytes (non-positive sizes, NaN/Inf orientation,
    2-D, complex voxels), which ITK would otherwise accept silently or reject with internal messages.
    Valid NIfTI variants SimpleITK cannot read (NIfTI-2, a gzip file named ``.nii``) are read with
    nibabel and returned as the equivalent SimpleITK image (LPS geometry as ITK would give it).

    Args:
        path: NIfTI, MHA/MHD or NRRD file.
        header_only: read the header (geometry) without the voxel data.
        verify: check NIfTI files for truncation first (ITK would silently fill them with zeros).

    Returns:
        ``SimpleITK.Image``; when ``header_only``, an object with the header information
        (``SimpleITK.ImageFileReader`` or, for files read through nibabel, one with the same
        ``GetSize``/``GetSpacing``/``GetOrigin``/``GetDirection``/``GetDimension`` methods).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file cannot be read, or is not a single-component, real-valued 3-D image.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if _is_nifti_name(path):
        nifti, _ = _read_nifti_header(path)
        if nifti is not None:
            problem = _nifti_header_problem(nifti)
            if problem:
                raise ImageReadError(f"{path}: {problem}")
            if nifti.version == 2 or (nifti.compressed and not path.name.lower().endswith(".gz")):
                return _read_with_nibabel(path, nifti, header_only, verify)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        if header_only:
            reader.ReadImageInformation()
            dim, ncomp = reader.GetDimension(), reader.GetNumberOfComponents()
            size, pixel_id = reader.GetSize(), reader.GetPixelID()
        else:
            image = reader.Execute()
            dim, ncomp, size = image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize()
            pixel_id = image.GetPixelID()
    except RuntimeError as exc:
        raise ImageReadError(f"{path}: unreadable image ({_unreadable_reason(path, exc)}); {_READ_HINT}") from None
    complex_ids = {sitk.sitkComplexFloat32: "complex64", sitk.sitkComplexFloat64: "complex128"}
    if pixel_id in complex_ids:
        raise ImageReadError(f"{path}: {_complex_problem(complex_ids[pixel_id])}")
    if dim == 4 and size[3] == 1:
        dim = 3  # NIfTI with a singleton 4th axis: treat as 3-D
    problem = _dimension_problem(dim, size)
    if problem:
        raise ImageReadError(f"{path}: {problem}")
    if ncomp != 1:
        raise ImageReadError(f"{path}: {_components_problem(ncomp)}")
    if header_only:
        return reader
    if verify:
        problem, _, _ = nifti_integrity(path)
        if problem:
            raise ImageReadError(f"{path}: unreadable image ({problem}); check the file is complete "
                                 f"(re-copy or re-export it)")
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    return image


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Geometry of an image file from its header only."""
    reader = read_image(path, header_only=True)
    size = tuple(int(s) for s in reader.GetSize()[:3])
    spacing = tuple(float(s) for s in reader.GetSpacing()[:3])
    origin = tuple(float(s) for s in reader.GetOrigin()[:3])
    d = np.asarray(reader.GetDirection(), dtype=np.float64)
    n = int(round(np.sqrt(d.size)))
    d = d.reshape(n, n)[:3, :3]
    return Geometry(size, spacing, origin, tuple(d.ravel().tolist()))


def to_canonical(image, orientation: str = CANONICAL_ORIENTATION):
    """Permute/flip an image's axes (no resampling) so they point towards ``orientation``."""
    import SimpleITK as sitk

    if Geometry.from_sitk(image).axis_codes() == orientation:
        return image
    return sitk.DICOMOrient(image, orientation)


def load_volume(path: str | os.PathLike, canonical: bool = False,
                dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Read an image into a NumPy array (z, y, x) and its geometry.

    Args:
        path: image file.
        canonical: first bring the axes to :data:`CANONICAL_ORIENTATION` (axis 0 cranio-caudal).
        dtype: array type; ``None`` keeps the file's type.
    """
    import SimpleITK as sitk

    image = read_image(path)
    if canonical:
        image = to_canonical(image)
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, Geometry.from_sitk(image)


def make_image(array: np.ndarray, geometry: Geometry):
    """A SimpleITK image from a (z, y, x) array placed on ``geometry``."""
    import SimpleITK as sitk

    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def write_image(image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a SimpleITK image atomically (temporary file in the same folder, then rename)."""
    import SimpleITK as sitk

    from spinelm.io.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path
