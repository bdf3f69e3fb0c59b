"""The one predictor: sliding window -> decoding -> anatomical ordering -> landmarks (no SimpleITK).

:class:`Predictor` is what ``spinelm predict``, training validation and the demo all use; it is
built from a model folder (every trained fold, averaged) or from a network in memory
(validation). :func:`postprocess` is the one post-processing path: heatmap peaks become
candidates with sub-voxel positions and label probabilities read from the segmentation head
(:func:`decode_candidates`), a :class:`Frame` carries them to world LPS millimetres, and
:func:`spinelm.ordering.order_candidates` picks the anatomically valid labelling there.

The window positions and the Gaussian importance weighting are nnunetv2's
(``compute_steps_for_sliding_window``, ``compute_gaussian``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from spinelm.io.image import Frame
from spinelm.network import split_heads
from spinelm.sanity import (column_reasons, confidence_reasons, end_reasons, header_reasons, orientation_reasons,
                            turned_over_reasons)

log = logging.getLogger(__name__)

#: Heatmap peaks below this value (targets peak at 1) are not candidates. Low on purpose: the
#: ordering weighs every candidate by its peak value, so the threshold only has to keep noise out;
#: at 0.25 an early model's weak sacrum peaks were lost (demo held-out phantoms: 0.89 -> 0.96
#: identification rate at 0.15, lumbar MR folds unchanged).
PEAK_THRESHOLD = 0.15
#: Candidates closer than this fraction of the neighbour distance are the same vertebra.
PEAK_MIN_DISTANCE_FRACTION = 0.5
#: Half-width, across the spine (perpendicular to the cranio-caudal axis) and as a fraction of the
#: neighbour distance, of the window in which a peak's response is gathered for its centre.
#: Neighbours lie along the spine, so across it the window can hold a whole vertebra with its
#: processes or a sacrum with its alae (about 1.4 neighbour distances wide): a sacrum cut by the
#: field of view responds with a plateau that wide, and a narrower window put its centre on
#: whichever edge held the maximum (15-20 mm to one side on phantoms).
BLOB_ACROSS_FRACTION = 2.0
#: At most this many of the strongest heatmap peaks become candidates (about four per vertebra of
#: the whole column). An untrained or unfamiliar model can put thousands of weak peaks above the
#: threshold, and the ordering is quadratic in the candidates: measured, minutes for one small
#: validation case of an untrained whole-body model instead of a second.
MAX_CANDIDATES = 100


@dataclass
class Candidate:
    """A heatmap peak: position in (preprocessed) voxels, peak value and label probabilities."""

    position: np.ndarray
    score: float
    label_probs: dict[int, float]

    @property
    def label(self) -> int:
        return max(self.label_probs, key=self.label_probs.get)


#: Sliding-window tiles go through the network in batches of up to this many voxels (at most
#: :data:`MAX_TILE_BATCH` tiles): small patches use the cores better several at a time.
TILE_BATCH_VOXELS = 2 ** 18
MAX_TILE_BATCH = 8


def tile_batch(patch_size) -> int:
    """How many sliding-window tiles of ``patch_size`` one forward pass takes."""
    return int(max(1, min(MAX_TILE_BATCH, TILE_BATCH_VOXELS // int(np.prod([int(p) for p in patch_size])))))


@torch.no_grad()
def sliding_window(network: torch.nn.Module, data: torch.Tensor, patch_size, heads: dict, step: float = 0.5,
                   mirror_axes=None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Predict a whole (C, X, Y, Z) array tile by tile.

    Returns ``{"segmentation": softmax (K, X, Y, Z), "heatmap": (H, X, Y, Z)}`` (heads present in
    the plan), Gaussian-weighted over overlapping tiles, on the CPU.
    """
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    device = torch.device(device)
    patch_size = [int(p) for p in patch_size]
    shape = list(data.shape[1:])
    pad = [max(p - s, 0) for p, s in zip(patch_size, shape)]
    padded = F.pad(data, [x for p in reversed(pad) for x in (p // 2, p - p // 2)]) if any(pad) else data
    pshape = list(padded.shape[1:])
    n_out = sum(int(h["channels"]) for h in heads.values())
    acc = torch.zeros((n_out, *pshape), dtype=torch.float32)
    weight = torch.zeros(pshape, dtype=torch.float32)
    gauss = compute_gaussian(tuple(patch_size), sigma_scale=1 / 8, value_scaling_factor=10, dtype=torch.float32,
                             device=torch.device("cpu"))
    steps = compute_steps_for_sliding_window(pshape, patch_size, step)
    tiles = [(slice(sx, sx + patch_size[0]), slice(sy, sy + patch_size[1]), slice(sz, sz + patch_size[2]))
             for sx in steps[0] for sy in steps[1] for sz in steps[2]]
    per_batch = tile_batch(patch_size)
    was_training = network.training
    network.eval()
    for first in range(0, len(tiles), per_batch):
        group = tiles[first:first + per_batch]
        batch = torch.stack([padded[(slice(None), *sl)] for sl in group]).to(device)
        out = _forward(network, batch)
        if mirror_axes:
            n = 1
            for ax in mirror_axes:
                out = out + torch.flip(_forward(network, torch.flip(batch, (ax + 2,))), (ax + 2,))
                n += 1
            out = out / n
        out = out.float().cpu()
        for k, sl in enumerate(group):
            acc[(slice(None), *sl)] += out[k] * gauss
            weight[sl] += gauss
    network.train(was_training)
    acc /= weight
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, shape))
    acc = acc[(slice(None), *crop)]
    out = split_heads(acc[None], heads)
    result = {k: v[0] for k, v in out.items()}
    if "segmentation" in result:
        result["segmentation"] = torch.softmax(result["segmentation"], 0)
    return result


def _forward(network, x):
    out = network(x)
    return out[0] if isinstance(out, (list, tuple)) else out


def _refine(hm: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Sub-voxel peak position: a parabola through the peak and its two neighbours, per axis."""
    out = p.astype(np.float64).copy()
    for a in range(3):
        lo, hi = p.copy(), p.copy()
        lo[a] -= 1
        hi[a] += 1
        if lo[a] < 0 or hi[a] >= hm.shape[a]:
            continue
        f0, fl, fh = hm[tuple(p)], hm[tuple(lo)], hm[tuple(hi)]
        denom = fl - 2 * f0 + fh
        if denom < 0:
            out[a] += float(np.clip(0.5 * (fl - fh) / denom, -0.5, 0.5))
    return out


def _blob_centre(hm: np.ndarray, p: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Centre of the heatmap's upper half around a peak: the mean position of the connected region
    above half the peak value that holds the peak (within ``radius`` voxels per axis), weighted by
    how far the heatmap exceeds that half. The same as the peak for a clean Gaussian; the middle
    for a ridge, a plateau or a two-humped response (a wide or cut sacrum, a vertebral body blurred
    along thick slices), where the maximum itself sits anywhere on the top. Other responses in the
    window (separate regions) do not pull the centre."""
    lo, hi = np.maximum(p - radius, 0), np.minimum(p + radius + 1, hm.shape)
    block = hm[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    w = np.clip(block - 0.5 * hm[tuple(p)], 0, None).astype(np.float64)
    regions, _ = ndimage.label(w > 0)
    w[regions != regions[tuple(p - lo)]] = 0
    total = w.sum()
    if total <= 0:
        return p.astype(np.float64)
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    return np.array([(g * w).sum() / total for g in grids])


def decode_candidates(pred: dict[str, torch.Tensor], heads: dict, spacing, distance_mm: float,
                      threshold: float = PEAK_THRESHOLD, drop_border: bool = True,
                      refine: str = "blob", cc_axis: int | None = None) -> list[Candidate]:
    """Heatmap peaks -> candidates with sub-voxel positions and label probabilities.

    A peak on the outermost voxel layer of the array (``drop_border``) is a vertebra cut by the
    field of view whose centre lies outside it: the heatmap still rises towards the edge. Such
    vertebrae are not annotated (a centroid must lie inside the image), and keeping them shifts the
    labels of a whole run by one, so they are dropped.

    ``cc_axis`` (the array's cranio-caudal axis) lets the ``"blob"`` centre gather a response
    across the spine over :data:`BLOB_ACROSS_FRACTION` neighbour distances; without it the window
    is ``PEAK_MIN_DISTANCE_FRACTION`` of that distance along every axis.

    With a single heatmap channel the label probabilities are the mean segmentation softmax in a
    small ball around the peak (background excluded, renormalised); with per-label heatmaps they
    are the channels' values at the peak.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    hm = pred["heatmap"]
    radius = np.maximum(np.round(PEAK_MIN_DISTANCE_FRACTION * distance_mm / spacing).astype(int), 1)
    kernel = tuple(int(2 * r + 1) for r in radius)
    summed = hm.max(0).values if hm.shape[0] > 1 else hm[0]
    pooled = F.max_pool3d(summed[None, None], kernel, stride=1, padding=tuple(int(r) for r in radius))[0, 0]
    peaks = torch.nonzero((summed == pooled) & (summed > threshold)).numpy()
    if drop_border and len(peaks):
        inner = np.all((peaks > 0) & (peaks < np.asarray(summed.shape) - 1), axis=1)
        peaks = peaks[inner]
    if len(peaks) > MAX_CANDIDATES:
        values = summed[tuple(torch.as_tensor(peaks).T)].numpy()
        peaks = peaks[np.argsort(-values, kind="stable")[:MAX_CANDIDATES]]
    hm_np = summed.numpy()
    window = radius.copy()
    if cc_axis is not None:
        window = np.maximum(np.round(BLOB_ACROSS_FRACTION * distance_mm / spacing).astype(int), 1)
        window[cc_axis] = radius[cc_axis]
    out = []
    seg_labels = heads.get("segmentation", {}).get("labels", [])
    per_label = heads["heatmap"].get("per_label", False)
    for p in peaks:
        pos = _refine(hm_np, p) if refine == "parabola" else _blob_centre(hm_np, p, window)
        if per_label:
            vals = hm[:, p[0], p[1], p[2]].clamp(min=0).numpy()
            probs = {lab: float(v) for lab, v in zip(heads["heatmap"]["labels"], vals / max(vals.sum(), 1e-6))}
        else:
            r = np.maximum(np.round(2.0 / spacing).astype(int), 1)  # ~2 mm ball
            lo, hi = np.maximum(p - r, 0), np.minimum(p + r + 1, hm_np.shape)
            block = pred["segmentation"][1:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(len(seg_labels), -1)
            mean = block.mean(1).numpy()
            probs = {lab: float(v) for lab, v in zip(seg_labels, mean / max(mean.sum(), 1e-6))}
        out.append(Candidate(pos, float(hm_np[tuple(p)]), probs))
    # two maxima of one response (equal humps) end at the same centre: keep the stronger
    kept: list[Candidate] = []
    for c in sorted(out, key=lambda c: -c.score):
        if not any(np.all(np.abs(c.position - k.position) <= radius) for k in kept):
            kept.append(c)
    return kept


# ------------------------------------------------------------------------------ frames, post-processing


#: Segmentation voxels further than this fraction of the neighbour distance from every labelled
#: centroid are left out of the instance mask.
INSTANCE_RADIUS_FRACTION = 0.9
#: Bytes a prediction holds per voxel of the scan as stored, per channel: the image as read, its
#: canonical copy and float32 array, nnU-Net's crop and normalisation copies, and the instance mask
#: and its resampling back onto the input grid (about 33 bytes measured on a 512 x 512 x 300 CT-sized
#: volume: 3.3 GB peak RSS, of which 0.6 GB is the interpreter with torch).
BYTES_PER_INPUT_VOXEL = 40
#: ... and per voxel after resampling to the plan's spacing: the preprocessed input (float32 per
#: channel), the resampling intermediates, the output accumulator and softmax (float32 per output
#: channel, twice) and the window weights.
BYTES_PER_RESAMPLED_VOXEL_PER_CHANNEL = 12
BYTES_PER_RESAMPLED_VOXEL_PER_OUTPUT = 8
#: Share of the memory available now that one case may be planned to use.
MEMORY_SHARE = 0.9


@dataclass
class Labelled:
    """Post-processing of one case: candidates (preprocessed voxels and world mm) and the ordered ones."""

    candidates: list[Candidate]
    candidate_world_mm: np.ndarray  # (N, 3)
    kept: list[int]  # indices into candidates, head to foot
    labels: list[int]
    #: the ordering's posterior probability of each kept label (:func:`spinelm.ordering.label_marginals`)
    posterior: list[float] = field(default_factory=list)

    def landmarks(self) -> list:
        from spinelm.io.landmarks import landmarks_from_arrays

        return landmarks_from_arrays(self.labels, self.candidate_world_mm[self.kept],
                                     [self.candidates[i].score for i in self.kept])


#: Weight of the coarse stage's label probabilities against the fine stage's when both exist (a
#: geometric mixture: ``p ~ p_coarse ** w * p_fine ** (1 - w)``). See :func:`fuse_label_probs`.
COARSE_LABEL_WEIGHT = 0.75
#: Coarse heatmap peaks with no fine peak within half a neighbour distance become candidates too
#: (their position and labels from the coarse stage): late in training the fine heatmap can lose a
#: vertebra at the edge of the field of view that the coarse stage, which sees the whole column,
#: still finds.
COARSE_FILLS_GAPS = True
#: Radius (fraction of the neighbour distance) of the ball in which the coarse segmentation is
#: averaged around a fine peak: about a vertebral body's half height.
COARSE_BALL_FRACTION = 0.25


def _ball_means(world_mm: np.ndarray, channels: np.ndarray, frame: Frame, spacing, distance_mm: float) -> np.ndarray:
    """Mean of every channel of ``channels`` (C, X, Y, Z) in a ball of :data:`COARSE_BALL_FRACTION`
    neighbour distances around each world point (the nearest voxel when outside); (N, C)."""
    shape = np.asarray(channels.shape[1:])
    r = np.maximum(np.round(COARSE_BALL_FRACTION * distance_mm / np.asarray(spacing)).astype(int), 1)
    out = []
    for v in frame.from_world(np.asarray(world_mm).reshape(-1, 3)):
        c = np.clip(np.round(v).astype(int), 0, shape - 1)
        lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, shape)
        out.append(channels[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(len(channels), -1).mean(1))
    return np.asarray(out).reshape(-1, len(channels))


def coarse_label_probs(world_mm: np.ndarray, coarse_pred: dict[str, torch.Tensor], coarse_frame: Frame,
                       spacing, labels: list[int], distance_mm: float) -> list[dict[int, float]]:
    """The coarse stage's label probabilities at world points: its segmentation softmax (background
    left out, renormalised) averaged over a ball of :data:`COARSE_BALL_FRACTION` neighbour distances."""
    means = _ball_means(world_mm, coarse_pred["segmentation"][1:].numpy(), coarse_frame, spacing, distance_mm)
    return [{lab: float(x) for lab, x in zip(labels, m / max(m.sum(), 1e-6))} for m in means]


def fuse_label_probs(fine: dict[int, float], coarse: dict[int, float], weight: float | None = None,
                     floor: float = 1e-4) -> dict[int, float]:
    """``p ~ coarse ** weight * fine ** (1 - weight)`` (default weight :data:`COARSE_LABEL_WEIGHT`),
    renormalised (probabilities floored first)."""
    weight = COARSE_LABEL_WEIGHT if weight is None else weight
    fused = {lab: max(coarse.get(lab, 0.0), floor) ** weight * max(fine.get(lab, 0.0), floor) ** (1 - weight)
             for lab in set(fine) | set(coarse)}
    total = sum(fused.values())
    return {lab: v / total for lab, v in fused.items()}


def postprocess(pred: dict[str, torch.Tensor], plans, frame: Frame, configuration: str = "fine",
                coarse: tuple | None = None, levels=None, model=None) -> Labelled:
    """Decode heatmap peaks, carry them to the world with ``frame`` and order them anatomically.

    ``coarse = (coarse outputs, coarse frame)``: the identification stage, which saw the whole field
    of view; each peak's label probabilities become :func:`fuse_label_probs` of the fine and coarse
    ones. ``levels``: the level head (:class:`spinelm.identification.LevelReader`, world points ->
    level probabilities), combined with those by :func:`spinelm.identification.fuse`. The ordering
    runs in world LPS mm (head = +z), whatever orientation the scan was stored in; ``model``: its
    anatomical model (default the plan's).
    """
    from spinelm.plans import as_plans

    plans = as_plans(plans)
    spacing = np.asarray(plans.configuration(configuration).spacing)
    cands = decode_candidates(pred, plans.head_dict, spacing, plans.distance_mm, cc_axis=plans.cc_axis)
    vox = np.asarray([c.position for c in cands]).reshape(-1, 3)
    world = frame.to_world(vox)
    if coarse is not None and "segmentation" in coarse[0]:
        labels = list(plans.heads["segmentation"].labels)
        cspacing = np.asarray(plans.configuration("coarse").spacing)
        for c, pc in zip(cands, coarse_label_probs(world, coarse[0], coarse[1], cspacing, labels, plans.distance_mm)):
            c.label_probs = fuse_label_probs(c.label_probs, pc)
        if COARSE_FILLS_GAPS:
            extra = decode_candidates(coarse[0], plans.head_dict, cspacing, plans.distance_mm, cc_axis=plans.cc_axis)
            extra_world = coarse[1].to_world(np.asarray([c.position for c in extra]).reshape(-1, 3))
            for c, w in zip(extra, extra_world):
                if not len(world) or np.min(np.linalg.norm(world - w, axis=1)) > 0.5 * plans.distance_mm:
                    c.position = np.asarray(frame.from_world(w[None])[0])  # in the fine frame, like the others
                    c.label_probs = coarse_label_probs(w[None], coarse[0], coarse[1], cspacing, labels, plans.distance_mm)[0]
                    cands.append(c)
                    world = np.vstack([world.reshape(-1, 3), w[None]])
    if levels and cands:
        from spinelm.identification import fuse

        for c, pl in zip(cands, levels(world)):
            c.label_probs = fuse(c.label_probs, pl)
    return order_labelled(cands, world, plans, model)


def order_labelled(cands: list[Candidate], world: np.ndarray, plans, model=None) -> Labelled:
    """The anatomical ordering of candidates placed in world LPS mm (head = +z), with the posterior of
    each kept label; ``model``: the ordering model (default the plan's, :meth:`Plans.spine_model`)."""
    from spinelm.ordering import order_candidates

    world = np.asarray(world, dtype=np.float64).reshape(-1, 3)
    ordered, posterior = order_candidates(world, [c.score for c in cands], [c.label_probs for c in cands], cc_axis=2,
                                          distance_mm=plans.distance_mm, superior_is_positive=True,
                                          allowed=plans.known_labels, model=model or plans.spine_model(),
                                          with_posterior=True)
    return Labelled(cands, world, [i for i, _ in ordered], [lab for _, lab in ordered], posterior)


# ------------------------------------------------------------------------- turned-over comparison

#: Run the turned-over comparison (:meth:`Predictor.turned_over`) in :meth:`Predictor.predict_array`
#: when the model has a coarse stage (default of ``Predictor.turned_check``; ``spinelm predict
#: --no-header-check`` turns it off). It costs five more passes of the small coarse network:
#: measured 2.2 -> 3.1-3.5 s per real lumbar MR scan on 2 CPU cores.
TURNED_CHECK = True


def _axis_letter(frame: Frame, axis: int) -> str:
    """``L``, ``P`` or ``S``: the world axis that preprocessed array axis ``axis`` runs along most."""
    e = np.zeros((2, 3))
    e[1, axis] = 1.0
    w = frame.to_world(e)
    return "LPS"[int(np.argmax(np.abs(w[1] - w[0])))]


_AXIS_NAMES = {"L": "left-right", "P": "front-back", "S": "head-foot"}


def turned_arrays(data: np.ndarray, cc_axis: int, spacing, frame: Frame,
                  flip_only: bool = False) -> list[tuple[str, str, np.ndarray]]:
    """The five ways a (C, X, Y, Z) preprocessed array would look had its header lied about the
    head-foot axis, turned back: ``[(key, header fault in words, array)]``.

    ``flip``: the head-foot axis reversed; ``swap_<letter>`` / ``swap_<letter>_flip``: the head-foot
    axis exchanged with the axis that runs along world ``letter`` (L: left-right, P: front-back),
    with either sign. Each turned array is read with the stored array's frame, as if the header had
    been right for it; with anisotropic spacing the swapped axes are resampled to keep millimetres.
    ``flip_only``: the first only.
    """
    from scipy.ndimage import zoom

    spacing = np.asarray(spacing, float)
    cc = int(cc_axis)
    out = [("flip", "head-foot axis flipped", np.ascontiguousarray(np.flip(data, 1 + cc)))]
    for a in [i for i in range(3) if i != cc and not flip_only]:
        swapped = np.swapaxes(data, 1 + cc, 1 + a)
        if not np.isclose(spacing[a], spacing[cc], rtol=0.05):
            factor = np.ones(4)
            factor[1 + cc], factor[1 + a] = spacing[a] / spacing[cc], spacing[cc] / spacing[a]
            swapped = zoom(swapped, factor, order=1)
        letter = _axis_letter(frame, a)
        name = f"head-foot axis swapped with the {_AXIS_NAMES[letter]} axis"
        out.append((f"swap_{letter}", name, np.ascontiguousarray(swapped)))
        out.append((f"swap_{letter}_flip", name + " (and flipped)", np.ascontiguousarray(np.flip(swapped, 1 + cc))))
    return out


def turned_evidence(lab: Labelled, level=None) -> dict:
    """How much an orientation of the scan looks like a spine to the model: the ordered vertebrae
    (``n``), the sum and mean of their heatmap peaks, the mean log probability of the label each got
    (segmentation and level evidence fused); with a level head, the mean level probability of that
    label alone; with an upright head, the mean probability that the crops are upright
    (``upright``) and the sum of the peaks weighted by it (``upright_sum``)."""
    kept = lab.kept
    scores = np.asarray([lab.candidates[i].score for i in kept], float)
    logp = [float(np.log(max(lab.candidates[i].label_probs.get(label, 0.0), 1e-4)))
            for i, label in zip(kept, lab.labels)]
    row = {"n": len(kept), "peak_sum": float(scores.sum()), "peak_mean": float(scores.mean()) if len(kept) else 0.0,
           "label_logp": float(np.mean(logp)) if logp else float(np.log(1e-4))}
    if level:
        probs, up = level.read(lab.candidate_world_mm[kept])
        row["level_p"] = float(np.mean([p.get(label, 0.0) for p, label in zip(probs, lab.labels)])) if kept else 0.0
        if up is not None:
            row["upright"] = float(up.mean()) if kept else 0.0
            row["upright_sum"] = float((scores * up).sum())
    return row


# ------------------------------------------------------------------------------------------ predictor


@dataclass
class CaseResult:
    """Prediction for one scan, in world coordinates and (mask) on the canonical grid."""

    landmarks: list  # spinelm.io.landmarks.Landmark, head to foot
    instance_mask: np.ndarray | None  # canonical (z, y, x) int16 VerSe labels, or None
    candidates: int
    seconds: float = 0.0
    labelled: Labelled | None = None
    qc_reasons: list = field(default_factory=list)  # plain-words reasons to review (spinelm.sanity)
    turned: list = field(default_factory=list)  # evidence of the turned-over comparison (Predictor.turned_over)
    stages: dict = field(default_factory=dict)  # seconds per stage (spinelm.io.outputs.STAGES) it ran
    coarse_outputs: dict | None = field(default=None, repr=False)  # the coarse stage's outputs on the scan as stored


def estimate_prediction_bytes(geometry, n_channels: int, target_spacing, n_outputs: int) -> tuple[int, int]:
    """``(voxels after resampling, peak bytes)`` a case needs, from its header alone."""
    extent = np.asarray(geometry.size, dtype=np.float64) * np.asarray(geometry.spacing, dtype=np.float64)
    resampled = int(np.prod(np.ceil(extent / _geometric_mean(target_spacing))))
    n_in = int(np.prod(geometry.size, dtype=np.float64))
    peak = (BYTES_PER_INPUT_VOXEL * n_channels * n_in + resampled *
            (BYTES_PER_RESAMPLED_VOXEL_PER_CHANNEL * n_channels + BYTES_PER_RESAMPLED_VOXEL_PER_OUTPUT * n_outputs))
    return resampled, int(peak)


def _geometric_mean(spacing) -> float:
    # the plan's spacing per network axis is not aligned with the stored axes before the transpose;
    # the geometric mean gives the right voxel count whatever the axis order
    return float(np.prod(np.asarray(spacing, dtype=np.float64)) ** (1 / 3))


def available_memory_bytes() -> int | None:
    """Memory available to this process now (Linux ``MemAvailable``, or a cgroup limit if lower)."""
    from pathlib import Path

    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    if not found:
        return None
    avail = found[0]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            avail = min(avail, int(text))
    return avail


def load_network(model, fold: int, checkpoint: str = "final", configuration: str = "fine",
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network of one stage and fold of a :class:`~spinelm.plans.ModelFolder`, with the weights
    prediction uses (``network`` of the checkpoint), in eval mode on ``device``."""
    from spinelm.network import build_network

    ckpt = model.checkpoint(fold, checkpoint, configuration)
    if not ckpt.is_file():
        what = "fold" if configuration == "fine" else f"{configuration} stage of fold"
        raise FileNotFoundError(f"{ckpt}: not found (the {what} {fold} is not trained)")
    net = build_network(model.plans, configuration=configuration)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state["network"])
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"{ckpt}: the checkpoint does not match the network of {model.plans_path} "
                         f"({str(exc).splitlines()[0][:120]}); was the folder re-planned after training?") \
            from None
    return net.to(device).eval()


class Predictor:
    """Networks (one per fold, averaged) and their plans, ready to label scans.

    Build it with :meth:`from_model_folder` (``spinelm predict``, the demo) or
    :meth:`from_network` (training validation).

    Args:
        plans: :class:`spinelm.plans.Plans` (or a plans dict).
        networks: one or more networks of ``configuration`` (folds; their outputs are averaged).
        device: ``cpu`` or ``cuda``.
        mirror: mirroring test-time augmentation over the plan's mirror axes (never cranio-caudal).
        step_size: sliding-window step as a fraction of the patch (nnU-Net's 0.5).
        info: what to record about the model in every output (folder, folds, checkpoint).
        configuration: the configuration of ``networks`` (``fine``; ``coarse`` to run that stage alone).
        coarse_networks: the coarse identification stage's networks (one per fold), when the plan has
            one; its segmentation labels the fine peaks from the whole field of view.
    """

    def __init__(self, plans, networks: list, device: str | torch.device = "cpu", mirror: bool = False,
                 step_size: float = 0.5, info: dict | None = None, configuration: str = "fine",
                 coarse_networks: list | None = None, calibration=None, flip_check: dict | None = None,
                 label_weight: float | None = None):
        from spinelm.plans import as_plans

        self.plans = as_plans(plans)
        if label_weight is not None:  # the weight of the label evidence fitted on the validation cases,
            from spinelm.plans import Plans  # on a view of its own (the cached ordering model is not shared)

            self.plans = Plans(self.plans.raw, self.plans.source)
            self.plans.spine_model().label_weight = float(label_weight)
        self.calibration = calibration  # spinelm.confidence.Calibration: confidence per vertebra
        self.networks = list(networks)
        self.configuration = configuration
        self.coarse_networks = list(coarse_networks or [])
        self.device = torch.device(device)
        self.mirror = mirror
        self.step_size = step_size
        self.info = info or {}
        self.classifier = None
        self.turned_check = TURNED_CHECK  # the turned-over comparison in predict_array
        self.flip_check = flip_check  # the model's learned flip check (spinelm.sanity.fit_flip_check)
        if self.plans.classification is not None and configuration == "fine":
            from spinelm.classification import Classifier

            self.classifier = Classifier.from_plans(self.networks, self.plans, self.device) or None

    @classmethod
    def from_network(cls, network: torch.nn.Module, plans, device: str | torch.device = "cpu",
                     configuration: str = "fine", coarse_networks: list | None = None) -> "Predictor":
        return cls(plans, [network], device, info={"model": "in memory"}, configuration=configuration,
                   coarse_networks=coarse_networks)

    @classmethod
    def from_model_folder(cls, model_dir, folds: list[int] | None = None, checkpoint: str = "final",
                          device: str | torch.device = "cpu", mirror: bool = False,
                          step_size: float = 0.5) -> "Predictor":
        """Every trained fold of a model folder (or ``folds``), checkpoint ``final``/``best``/``latest``."""
        from spinelm.plans import ModelFolder

        model = ModelFolder(model_dir)
        plans = model.plans
        if folds is None:
            folds = model.trained_folds(checkpoint)
            if not folds:
                raise FileNotFoundError(f"{model.root}: no fold has checkpoint_{checkpoint}.pt; train first "
                                        f"(spinelm train {model.root} --fold 0) or choose --checkpoint latest")
        networks = [load_network(model, f, checkpoint, "fine", device) for f in folds]
        coarse = []
        if plans.has_coarse:
            # the coarse stage keeps its final checkpoint (its validation is not what "best" ranks)
            coarse = [load_network(model, f, "final", "coarse", device) for f in folds]
        info = {"model": str(model.root.resolve()), "folds": list(folds), "checkpoint": checkpoint,
                "stages": plans.stages}
        from spinelm.confidence import CALIBRATION_FILE, Calibration, load_label_weight
        from spinelm.sanity import load_flip_check

        weight = load_label_weight(model.root)
        info["label_weight"] = weight if weight is not None else plans.spine_model().label_weight
        calibration = Calibration.load(model.root / CALIBRATION_FILE)
        fitted = (calibration.fitted_on or {}).get("label_weight") if calibration is not None else None
        if fitted is not None and abs(float(fitted) - info["label_weight"]) > 1e-9:
            log.warning("%s: the confidence was fitted on labels ordered with label weight %g, but the ordering now "
                        "uses %g (ordering.json missing or changed); run 'spinelm calibrate %s' to refit both",
                        model.root, float(fitted), info["label_weight"], model.root)
        return cls(plans, networks, device, mirror, step_size, info, coarse_networks=coarse,
                   calibration=calibration, flip_check=load_flip_check(model.root), label_weight=weight)

    # ------------------------------------------------------------------------------ running

    def network_outputs(self, data: torch.Tensor, configuration: str | None = None) -> dict[str, torch.Tensor]:
        """Fold-averaged sliding-window outputs on a preprocessed (C, X, Y, Z) tensor of ``configuration``
        (default: the predictor's own; ``"coarse"`` runs the coarse stage's networks)."""
        configuration = configuration or self.configuration
        nets = self.coarse_networks if configuration == "coarse" and self.configuration != "coarse" else self.networks
        patch = self.plans.configuration(configuration).patch_size
        mirror_axes = self.plans.mirror_axes if self.mirror else None
        total: dict[str, torch.Tensor] = {}
        for net in nets:
            out = sliding_window(net, data, patch, self.plans.head_dict, step=self.step_size,
                                 mirror_axes=mirror_axes, device=self.device)
            for k, v in out.items():
                total[k] = total[k] + v if k in total else v
        return {k: v / len(nets) for k, v in total.items()}

    def level_reader(self, data, frame: Frame, coarse: tuple | None = None):
        """The level head over this scan (the coarse stage's networks and its preprocessed array), or None."""
        spec = self.plans.identification
        if spec is None:
            return None
        from spinelm.identification import LevelReader

        if self.configuration == "coarse":
            reader = LevelReader(self.networks, spec, data, frame, self.device)
        elif self.uses_coarse and coarse is not None:
            reader = LevelReader(self.coarse_networks, spec, coarse[0], coarse[1], self.device)
        else:
            return None
        return reader or None

    @property
    def uses_coarse(self) -> bool:
        return bool(self.coarse_networks) and self.configuration != "coarse"

    def predict_preprocessed(self, data, frame: Frame, with_mask: bool = True,
                             coarse: tuple | None = None) -> CaseResult:
        """Label a preprocessed (C, X, Y, Z) array whose voxels ``frame`` places in the world;
        ``coarse = (coarse array, coarse frame)``: the same scan preprocessed for the coarse stage.

        The instance mask (``with_mask``) stays on the preprocessed grid; :meth:`predict_array`
        brings it to the canonical grid.
        """
        t0 = time.perf_counter()
        stages = dict.fromkeys(("network", "order", "mask", "classes"), 0.0)
        clock = t0

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            stages[name] += now - clock
            clock = now

        pred = self.network_outputs(torch.as_tensor(np.asarray(data)))
        coarse_out = None
        if self.uses_coarse:
            if coarse is None:
                raise ValueError("this model has a coarse identification stage: pass the scan preprocessed for it")
            coarse_out = (self.network_outputs(torch.as_tensor(np.asarray(coarse[0])), "coarse"), coarse[1])
        lap("network")
        lab = postprocess(pred, self.plans, frame, self.configuration, coarse_out,
                          self.level_reader(data, frame, coarse))
        lap("order")
        mask = None
        if with_mask and "segmentation" in pred:
            spacing = np.asarray(self.plans.configuration(self.configuration).spacing)
            vox = np.asarray([c.position for c in lab.candidates]).reshape(-1, 3)
            mask = self._instances(pred["segmentation"], vox[lab.kept] * spacing, lab.labels, spacing)
        lap("mask")
        landmarks = lab.landmarks()
        if self.classifier is not None and mask is not None:
            landmarks = self.classify(landmarks, data, mask)
        lap("classes")
        if self.calibration is not None and landmarks:
            from spinelm.confidence import vertebra_features

            from dataclasses import replace

            conf = self.calibration(vertebra_features(lab, self.plans.distance_mm))
            landmarks = [replace(lm, confidence=float(c)) for lm, c in zip(landmarks, conf)]
        lap("order")
        stored = coarse_out[0] if coarse_out is not None else pred if self.configuration == "coarse" else None
        return CaseResult(landmarks, mask, len(lab.candidates), time.perf_counter() - t0, lab, coarse_outputs=stored,
                          stages=stages)

    def turned_over(self, data, frame: Frame, stored_outputs: dict | None = None,
                    keys: tuple | None = None) -> list[dict]:
        """The turned-over comparison: the coarse stage labels the scan preprocessed for it (``data``
        in ``frame``) as stored and turned each way of :func:`turned_arrays`; one row per
        orientation (``key`` ``stored`` first) with :func:`turned_evidence`. A header whose head-foot
        axis is wrong shows up as a turned orientation that looks more like a spine than the stored
        one (:func:`spinelm.sanity.turned_over_reasons`). ``stored_outputs``: the coarse outputs on
        ``data`` when the prediction already has them (not computed again); ``keys``: only these turned
        orientations (e.g. ``("flip",)``; default all)."""
        spacing = self.plans.configuration("coarse").spacing
        # at the full label weight whatever the ordering's fit: the header check's thresholds are learned
        # on validation scans before the weight is fitted, and must mean the same at prediction
        model = self.plans.spine_model().weighted(1.0)
        rows = []
        variants = [("stored", "as stored", np.asarray(data, np.float32))]
        variants += [v for v in turned_arrays(np.asarray(data, np.float32), self.plans.cc_axis, spacing, frame,
                                              flip_only=keys is not None and set(keys) <= {"flip"})
                     if keys is None or v[0] in keys]
        for key, name, arr in variants:
            out = stored_outputs if key == "stored" and stored_outputs is not None else \
                self.network_outputs(torch.as_tensor(arr), "coarse")
            level = self.level_reader(arr, frame, (arr, frame))
            lab = postprocess(out, self.plans, frame, "coarse", None, level, model)
            rows.append({"key": key, "name": name, **turned_evidence(lab, level)})
        return rows

    def classify(self, landmarks: list, data, instance_mask: np.ndarray) -> list:
        """``landmarks`` with the class probabilities of their vertebrae in ``instance_mask`` (VerSe labels,
        on the grid of the preprocessed ``data``), each from that vertebra's own voxels."""
        from dataclasses import replace

        if self.classifier is None:
            return landmarks
        probs = self.classifier(data, instance_mask, [lm.label for lm in landmarks])
        return [replace(lm, class_probabilities=probs[lm.label]) if lm.label in probs else lm for lm in landmarks]

    def grade_masks(self, image: np.ndarray, geometry, mask: np.ndarray, path: str = "scan") -> CaseResult:
        """Classify the vertebrae of a user's instance mask (canonical (z, y, x), VerSe labels, on the
        scan's grid) instead of predicted ones: centroids and labels come from the mask."""
        from spinelm.io.landmarks import centroids_from_mask
        from spinelm.nnunet import run_preprocessor

        t0 = time.perf_counter()
        if self.classifier is None:
            raise ValueError("this model has no classification head; --masks grades vertebrae with one (plan a "
                             "dataset that has classesTr.csv)")
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise ValueError(f"{path}: the mask's grid {tuple(mask.shape)} differs from the scan's "
                             f"{tuple(image.shape[1:])}; --masks needs masks on the scan's own grid")
        landmarks = centroids_from_mask(mask, geometry)
        data, seg, _ = run_preprocessor(image, geometry.array_spacing, self.plans, self.configuration,
                                        np.clip(mask, 0, None)[None].astype(np.int16))
        t1 = time.perf_counter()
        landmarks = self.classify(landmarks, data, np.asarray(seg[0]))
        return CaseResult(landmarks, np.asarray(mask).astype(np.int16), 0, time.perf_counter() - t0,
                          stages={"preprocess": t1 - t0, "classes": time.perf_counter() - t1})

    def check_memory(self, geometry, path: str = "scan") -> None:
        """Refuse, before any resampling, a scan whose prediction would not fit in memory."""
        voxels, need = estimate_prediction_bytes(geometry, self.plans.n_channels,
                                                 self.plans.configuration(self.configuration).spacing,
                                                 self.plans.n_outputs)
        avail = available_memory_bytes()
        if avail is not None and need > MEMORY_SHARE * avail:
            raise MemoryError(f"{path}: predicting this scan needs about {need / 2 ** 30:.1f} GB ({geometry.size} "
                              f"voxels, {voxels / 1e6:.0f} million after resampling to the plan's "
                              f"{list(self.plans.configuration(self.configuration).spacing)} mm); {avail / 2 ** 30:.1f} GB are "
                              f"available. Crop the scan or predict it on a machine with more memory")

    def preprocess(self, image: np.ndarray, geometry, configuration: str | None = None):
        """``(data, frame, info)``: a canonical (C, z, y, x) image preprocessed for ``configuration``
        (default the predictor's) with the plan, and the frame that places its voxels in the world."""
        from spinelm.nnunet import run_preprocessor

        data, _, info = run_preprocessor(image, geometry.array_spacing, self.plans, configuration or self.configuration)
        return data, Frame.from_info(geometry, self.plans.transpose_forward, info), info

    def predict_array(self, image: np.ndarray, geometry, path: str = "scan") -> CaseResult:
        """Label a canonical (C, z, y, x) image whose canonical geometry is ``geometry``."""
        t0 = time.perf_counter()
        self.check_memory(geometry, path)
        header = header_reasons(np.asarray(geometry.size) * np.asarray(geometry.spacing),
                                self.plans.raw.get("scan_extent_mm"))
        t1 = time.perf_counter()
        data, frame, info = self.preprocess(image, geometry)
        coarse = self.preprocess(image, geometry, "coarse")[:2] if self.uses_coarse else None
        preprocess_s = time.perf_counter() - t1
        result = self.predict_preprocessed(data, frame, coarse=coarse)
        t1 = time.perf_counter()
        if result.instance_mask is not None:
            result.instance_mask = self._to_canonical_grid(result.instance_mask, info, geometry.shape)
        result.stages["mask"] += time.perf_counter() - t1
        t1 = time.perf_counter()
        turned = []
        if self.turned_check and self.plans.has_coarse and (coarse is not None or self.configuration == "coarse"):
            turned = self.turned_over(*(coarse if coarse is not None else (data, frame)), result.coarse_outputs)
        result.coarse_outputs = None  # not kept with the result
        result.qc_reasons = header
        lab = result.labelled
        result.qc_reasons += orientation_reasons(lab.candidate_world_mm, [c.label_probs for c in lab.candidates],
                                                 lab.kept, level_order=not turned)
        result.qc_reasons += turned_over_reasons(turned, flip_check=self.flip_check)
        result.qc_reasons += column_reasons(result.landmarks, self.plans.raw.get("spine"))
        result.qc_reasons += end_reasons(result.landmarks, geometry, self.plans.raw.get("spine"))
        result.qc_reasons += confidence_reasons(result.landmarks)
        result.turned = turned
        result.stages = {"preprocess": preprocess_s, **result.stages, "check": time.perf_counter() - t1}
        result.seconds = time.perf_counter() - t0
        return result

    def _instances(self, softmax: torch.Tensor, centres_mm: np.ndarray, labels: list[int],
                   spacing: np.ndarray) -> np.ndarray:
        """Vertebra voxels labelled by their nearest ordered centroid. A voxel is vertebra when the
        vertebra labels together outweigh background (``p(background) < 0.5``): with many labels the
        probability spreads over neighbouring levels and no single one may beat background
        (measured: empty masks on whole-spine phantoms with ``argmax > 0``)."""
        fg = softmax[0].numpy() < 0.5
        out = np.zeros(fg.shape, np.int16)
        if not labels or not fg.any():
            return out
        pts = np.argwhere(fg)
        pos = pts * spacing
        d2 = ((pos[:, None, :] - centres_mm[None, :, :]) ** 2).sum(-1)  # (n_fg, n_labels)
        nearest = d2.argmin(1)
        keep = d2[np.arange(len(pts)), nearest] <= (INSTANCE_RADIUS_FRACTION * self.plans.distance_mm) ** 2
        out[tuple(pts[keep].T)] = np.asarray(labels, np.int16)[nearest[keep]]
        return out

    def _to_canonical_grid(self, seg: np.ndarray, info: dict, canonical_shape) -> np.ndarray:
        """Preprocessed label map -> canonical (z, y, x) grid: nearest-neighbour resize, un-crop, un-transpose."""
        crop_shape = info["shape_after_cropping"]
        index = [np.minimum(((np.arange(n) + 0.5) * s / n).astype(np.int64), s - 1)
                 for n, s in zip(crop_shape, seg.shape)]
        resized = seg[np.ix_(*index)]
        tf = self.plans.transpose_forward
        full = np.zeros([canonical_shape[a] for a in tf], np.int16)
        full[tuple(slice(a, b) for a, b in info["bbox"])] = resized
        return np.ascontiguousarray(full.transpose(self.plans.transpose_backward))

    @property
    def folds(self) -> list[int]:
        return self.info.get("folds", [])

    def describe(self) -> dict:
        raw = self.plans.raw
        return {**self.info, "mirror_tta": self.mirror, "step_size": self.step_size, "device": str(self.device),
                "plans_format": raw.get("format"), "plans_version": raw.get("version"),
                "spinelm_version": raw.get("spinelm_version")}
