"""Sliding-window prediction on preprocessed arrays and heatmap decoding (no SimpleITK here).

The window positions and the Gaussian importance weighting are nnunetv2's
(``compute_steps_for_sliding_window``, ``compute_gaussian``). Decoding turns heatmap peaks into
candidates with sub-voxel positions and label probabilities read from the segmentation head;
:func:`best_per_label` is the simple per-label choice used for validation during training (the
anatomical ordering step replaces it for prediction).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from spinelm.network import split_heads

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


@dataclass
class Candidate:
    """A heatmap peak: position in (preprocessed) voxels, peak value and label probabilities."""

    position: np.ndarray
    score: float
    label_probs: dict[int, float]

    @property
    def label(self) -> int:
        return max(self.label_probs, key=self.label_probs.get)


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
    was_training = network.training
    network.eval()
    for sx in steps[0]:
        for sy in steps[1]:
            for sz in steps[2]:
                sl = (slice(sx, sx + patch_size[0]), slice(sy, sy + patch_size[1]), slice(sz, sz + patch_size[2]))
                tile = padded[(slice(None), *sl)][None].to(device)
                out = _forward(network, tile)
                if mirror_axes:
                    n = 1
                    for ax in mirror_axes:
                        out = out + torch.flip(_forward(network, torch.flip(tile, (ax + 2,))), (ax + 2,))
                        n += 1
                    out = out / n
                acc[(slice(None), *sl)] += out[0].float().cpu() * gauss
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


def best_per_label(candidates: list[Candidate]) -> dict[int, Candidate]:
    """For each label, the candidate with the highest score x label probability."""
    best: dict[int, Candidate] = {}
    for c in candidates:
        lab = c.label
        if lab not in best or c.score * c.label_probs[lab] > best[lab].score * best[lab].label_probs[lab]:
            best[lab] = c
    return best
