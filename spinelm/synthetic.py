"""Synthetic spine phantoms with exact ground truth, for tests and the demo.

A phantom is a run of consecutive vertebrae (anywhere from C1 to the sacrum, sometimes with a
T13 or L6) along a curved spine inside a torso. Each vertebra has a body (elliptic cylinder with
a waist), a neural arch around the canal, a spinous process angled by region and two transverse
processes; sizes grow realistically from cervical to lumbar. Discs (annulus and nucleus), canal,
cord, fat, muscle and lungs fill the rest. The volume is rasterised directly on the output grid,
whose axes are randomly permuted and flipped (sometimes oblique) with anisotropic spacing, then
given CT-like (HU) or MR-like (T1/T2) intensities, blur, bias field and noise.

Ground truth: the instance mask (VerSe labels, whole vertebra) and the centre of each vertebral
body (world LPS mm) for every vertebra whose centre lies in the field of view, plus an optional
class per vertebra (0 normal, 1 bone-marrow oedema, 2 wedge fracture).

With ``protocol="dixon"`` a phantom is instead a biobank-like neck-to-knee Dixon scan: the whole
column (C1 to the sacrum, with T13 / L6 variants) inside a stitched axial volume of six stations at
2.23 x 2.23 mm in-plane and 3-4.5 mm slices (226 x 175 x 180-370 voxels, neck to mid-thigh), two or four channels
(water, fat, then in-phase and opposed-phase) from per-tissue proton density and fat fraction,
small intensity steps between stations and breathing blur over the thorax.

Everything is deterministic for a given ``(seed, case index)``.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinelm import labels as L
from spinelm.io.files import atomic_path, write_json_atomic
from spinelm.io.image import Geometry, make_image, write_image
from spinelm.io.landmarks import Landmark, write_spinelm_json

log = logging.getLogger(__name__)

#: Per-vertebra classes written to ``classesTr.csv``.
CLASS_NAMES = {0: "normal", 1: "oedema", 2: "wedge_fracture"}

# Tissue codes of the internal tissue map.
AIR, FAT, MUSCLE, LUNG, ANNULUS, NUCLEUS, CSF, CORD, MARROW, CORTEX, OEDEMA = range(11)

#: Mean intensity per tissue for each contrast (CT in HU; MR in arbitrary units).
TISSUE_INTENSITY = {
    "CT": {AIR: -1000, FAT: -100, MUSCLE: 45, LUNG: -850, ANNULUS: 90, NUCLEUS: 70, CSF: 12, CORD: 35,
           MARROW: 230, CORTEX: 850, OEDEMA: 230},
    "T1": {AIR: 0, FAT: 380, MUSCLE: 120, LUNG: 8, ANNULUS: 95, NUCLEUS: 115, CSF: 55, CORD: 150,
           MARROW: 300, CORTEX: 25, OEDEMA: 110},
    "T2": {AIR: 0, FAT: 290, MUSCLE: 70, LUNG: 8, ANNULUS: 85, NUCLEUS: 270, CSF: 420, CORD: 160,
           MARROW: 180, CORTEX: 20, OEDEMA: 360},
}

# Anatomical anchors (label -> body height, width L-R, depth A-P, following disc height; mm) in
# adults, interpolated between anchors along the column. Values follow published morphometry
# roughly (cervical bodies ~14 mm high and 16 mm wide; lumbar ~27 mm high and 48 mm wide).
_ANCHORS = {
    L.label_of("C1"): (10.0, 20.0, 10.0, 2.0),
    L.label_of("C2"): (15.0, 16.0, 15.0, 4.5),
    L.label_of("C3"): (14.0, 16.0, 15.0, 5.0),
    L.label_of("C7"): (14.5, 21.0, 16.0, 5.0),
    L.label_of("T1"): (16.0, 25.0, 17.0, 4.0),
    L.label_of("T6"): (19.0, 30.0, 25.0, 5.0),
    L.label_of("T12"): (24.0, 40.0, 30.0, 7.5),
    L.label_of("L1"): (25.0, 43.0, 31.0, 9.0),
    L.label_of("L3"): (27.0, 47.0, 33.0, 10.5),
    L.label_of("L5"): (26.0, 50.0, 34.0, 10.0),
    L.label_of("S1"): (28.0, 50.0, 35.0, 0.0),
}


#: Phantom protocols: a spine protocol or a neck-to-knee Dixon scan.
PROTOCOLS = ("spine", "dixon")
#: Channel names of Dixon phantoms, in file order (``_0000`` water, ``_0001`` fat, ...).
DIXON_CHANNELS = ("water", "fat", "in_phase", "opposed_phase")
#: Dixon acquisition: in-plane spacing (mm), slice range (mm), stations stitched along the body.
DIXON_INPLANE_MM = 2.23
DIXON_SLICE_MM = (3.0, 4.5)
DIXON_STATIONS = 6
#: Dixon field of view across (L-R, A-P; mm): 224 x 174 voxels of 2.23 mm.
DIXON_FOV_MM = (500.0, 388.0)
#: Proton density and fat fraction per tissue (adults at 1.5 T, roughly): marrow about 45 % fat,
#: oedema shifts it towards water; lungs and cortical bone give little signal in either channel.
DIXON_TISSUE = {AIR: (0.0, 0.0), FAT: (1.0, 0.92), MUSCLE: (0.7, 0.05), LUNG: (0.06, 0.1), ANNULUS: (0.45, 0.05),
                NUCLEUS: (0.9, 0.02), CSF: (1.0, 0.0), CORD: (0.75, 0.05), MARROW: (0.85, 0.45),
                CORTEX: (0.06, 0.2), OEDEMA: (0.92, 0.15)}


@dataclass(frozen=True)
class PhantomConfig:
    """How phantoms vary. Defaults give a realistic mix of fields of view, orientations and contrasts.

    Attributes:
        modality: ``"CT"``, ``"MR"`` (T1 or T2 drawn per case) or ``"mixed"`` (per case).
        min_vertebrae / max_vertebrae: length of the visible run.
        p_t13 / p_l6: probability of a transitional T13 / L6.
        p_oblique: probability of an oblique (rotated) grid on top of the random axis permutation.
        max_voxels: upper bound of the output grid size; spacing grows to respect it (default 2.5
            million voxels, 16 million for Dixon: a biobank volume at its own resolution).
        p_class: probability that a vertebra carries class 1 (oedema) or class 2 (fracture), each.
        slice_thickness_mm: if given, every case has thick slices of exactly this spacing (sagittal
            for MR, axial for CT); otherwise 2.5-4.5 mm slices in most cases, isotropic in some.
        last_label: every run ends at this vertebra (e.g. ``"S1"`` for lumbar protocols).
        protocol: ``"spine"`` (a spine protocol, one channel) or ``"dixon"`` (neck-to-knee Dixon MR,
            the whole column; ``modality``, the run length and ``last_label`` do not apply).
        channels: Dixon channels: 2 (water, fat) or 4 (water, fat, in-phase, opposed-phase).
        structures: the mask also carries discs (100 + the label of the vertebra above), the canal
            (61) and the cord (60), in the TPTBox convention.
        ribs: draw a pair of ribs at every thoracic vertebra (bone in the image, background in the
            mask, as in VerSe): from the head on the upper body past the transverse process, down
            and round the chest, the lower ones shorter. Ribs are what tells head from foot in a
            thoracic field of view (they fall away from the spine towards the feet). Off by default:
            the phantoms of the figures measured before ribs existed are reproduced without them.
        posture_deg: spread (standard deviation, degrees) of a whole-body posture drawn per case: the
            column is turned about the left-right axis (pitch: lying more or less flexed on the table)
            and about the front-back axis (a sideways lean), each by a normal draw of this spread. 0
            (default): every column stands upright in the patient frame, as in the phantoms measured
            before this option (a step's tilt then tells its level more sharply than in people).
    """

    modality: str = "MR"
    min_vertebrae: int = 5
    max_vertebrae: int = 12
    p_t13: float = 0.08
    p_l6: float = 0.08
    p_oblique: float = 0.3
    max_voxels: int | None = None
    p_class: float = 0.08
    slice_thickness_mm: float | None = None
    last_label: str | None = None
    protocol: str = "spine"
    channels: int = 1
    structures: bool = False
    ribs: bool = False
    posture_deg: float = 0.0

    @property
    def voxel_limit(self) -> int:
        if self.max_voxels is not None:
            return int(self.max_voxels)
        return 16_000_000 if self.protocol == "dixon" else 2_500_000

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        allowed = (2, 4) if self.protocol == "dixon" else (1,)
        if self.channels not in allowed:
            raise ValueError(f"the {self.protocol} protocol has {' or '.join(map(str, allowed))} channel(s), "
                             f"got {self.channels}")
        if self.last_label is not None:
            L.label_of(self.last_label)  # KeyError with the valid names
        if self.modality.upper() not in ("CT", "MR", "MIXED"):
            raise ValueError(f"modality must be 'CT', 'MR' or 'mixed', got {self.modality!r}")
        if not 0.0 <= float(self.posture_deg) <= 45.0:
            raise ValueError(f"posture_deg must be within 0-45 degrees, got {self.posture_deg}")
        if not 1 <= self.min_vertebrae <= self.max_vertebrae:
            raise ValueError(f"need 1 <= min_vertebrae <= max_vertebrae, got {self.min_vertebrae}, "
                             f"{self.max_vertebrae}")


@dataclass
class Phantom:
    """One synthetic case: SimpleITK image and mask on the same grid, and its ground truth."""

    image: object
    mask: object
    landmarks: list[Landmark]
    classes: dict[int, int]
    contrast: str
    info: dict = field(default_factory=dict)
    channels: list = field(default_factory=list)  # every channel's image (``image`` is the first)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_sitk(self.image)


@dataclass
class _Vertebra:
    label: int
    center: np.ndarray  # world LPS
    frame: np.ndarray  # 3x3, columns u (left), v (posterior), w (superior, along the column)
    height: float
    width: float
    depth: float
    disc: float
    canal: float
    cls: int = 0


def _interp_anchor(label: int, scale: float) -> tuple[float, float, float, float]:
    """Body height, width, depth and disc height for ``label`` by interpolating the anchors by rank."""
    ranks = sorted((L.cranio_caudal_rank(k), v) for k, v in _ANCHORS.items())
    r = L.cranio_caudal_rank(label)
    xs = [a for a, _ in ranks]
    vals = np.array([v for _, v in ranks])
    out = [float(np.interp(r, xs, vals[:, i])) for i in range(4)]
    if label == L.label_of("C1"):
        out = list(_ANCHORS[label])
    return tuple(v * scale for v in out)


def _canal_radius(label: int) -> float:
    region = L.region_of(label)
    return {"cervical": 7.5, "thoracic": 6.5, "lumbar": 8.5}.get(region, 7.0)


def _sequence(rng: np.random.Generator, cfg: PhantomConfig) -> list[int]:
    """A run of consecutive labels, maybe with T13 / L6."""
    full = [v.label for v in L.VERTEBRAE if not v.transitional and v.label != L.label_of("Cocc")]
    if rng.random() < cfg.p_t13:
        full.insert(full.index(L.label_of("T12")) + 1, L.label_of("T13"))
    if rng.random() < cfg.p_l6:
        full.insert(full.index(L.label_of("L5")) + 1, L.label_of("L6"))
    if cfg.protocol == "dixon":
        return full  # neck to knee: the whole column
    n = int(rng.integers(min(cfg.min_vertebrae, len(full)), min(cfg.max_vertebrae, len(full)) + 1))
    if cfg.last_label is not None:
        end = full.index(L.label_of(cfg.last_label)) + 1
        return full[max(0, end - n):end]
    start = int(rng.integers(0, len(full) - n + 1))
    return full[start:start + n]


def _sagittal_offset(rank: float, amp: np.ndarray) -> float:
    """Anterior(-)/posterior(+) offset of the column (mm) at a cranio-caudal rank: lordosis and kyphosis."""
    c7, t12, l5 = (L.cranio_caudal_rank(L.label_of(n)) for n in ("C7", "T12", "L5"))
    if rank <= c7:
        return -amp[0] * np.sin(np.pi * rank / c7)
    if rank <= t12:
        return amp[1] * np.sin(np.pi * (rank - c7) / (t12 - c7))
    return -amp[2] * np.sin(np.pi * min(rank - t12, l5 - t12 + 1) / (l5 - t12 + 1))


def _build_column(rng: np.random.Generator, seq: list[int], cfg: PhantomConfig) -> list[_Vertebra]:
    """Place the vertebrae of ``seq`` (plus one hidden neighbour each side) along a curved column."""
    scale = float(rng.uniform(0.88, 1.12))
    amp = np.array([rng.uniform(5, 15), rng.uniform(15, 35), rng.uniform(10, 25)])
    scol_amp, scol_phase = rng.uniform(0, 8), rng.uniform(0, 2 * np.pi)
    labels = list(seq)
    dims = [_interp_anchor(lab, scale) for lab in labels]
    # centre positions along z (superior +), walking caudally
    z = [0.0]
    for i in range(1, len(labels)):
        h0, _, _, disc0 = dims[i - 1]
        h1 = dims[i][0]
        z.append(z[-1] - (h0 / 2 + max(disc0, 1.5) + h1 / 2))
    z = np.asarray(z)
    ranks = np.array([L.cranio_caudal_rank(lab) for lab in labels], dtype=float)
    y = np.array([_sagittal_offset(r, amp) for r in ranks])
    x = scol_amp * np.sin(z / 180.0 * np.pi + scol_phase)
    pts = np.stack([x, y, z], 1)
    out = []
    for i, lab in enumerate(labels):
        lo, hi = max(i - 1, 0), min(i + 1, len(labels) - 1)
        tangent = pts[lo] - pts[hi] if hi > lo else np.array([0.0, 0.0, 1.0])
        w = tangent / np.linalg.norm(tangent)
        v = np.array([0.0, 1.0, 0.0]) - w[1] * w
        v /= np.linalg.norm(v)
        u = np.cross(v, w)
        h, wd, dp, disc = dims[i]
        out.append(_Vertebra(lab, pts[i], np.stack([u, v, w], 1), h, wd, dp, disc, _canal_radius(lab) * scale))
    return out


def _turn_posture(column: list[_Vertebra], rng: np.random.Generator, spread_deg: float) -> None:
    """Turn the whole column about its middle: a pitch about the left-right (x) axis and a lean about
    the front-back (y) axis, each normal with ``spread_deg``; centres and local frames turn together."""
    pitch, lean = np.deg2rad(rng.normal(0.0, spread_deg, size=2))
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    ry = np.array([[np.cos(lean), 0, np.sin(lean)], [0, 1, 0], [-np.sin(lean), 0, np.cos(lean)]])
    rot = ry @ rx
    middle = np.mean([v.center for v in column], axis=0)
    for v in column:
        v.center = middle + rot @ (v.center - middle)
        v.frame = rot @ v.frame


def _assign_classes(rng: np.random.Generator, column: list[_Vertebra], cfg: PhantomConfig) -> None:
    for vert in column:
        r = rng.random()
        if vert.label == L.label_of("S1") or vert.label == L.label_of("C1"):
            continue
        if r < cfg.p_class:
            vert.cls = 1
        elif r < 2 * cfg.p_class:
            vert.cls = 2


def _random_direction(rng: np.random.Generator, cfg: PhantomConfig) -> np.ndarray:
    perm = rng.permutation(3)
    d = np.zeros((3, 3))
    for a in range(3):
        d[perm[a], a] = rng.choice([-1.0, 1.0])
    if rng.random() < cfg.p_oblique:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(5, 25))
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
        d = rot @ d
    return d


def _output_geometry(rng: np.random.Generator, column: list[_Vertebra], contrast: str,
                     cfg: PhantomConfig) -> Geometry:
    """A grid around the visible column, random axes, anisotropic spacing, partial field of view."""
    top, bottom = column[0], column[-1]
    z_hi = top.center[2] + rng.uniform(-0.45, 0.6) * top.height
    z_lo = bottom.center[2] - rng.uniform(-0.45, 0.6) * bottom.height
    xc = float(np.mean([v.center[0] for v in column]))
    yc = float(np.mean([v.center[1] for v in column]))
    half_lr = rng.uniform(60, 90)
    lo = np.array([xc - half_lr, yc - rng.uniform(80, 110), z_lo])
    hi = np.array([xc + half_lr, yc + rng.uniform(60, 80), z_hi])
    d = _random_direction(rng, cfg)
    # thick-slice axis: left-right for sagittal MR, head-foot for axial CT, sometimes none
    spacing = np.full(3, rng.uniform(0.7, 1.3))
    world_axis_of = [int(np.argmax(np.abs(d[:, a]))) for a in range(3)]
    r = rng.random()
    thick_world = 0 if (contrast != "CT" and r < 0.7) else (2 if r < 0.6 else None)
    if cfg.slice_thickness_mm is not None:
        thick_world = 0 if contrast != "CT" else 2
    if thick_world is not None:
        spacing[world_axis_of.index(thick_world)] = cfg.slice_thickness_mm or rng.uniform(2.5, 4.5)
    center = (lo + hi) / 2
    corners = np.array([[lo[0] if i & 1 else hi[0], lo[1] if i & 2 else hi[1], lo[2] if i & 4 else hi[2]]
                        for i in range(8)])
    local = (corners - center) @ d  # coordinates along each grid axis
    extent = local.max(0) - local.min(0)
    size = np.maximum(np.ceil(extent / spacing).astype(int) + 1, 8)
    if np.prod(size) > cfg.voxel_limit:
        factor = (np.prod(size) / cfg.voxel_limit) ** (1 / 3)
        spacing = spacing * factor
        size = np.maximum(np.ceil(extent / spacing).astype(int) + 1, 8)
    origin = center + d @ (local.min(0))
    return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(origin.tolist()),
                    tuple(d.ravel().tolist()))


def _dixon_geometry(rng: np.random.Generator, column: list[_Vertebra], cfg: PhantomConfig) -> Geometry:
    """An axial neck-to-knee grid: 2.23 mm in-plane, 3-4.5 mm slices, from above C1 to the thighs,
    stored L-R, A-P, S-I (in one of the storage orders scanners write: flips only)."""
    top, bottom = column[0], column[-1]
    z_hi = top.center[2] + rng.uniform(40, 90)
    z_lo = bottom.center[2] - rng.uniform(220, 330)
    xc = float(np.mean([v.center[0] for v in column]))
    yc = float(np.mean([v.center[1] for v in column]))
    w_lr, w_ap = DIXON_FOV_MM
    lo = np.array([xc - w_lr / 2, yc - w_ap + 95.0, z_lo])  # the column sits near the back of the body
    hi = np.array([xc + w_lr / 2, yc + 95.0, z_hi])
    spacing = np.array([DIXON_INPLANE_MM, DIXON_INPLANE_MM, rng.uniform(*DIXON_SLICE_MM)])
    flips = np.where(rng.random(3) < 0.5, -1.0, 1.0)
    d = np.diag(flips)
    size = np.maximum(np.ceil((hi - lo) / spacing).astype(int) + 1, 8)
    if np.prod(size) > cfg.voxel_limit:
        spacing = spacing * (np.prod(size) / cfg.voxel_limit) ** (1 / 3)
        size = np.maximum(np.ceil((hi - lo) / spacing).astype(int) + 1, 8)
    origin = np.where(flips > 0, lo, hi)
    return Geometry(tuple(int(v) for v in size), tuple(float(v) for v in spacing), tuple(origin.tolist()),
                    tuple(d.ravel().tolist()))


def _dixon_intensities(tissue: np.ndarray, labels: np.ndarray, geom: Geometry, column: list[_Vertebra],
                       cfg: PhantomConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Water and fat images (plus in-phase and opposed-phase for 4 channels) from per-tissue proton
    density and fat fraction, with point spread, breathing blur over the thorax, a bias field and an
    intensity step per station, and Rician noise."""
    from scipy import ndimage

    bone = labels > 0
    t = tissue.copy()
    t[bone & ~ndimage.binary_erosion(bone, iterations=1)] = CORTEX
    pd = np.zeros(len(DIXON_TISSUE), np.float32)
    ff = np.zeros(len(DIXON_TISSUE), np.float32)
    for k, (p, f) in DIXON_TISSUE.items():
        pd[k] = p * rng.uniform(0.93, 1.07)
        ff[k] = np.clip(f + rng.normal(0, 0.03), 0, 1)
    ff[MARROW] = rng.uniform(0.3, 0.6)  # marrow fat rises with age
    ff[OEDEMA] = ff[MARROW] * 0.35
    rho, frac = pd[t], ff[t]
    rho += rng.normal(0, 0.03, rho.shape).astype(np.float32)  # tissue texture
    water, fat = rho * (1 - frac), rho * frac
    # slice axis of the grid (S-I) and the world z of every slice
    si = int(np.argmax(np.abs(geom.matrix[2])))
    arr_axis = 2 - si  # array axes are (z, y, x) = grid axes reversed
    n_sl = geom.shape[arr_axis]
    idx = np.zeros((n_sl, 3))
    idx[:, si] = np.arange(n_sl)
    z_of_slice = (idx @ geom.matrix.T + np.asarray(geom.origin))[:, 2]
    thorax = [v.center[2] for v in column if L.region_of(v.label) == "thoracic"]
    t_hi, t_lo = (max(thorax), min(thorax)) if thorax else (0.0, 0.0)
    breathing = np.clip(np.minimum(z_of_slice - t_lo, t_hi - z_of_slice) / 40.0, 0, 1).astype(np.float32)
    shape_b = [1, 1, 1]
    shape_b[arr_axis] = n_sl
    breathing = breathing.reshape(shape_b)
    # stations: equal lengths along S-I, each with its own gain per channel
    station = np.minimum((np.arange(n_sl) * DIXON_STATIONS) // n_sl, DIXON_STATIONS - 1)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in geom.shape], indexing="ij")
    c = rng.normal(0, 0.12, 4)
    bias = np.exp(c[0] * xx + c[1] * yy + c[2] * zz + c[3] * xx * yy).astype(np.float32)
    psf = [0.5 * sp for sp in geom.array_spacing]
    moved = [0.5 * sp for sp in geom.array_spacing]
    moved[arr_axis] += 4.0  # breathing smears the thorax along the body and front to back
    ap_axis = 2 - int(np.argmax(np.abs(geom.matrix[1])))
    moved[ap_axis] += 2.5
    out = []
    scale = 400.0
    for img in (water, fat):
        sharp = ndimage.gaussian_filter(img, [p / sp for p, sp in zip(psf, geom.array_spacing)])
        blurred = ndimage.gaussian_filter(img, [m / sp for m, sp in zip(moved, geom.array_spacing)])
        img = sharp * (1 - breathing) + blurred * breathing
        gains = rng.uniform(0.88, 1.12, DIXON_STATIONS).astype(np.float32)
        img = img * bias * gains[station].reshape(shape_b) * scale
        out.append(img.astype(np.float32))
    if cfg.channels == 4:
        out += [out[0] + out[1], np.abs(out[0] - out[1])]
    sd = rng.uniform(0.01, 0.025) * scale
    noisy = []
    for img in out:
        n1 = rng.normal(0, sd, img.shape).astype(np.float32)
        n2 = rng.normal(0, sd, img.shape).astype(np.float32)
        noisy.append(np.clip(np.round(np.sqrt((img + n1) ** 2 + n2 ** 2)), 0, 32767).astype(np.int16))
    return noisy


def _world_grid(geom: Geometry, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """World coordinates (z, y, x, 3) of the voxels in ITK index box [lo, hi)."""
    ii = [np.arange(lo[a], hi[a], dtype=np.float32) for a in range(3)]
    k, j, i = np.meshgrid(ii[2], ii[1], ii[0], indexing="ij")
    idx = np.stack([i, j, k], -1)
    return (idx @ geom.matrix.T.astype(np.float32) + np.asarray(geom.origin, dtype=np.float32)).astype(np.float32)


def _local_box(geom: Geometry, vert: _Vertebra, u_max: float, v_min: float, v_max: float,
               w_max: float) -> tuple[np.ndarray, np.ndarray] | None:
    corners = np.array([[a, b, c] for a in (-u_max, u_max) for b in (v_min, v_max) for c in (-w_max, w_max)])
    world = corners @ vert.frame.T + vert.center
    idx = geom.world_to_index(world)
    lo = np.maximum(np.floor(idx.min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + 1, np.asarray(geom.size))
    if np.any(hi <= lo):
        return None
    return lo, hi


def _slices(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
    return slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])


def _rasterise_vertebra(geom: Geometry, vert: _Vertebra, nxt: _Vertebra | None, labels: np.ndarray,
                        tissue: np.ndarray) -> None:
    """Draw one vertebra (and the disc below it, canal and cord alongside) into the volumes."""
    lab = vert.label
    region = L.region_of(lab)
    a, b, h = vert.width / 2, vert.depth / 2, vert.height / 2
    rc = vert.canal
    arch = 0.22 * vert.depth + 2.0
    vc = b + rc + 0.5  # canal centre behind the body
    sp_len = {"cervical": 14.0, "thoracic": 28.0, "lumbar": 24.0}.get(region, 20.0)
    sp_slope = {"cervical": 0.25, "thoracic": 0.9, "lumbar": 0.2}.get(region, 0.3)
    tp_len = {"cervical": 8.0, "thoracic": 18.0, "lumbar": 22.0}.get(region, 10.0)
    sacrum = lab == L.label_of("S1")
    u_max = max(a, rc + arch + tp_len) + 2 if not sacrum else a + 22
    w_max = h + sp_len * sp_slope + (vert.disc + 2 if nxt is not None else 2) + (60 if sacrum else 0)
    box = _local_box(geom, vert, u_max, -b - 3, vc + rc + arch + sp_len + 3, w_max)
    if box is None:
        return
    sl = _slices(*box)
    p = (_world_grid(geom, *box) - vert.center.astype(np.float32)) @ vert.frame.astype(np.float32)
    u, v, w = p[..., 0], p[..., 1], p[..., 2]
    # vertebral body: elliptic cylinder with a waist; wedge fracture lowers the anterior height
    waist = 1.0 - 0.07 * (1.0 - np.clip(w / h, -1, 1) ** 2)
    radial = (u / a) ** 2 + (v / b) ** 2
    h_eff = h * (1.0 - (0.45 * np.clip(0.5 - v / (2 * b), 0, 1) if vert.cls == 2 else 0.0))
    body = (radial <= waist ** 2) & (np.abs(w) <= h_eff)
    if sacrum:  # fused sacral segments tilting posteriorly, with alae
        t = np.clip(-w / 70.0, 0, 1)
        shift = 25.0 * t
        body |= ((u / (a * (1 - 0.6 * t))) ** 2 + ((v - shift) / (b * (1 - 0.5 * t))) ** 2 <= 1) & (w <= h) & (w >= -70)
        body |= (np.abs(u) <= a + 20) & (v >= -0.3 * b) & (v <= b + 10) & (w <= h) & (w >= -h - 10)
    if lab == L.label_of("C2"):  # dens
        body |= (u ** 2 + (v + 0.2 * b) ** 2 <= 25.0) & (w >= 0) & (w <= h + 8)
    # neural arch around the canal, spinous and transverse processes
    rv = np.sqrt(u ** 2 + (v - vc) ** 2)
    arch_h = 0.45 * vert.height
    post = (rv > rc) & (rv <= rc + arch) & (v >= b - 3) & (np.abs(w) <= arch_h)
    v0 = vc + rc
    sp_w = -(v - v0) * sp_slope
    post |= (np.abs(u) <= 3.0) & (v >= v0) & (v <= v0 + arch + sp_len) & (np.abs(w - sp_w) <= 0.3 * vert.height)
    post |= ((np.abs(u) >= rc) & (np.abs(u) <= rc + arch + tp_len) & (np.abs(v - vc + 1.5) <= 4.0)
             & (np.abs(w) <= 4.0))
    bone = body | post
    free = labels[sl] == 0
    mark = bone & free
    labels[sl][mark] = lab
    tissue[sl][mark] = OEDEMA if vert.cls == 1 else MARROW
    # canal (CSF, cord above L2) along this level, into the disc space below
    extent_w = h + (vert.disc + 1 if nxt is not None else 1)
    canal = (rv <= rc) & (w <= h + 1) & (w >= -extent_w) & free & ~bone
    tissue[sl][canal] = CSF
    if L.cranio_caudal_rank(lab) < L.cranio_caudal_rank(L.label_of("L2")):
        cord = canal & (rv <= 0.5 * rc)
        tissue[sl][cord] = CORD
    # disc below
    if nxt is not None and vert.disc > 0:
        below = (nxt.center - vert.center) @ vert.frame
        dw = -(w - (-h)) / max(-(below[2]) - h - nxt.height / 2, 1.0)  # 0 at lower endplate, 1 at next upper
        dv = v - dw * below[1]
        du = u - dw * below[0]
        da, db = (a + nxt.width / 2) / 2, (b + nxt.depth / 2) / 2
        in_disc = (dw > 0) & (dw < 1) & ((du / da) ** 2 + (dv / db) ** 2 <= 1) & free & ~bone
        nucleus = in_disc & ((du / (0.55 * da)) ** 2 + (dv / (0.5 * db)) ** 2 <= 1)
        tissue[sl][in_disc] = ANNULUS
        tissue[sl][nucleus] = NUCLEUS


def _torso(geom: Geometry, column: list[_Vertebra], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Body outline (air/fat/muscle) and lungs beside the thoracic column, as a tissue map; and the
    torso's shape (half-axes ``ra`` left-right and ``rb`` front-back, centre ``cy`` mm in front of
    the column (negative), fat share ``fat``)."""
    world = _world_grid(geom, np.zeros(3, int), np.asarray(geom.size))
    cz = np.array([v.center[2] for v in column])
    order = np.argsort(cz)
    xs = np.interp(world[..., 2], cz[order], [column[i].center[0] for i in order])
    ys = np.interp(world[..., 2], cz[order], [column[i].center[1] for i in order])
    dx, dy = world[..., 0] - xs, world[..., 1] - ys
    ra, rb = rng.uniform(130, 170), rng.uniform(95, 125)
    cy = -rb + rng.uniform(45, 60)  # column sits near the back
    e = (dx / ra) ** 2 + ((dy - cy) / rb) ** 2
    fat_t = rng.uniform(0.08, 0.2)
    tissue = np.full(geom.shape, AIR, np.uint8)
    tissue[e <= 1] = FAT
    tissue[e <= (1 - fat_t) ** 2] = MUSCLE
    ranks = np.array([L.cranio_caudal_rank(v.label) for v in column], dtype=float)
    t_lo, t_hi = L.cranio_caudal_rank(L.label_of("T2")), L.cranio_caudal_rank(L.label_of("T11"))
    thoracic = (np.interp(world[..., 2], cz[order], ranks[order]) >= t_lo) & \
               (np.interp(world[..., 2], cz[order], ranks[order]) <= t_hi)
    for side in (-1, 1):
        lung = ((dx - side * 65) / 45) ** 2 + ((dy + 35) / 55) ** 2 <= 1
        tissue[lung & thoracic & (e <= (1 - fat_t) ** 2)] = LUNG
    return tissue, {"ra": float(ra), "rb": float(rb), "cy": float(cy), "fat": float(fat_t)}


#: Where each rib ends round the chest (angle from the back, radians): ribs 1-7 reach the sternum,
#: 8-10 the costal margin, 11-12 (and a 13th) float.
_RIB_END = {**{k: np.pi - 0.45 for k in range(1, 8)}, 8: 2.6, 9: 2.45, 10: 2.3, 11: 1.85, 12: 1.45, 13: 1.2}


def _rib_paths(vert: _Vertebra, torso: dict, rng: np.random.Generator) -> list[np.ndarray]:
    """World points (every ~1.5 mm) along the left and right rib of a thoracic vertebra."""
    k = L.cranio_caudal_rank(vert.label) - L.cranio_caudal_rank(L.label_of("T1")) + 1  # rib number
    t = (k - 1) / 11.0
    a, b, h = vert.width / 2, vert.depth / 2, vert.height / 2
    vc = b + vert.canal + 0.5
    u_tub = vert.canal + 0.22 * vert.depth + 2.0 + 14.0  # near the tip of the transverse process
    inner = 1.0 - torso["fat"]
    r_u = 0.82 * torso["ra"] * inner * float(np.interp(t, [0.0, 0.3, 1.0], [0.45, 0.92, 1.0]))
    v_post = vc + 8.0  # the rib's most posterior point, just behind the transverse process
    r_v = (v_post - torso["cy"]) * float(np.interp(t, [0.0, 0.3, 1.0], [0.55, 0.95, 0.95]))
    theta0 = float(np.arcsin(min(u_tub / r_u, 0.9)))
    theta1 = _RIB_END.get(int(k), 1.2)
    drop = float(np.interp(t, [0.0, 0.4, 1.0], [28.0, 62.0, 50.0])) * rng.uniform(0.85, 1.15)
    paths = []
    for side in (-1.0, 1.0):
        head = np.array([side * 0.75 * a, 0.55 * b, 0.35 * h])
        tub = np.array([side * r_u * np.sin(theta0), v_post - r_v * (1 - np.cos(theta0)), 0.0])
        neck = [head + (tub - head) * f for f in np.linspace(0, 1, max(int(np.linalg.norm(tub - head) / 1.5), 2))]
        length = (theta1 - theta0) * 0.5 * (r_u + r_v)
        s = np.linspace(0, 1, max(int(length / 1.5), 2))
        th = theta0 + s * (theta1 - theta0)
        shaft = np.stack([side * r_u * np.sin(th), v_post - r_v * (1 - np.cos(th)),
                          -drop * (1 - (1 - s) ** 2)], 1)  # falls most near the spine
        local = np.vstack([np.asarray(neck), shaft])
        paths.append(local @ vert.frame.T + vert.center)
    return paths


def _rasterise_ribs(geom: Geometry, column: list[_Vertebra], torso: dict, labels: np.ndarray, tissue: np.ndarray,
                    rng: np.random.Generator, radius: float = 4.0) -> None:
    """Ribs of the thoracic vertebrae into the tissue map (cortex round a marrow core), never over a
    vertebra of the mask."""
    spacing = np.asarray(geom.spacing)
    reach = np.ceil(radius / spacing).astype(int) + 1
    size = np.asarray(geom.size)
    for vert in column:
        if L.region_of(vert.label) != "thoracic":
            continue
        for path in _rib_paths(vert, torso, rng):
            idx = np.round(geom.world_to_index(path)).astype(int)
            keep = np.all((idx >= -reach) & (idx < size + reach), axis=1)
            for point, centre in zip(path[keep], idx[keep]):
                lo, hi = np.maximum(centre - reach, 0), np.minimum(centre + reach + 1, size)
                if np.any(hi <= lo):
                    continue
                d = np.linalg.norm(_world_grid(geom, lo, hi) - point.astype(np.float32), axis=-1)
                sl = _slices(lo, hi)
                free = labels[sl] == 0
                region = tissue[sl]
                region[(d <= radius) & free & (region != MARROW)] = CORTEX
                region[(d <= 0.55 * radius) & free] = MARROW


def _intensities(tissue: np.ndarray, labels: np.ndarray, contrast: str, geom: Geometry,
                 rng: np.random.Generator) -> np.ndarray:
    import SimpleITK as sitk
    from scipy import ndimage

    means = dict(TISSUE_INTENSITY[contrast])
    jitter = 0.05 if contrast == "CT" else 0.12
    for k in means:
        if means[k] > 0:
            means[k] *= float(rng.uniform(1 - jitter, 1 + jitter))
    lut = np.array([means[k] for k in range(len(means))], dtype=np.float32)
    # cortical shell: bone voxels at the surface of each vertebra
    bone = labels > 0
    cortex = bone & ~ndimage.binary_erosion(bone, iterations=1)
    t = tissue.copy()
    t[cortex] = CORTEX
    img = lut[t]
    # texture inside tissues, then blur (point spread), bias field and noise
    img += rng.normal(0, 0.04 * (np.ptp(lut) if contrast == "CT" else lut.max()), img.shape).astype(np.float32)
    sitk_img = make_image(img, geom)
    sigma = [0.6 * s for s in geom.spacing]
    img = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk_img, sigma)).astype(np.float32)
    if contrast == "CT":
        img += rng.normal(0, rng.uniform(10, 35), img.shape).astype(np.float32)
        return np.clip(np.round(img), -1024, 3071).astype(np.int16)
    # MR: smooth multiplicative bias field from a random low-order polynomial in world coordinates
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in geom.shape], indexing="ij")
    c = rng.normal(0, 0.15, 6)
    bias = np.exp(c[0] * xx + c[1] * yy + c[2] * zz + c[3] * xx * yy + c[4] * zz ** 2 + c[5] * yy * zz)
    img = img * bias.astype(np.float32)
    sd = rng.uniform(0.015, 0.04) * float(lut.max())
    n1 = rng.normal(0, sd, img.shape).astype(np.float32)
    n2 = rng.normal(0, sd, img.shape).astype(np.float32)
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician magnitude noise
    return np.clip(np.round(img), 0, 32767).astype(np.int16)


def make_phantom(seed: int, index: int = 0, config: PhantomConfig | None = None) -> Phantom:
    """Generate one phantom, deterministic for ``(seed, index)``."""
    cfg = config or PhantomConfig()
    rng = np.random.default_rng([int(seed), int(index)])
    modality = cfg.modality.upper()
    if modality == "MIXED":
        modality = "CT" if rng.random() < 0.5 else "MR"
    contrast = "CT" if modality == "CT" else ("T2" if rng.random() < 0.6 else "T1")
    if cfg.protocol == "dixon":
        contrast = "dixon"
    seq = _sequence(rng, cfg)
    # one hidden neighbour each side so that partial fields of view show cut vertebrae
    full = [v.label for v in L.VERTEBRAE if v.label != L.label_of("Cocc")]
    rank_of = {lab: i for i, lab in enumerate(full)}
    ext = list(seq)
    before = [lab for lab in full[:rank_of[seq[0]]] if not L.vertebra(lab).transitional]
    after = [lab for lab in full[rank_of[seq[-1]] + 1:] if not L.vertebra(lab).transitional]
    if before:
        ext.insert(0, before[-1])
    if after:
        ext.append(after[0])
    column = _build_column(rng, ext, cfg)
    if cfg.posture_deg > 0:  # its own random stream: the rest of the phantom is the same with or without it
        _turn_posture(column, np.random.default_rng([int(seed), int(index), 2]), cfg.posture_deg)
    _assign_classes(rng, column, cfg)
    visible = [v for v in column if v.label in seq]
    geom = _dixon_geometry(rng, visible, cfg) if cfg.protocol == "dixon" else \
        _output_geometry(rng, visible, contrast, cfg)
    tissue, torso = _torso(geom, column, rng)
    labels = np.zeros(geom.shape, np.uint8)
    for i, vert in enumerate(column):
        _rasterise_vertebra(geom, vert, column[i + 1] if i + 1 < len(column) else None, labels, tissue)
    if cfg.ribs:  # their own random stream: the rest of the phantom is the same with or without them
        _rasterise_ribs(geom, column, torso, labels, tissue, np.random.default_rng([int(seed), int(index), 1]))
    if cfg.protocol == "dixon":
        images = _dixon_intensities(tissue, labels, geom, column, cfg, rng)
    else:
        images = [_intensities(tissue, labels, contrast, geom, rng)]
    present = set(int(x) for x in np.unique(labels)) - {0}
    if cfg.structures:
        _add_structures(labels, tissue)
    centers = np.array([v.center for v in column])
    inside = geom.contains(centers, margin_voxels=0.0)
    landmarks = [Landmark(v.label, tuple(float(c) for c in v.center)) for v, ok in zip(column, inside)
                 if ok and v.label in present]
    # a class only for a vertebra whose centre is in view: a sliver at the edge cannot be graded
    classes = {v.label: v.cls for v, ok in zip(column, inside) if ok and v.label in present}
    info = {"seed": int(seed), "index": int(index), "contrast": contrast, "sequence": [L.name_of(x) for x in seq],
            "axis_codes": geom.axis_codes(), "spacing": list(geom.spacing)}
    channels = [make_image(img, geom) for img in images]
    return Phantom(channels[0], make_image(labels, geom), landmarks, classes, contrast, info, channels)


#: Mask value of unannotated voxels in loosely annotated phantoms (dataset.json ``labels["ignore"]``).
IGNORE_VALUE = L.MAX_LABEL + 1
#: Kinds of loose annotation handed out by default, in turn (:func:`loose_annotation_kinds`).
LOOSE_KINDS = ("partial", "centroids")
#: Every kind ``spinelm synth --loose-kinds`` can write.
ALL_LOOSE_KINDS = ("partial", "centroids", "boxes", "scribbles")
#: Half-length of each scribble stroke (mm): three strokes along the array axes through each centroid.
SCRIBBLE_REACH_MM = 25.0
#: Radius of the brush the strokes are painted with (mm): wide enough to survive resampling to a coarser
#: training spacing (a one-voxel line would vanish under nnU-Net's label resampling).
SCRIBBLE_BRUSH_MM = 3.0


def loose_annotation_kinds(n: int, fraction: float, seed: int, kinds=LOOSE_KINDS) -> dict[int, str]:
    """Which of ``n`` cases get a loose annotation (``round(fraction * n)`` of them, drawn by ``seed``),
    and which kind, in turn from ``kinds``: ``partial`` (every other vertebra of the run left unannotated:
    its voxels carry :data:`IGNORE_VALUE`), ``centroids`` (no mask at all), ``boxes`` (one box per
    vertebra, no mask, no centroid file) or ``scribbles`` (strokes, no centroid file)."""
    unknown = [k for k in kinds if k not in ALL_LOOSE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown loose annotation kind(s) {unknown or list(kinds)}; expected some of "
                         f"{', '.join(ALL_LOOSE_KINDS)}")
    chosen = np.random.default_rng([seed, 7919]).permutation(n)[: int(round(fraction * n))]
    return {int(i): kinds[k % len(kinds)] for k, i in enumerate(sorted(chosen))}


def scribbles_from_mask(mask: np.ndarray, centroids_zyx: np.ndarray, spacing_zyx, ignore_value: int) -> np.ndarray:
    """Scribbles as an annotator might draw them, from a (z, y, x) mask: through each centroid, one stroke
    along each array axis (:data:`SCRIBBLE_REACH_MM` each way), painted with a brush of radius
    :data:`SCRIBBLE_BRUSH_MM`; a stroke voxel keeps its true value (the vertebra's label, or 0 on discs and
    soft tissue) where all six neighbours share it, so strokes never sit on a boundary; every other voxel
    is ``ignore_value``."""
    from scipy import ndimage

    mask = np.asarray(mask).astype(np.int16)
    interior = np.ones(mask.shape, dtype=bool)
    for ax in range(3):
        for step in (1, -1):
            nb = np.roll(mask, step, axis=ax)
            edge = [slice(None)] * 3
            edge[ax] = 0 if step == 1 else -1
            same = nb == mask
            same[tuple(edge)] = False
            interior &= same
    lines = np.zeros(mask.shape, dtype=bool)
    shape = np.asarray(mask.shape)
    for c in np.rint(np.asarray(centroids_zyx).reshape(-1, 3)).astype(int):
        if np.any(c < 0) or np.any(c >= shape):
            continue
        for ax in range(3):
            reach = int(round(SCRIBBLE_REACH_MM / float(spacing_zyx[ax])))
            sl = [slice(int(v), int(v) + 1) for v in c]
            sl[ax] = slice(max(c[ax] - reach, 0), min(c[ax] + reach + 1, int(shape[ax])))
            lines[tuple(sl)] = True
    r = np.floor(SCRIBBLE_BRUSH_MM / np.asarray(spacing_zyx, dtype=np.float64)).astype(int)
    grid = np.meshgrid(*[np.arange(-k, k + 1) * float(sp) for k, sp in zip(r, spacing_zyx)], indexing="ij")
    brush = sum(g ** 2 for g in grid) <= SCRIBBLE_BRUSH_MM ** 2
    strokes = ndimage.binary_dilation(lines, structure=brush) & interior
    out = np.full(mask.shape, ignore_value, dtype=np.int16)
    out[strokes] = mask[strokes]
    return out


def _add_structures(labels: np.ndarray, tissue: np.ndarray) -> None:
    """Write discs (100 + the label of the vertebra above each disc), canal (61) and cord (60) into the
    background of a vertebra mask, in place."""
    from scipy import ndimage

    free = labels == 0
    labels[free & (tissue == CSF)] = L.CANAL
    labels[free & (tissue == CORD)] = L.CORD
    discs, n = ndimage.label(free & np.isin(tissue, (ANNULUS, NUCLEUS)))
    for k, box in enumerate(ndimage.find_objects(discs), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
        comp = discs[grown] == k
        near = labels[grown][ndimage.binary_dilation(comp, iterations=2) & ~comp]
        touching = [int(v) for v in np.unique(near) if L.is_valid_label(int(v))]
        if touching:
            above = min(touching, key=L.cranio_caudal_rank)
            labels[grown][comp] = L.DISC_OFFSET + above


def _write_loose(out: Path, case: str, ph, kind: str) -> None:
    """A phantom's boxes (``boxesTr/CASE.json``) or scribbles (``scribblesTr/CASE.nii.gz``)."""
    import SimpleITK as sitk

    from spinelm.io.boxes import boxes_from_mask, write_boxes_json
    from spinelm.io.image import Geometry

    arr = sitk.GetArrayFromImage(ph.mask).astype(np.int16)
    geom = Geometry.from_sitk(ph.mask)
    if kind == "boxes":
        (out / "boxesTr").mkdir(exist_ok=True)
        write_boxes_json(out / "boxesTr" / f"{case}.json", boxes_from_mask(arr, geom), source="spinelm synth")
        return
    (out / "scribblesTr").mkdir(exist_ok=True)
    centres = geom.world_to_array_index(np.asarray([lm.position_mm for lm in ph.landmarks]).reshape(-1, 3))
    strokes = sitk.GetImageFromArray(scribbles_from_mask(arr, centres, geom.array_spacing, IGNORE_VALUE).astype(np.uint8))
    strokes.CopyInformation(ph.mask)
    write_image(strokes, out / "scribblesTr" / f"{case}.nii.gz")


def synthesize_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, config: PhantomConfig | None = None,
                       n_unlabelled: int = 0, with_classes: bool = True, progress: bool = True,
                       prefix: str = "phantom", loose: float = 0.0, loose_kinds=LOOSE_KINDS) -> Path:
    """Write ``n`` labelled (+ ``n_unlabelled``) phantoms as a spinelm/nnU-Net raw dataset folder.

    Layout: ``imagesTr/``, ``labelsTr/``, ``centroidsTr/`` (spinelm JSON), ``classesTr.csv`` (when
    ``with_classes``), ``imagesUnlabelled/`` and ``dataset.json``. Cases already written are kept
    (the generator is deterministic), so an interrupted run can simply be repeated.

    ``loose``: the share of labelled cases whose masks are degraded (:func:`loose_annotation_kinds`, in
    turn from ``loose_kinds``); classes stay complete, centroids too except for ``boxes`` (``boxesTr/``:
    their centres stand for the centroids) and ``scribbles`` (``scribblesTr/``: no centroids).
    ``annotations.json`` lists each case's kind.
    """
    from tqdm import tqdm

    cfg = config or PhantomConfig()
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "centroidsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    channel = "CT" if cfg.modality.upper() == "CT" else ("MR" if cfg.modality.upper() == "MR" else "mixed")
    kinds = loose_annotation_kinds(n, loose, seed, tuple(loose_kinds)) if loose else {}
    for i in tqdm(range(n + n_unlabelled), desc="Synthesising phantoms", disable=not progress, unit="case"):
        labelled = i < n
        case = f"{prefix}_{i:03d}"
        folder = out / ("imagesTr" if labelled else "imagesUnlabelled")
        ph = make_phantom(seed, i, cfg)
        if labelled:
            if kinds.get(i) == "partial":
                import SimpleITK as sitk

                arr = sitk.GetArrayFromImage(ph.mask).astype(np.uint8)
                run = [lm.label for lm in sorted(ph.landmarks, key=lambda lm: L.cranio_caudal_rank(lm.label))]
                arr[np.isin(arr, run[1::2])] = IGNORE_VALUE
                partial = sitk.GetImageFromArray(arr)
                partial.CopyInformation(ph.mask)
                write_image(partial, out / "labelsTr" / f"{case}.nii.gz")
            elif kinds.get(i) in ("boxes", "scribbles"):
                _write_loose(out, case, ph, kinds[i])
            elif kinds.get(i) != "centroids":
                write_image(ph.mask, out / "labelsTr" / f"{case}.nii.gz")
            if kinds.get(i) not in ("boxes", "scribbles"):
                write_spinelm_json(out / "centroidsTr" / f"{case}.json", ph.landmarks, source="spinelm synth",
                                   phantom=ph.info)
            rows += [(case, lab, cls) for lab, cls in sorted(ph.classes.items(), key=lambda kv: L.cranio_caudal_rank(kv[0]))]
        folder.mkdir(parents=True, exist_ok=True)
        for c, img in enumerate(ph.channels or [ph.image]):
            write_image(img, folder / f"{case}_{c:04d}.nii.gz")
    if with_classes and n > 0:
        with atomic_path(out / "classesTr.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["case", "label", "class"])
                w.writerows(rows)
    write_json_atomic(out / "dataset.json", {
        "name": f"spinelm phantoms (seed {seed})",
        "channel_names": ({str(c): DIXON_CHANNELS[c] for c in range(cfg.channels)} if cfg.protocol == "dixon"
                          else {"0": channel if channel != "mixed" else "MR"}),
        "labels": {"background": 0, **{L.name_of(v.label): v.label for v in L.VERTEBRAE},
                   **({"ignore": IGNORE_VALUE} if kinds and set(kinds.values()) & {"partial", "scribbles"}
                      else {})},
        "numTraining": n,
        "file_ending": ".nii.gz",
        "classes": CLASS_NAMES,
    })
    if kinds:
        write_json_atomic(out / "annotations.json", {f"{prefix}_{i:03d}": kinds.get(i, "full") for i in range(n)})
    return out
