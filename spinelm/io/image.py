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

    def same_as(self, other: "Geometry", rtol: float = 1e-3, atol_mm: float = 1e-2) -> list[str]:
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


def nifti_integrity(path: str | os.PathLike) -> tuple[str | None, int, str | None]:
    """Check a NIfTI-1 file as stored: ``(unreadable problem, number of NaN/Inf voxels, header problem)``.

    ITK's NIfTI reader fills a truncated ``.nii.gz`` with zeros, turns NaN into 0 and reads a zero
    voxel size as 1 mm, all without a word, so these are checked here on the raw bytes. Other
    formats return ``(None, 0, None)``.
    """
    import gzip
    import struct
    import zlib

    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None, 0, None
    try:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (EOFError, OSError, zlib.error) as exc:
        return f"corrupt or truncated file ({exc})", 0, None
    if len(data) < 348:
        return f"file too short for a NIfTI header ({len(data)} bytes)", 0, None
    endian = "<" if struct.unpack("<i", data[:4])[0] == 348 else ">"
    if struct.unpack(endian + "i", data[:4])[0] != 348:
        return None, 0, None  # NIfTI-2 or not NIfTI: leave it to ITK
    dims = struct.unpack(endian + "8h", data[40:56])
    datatype, bitpix = struct.unpack(endian + "2h", data[70:74])
    vox_offset = int(struct.unpack(endian + "f", data[108:112])[0])
    n_vox = int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]], dtype=np.int64)) if 0 < dims[0] <= 7 else 0
    expected = vox_offset + n_vox * bitpix // 8
    if len(data) < expected:
        return f"truncated file: {len(data)} bytes of voxel data and header, {expected} expected", 0, None
    pixdim = struct.unpack(endian + "8f", data[76:108])[1:min(max(dims[0], 1), 3) + 1]
    header = None
    if any(not np.isfinite(p) or p <= 0 for p in pixdim):
        header = (f"voxel size (pixdim) {tuple(round(float(p), 4) for p in pixdim)} in the header is not "
                  f"positive; readers would silently assume 1 mm")
    n_bad = 0
    if datatype in _NIFTI_FLOAT_TYPES:
        raw = np.frombuffer(data, dtype=np.dtype(_NIFTI_FLOAT_TYPES[datatype]).newbyteorder(endian),
                            count=n_vox, offset=vox_offset)
        n_bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
    return None, n_bad, header


def read_image(path: str | os.PathLike, header_only: bool = False, verify: bool = True):
    """Read an image with SimpleITK, failing with a message that names the file.

    Args:
        path: NIfTI, MHA/MHD or NRRD file.
        header_only: read the header (geometry) without the voxel data.
        verify: check NIfTI files for truncation first (ITK would silently fill them with zeros).

    Returns:
        ``SimpleITK.Image``, or ``SimpleITK.ImageFileReader`` with the information read when
        ``header_only``.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file cannot be read, or is not a single-component 3-D image.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        if header_only:
            reader.ReadImageInformation()
            dim, ncomp = reader.GetDimension(), reader.GetNumberOfComponents()
            size = reader.GetSize()
        else:
            image = reader.Execute()
            dim, ncomp, size = image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "rror" in ln or "exception" in ln.lower()), first[-1] if first else "")
        raise ImageReadError(f"{path}: unreadable image ({detail.strip()[:160]}); check the file is "
                             f"complete and in NIfTI, MHA or NRRD format") from None
    if dim == 4 and size[3] == 1:
        dim = 3  # NIfTI with a singleton 4th axis: treat as 3-D
    if dim != 3:
        raise ImageReadError(f"{path}: expected a 3-D image, found {dim}-D with size {tuple(size)}; "
                             f"split 4-D series into one file per channel (_0000, _0001, ...)")
    if ncomp != 1:
        raise ImageReadError(f"{path}: expected one value per voxel, found {ncomp} components "
                             f"(RGB or vector image); store each channel as its own file")
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
