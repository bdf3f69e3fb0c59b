"""Anatomical ordering of heatmap candidates (first version: a consecutive run of labels).

Candidates are de-duplicated (non-maximum suppression at a fraction of the neighbour distance),
sorted from head to foot, and labelled as one consecutive run of the regular sequence (C1..L5,
S1) whose start maximises the summed log label probabilities. This fixes the typical errors of
per-peak labelling (two peaks called L3, a run shifted by one at a region boundary) without any
prior but the order of the spine. Gaps, T13/L6 and distance statistics are not modelled yet.
No SimpleITK here.
"""
from __future__ import annotations

import numpy as np

from spinelm import labels as L

#: Peaks closer than this fraction of the median neighbour distance are one vertebra.
NMS_FRACTION = 0.6
#: Probability floor inside the log, for labels the model never gives.
LOG_FLOOR = 1e-4


def regular_labels() -> list[int]:
    """The regular cranio-caudal sequence without transitional variants and coccyx."""
    return [v.label for v in L.VERTEBRAE if not v.transitional and v.label != L.label_of("Cocc")]


def suppress_duplicates(positions_mm: np.ndarray, scores: np.ndarray, min_distance_mm: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression (highest score first)."""
    order = np.argsort(-np.asarray(scores))
    kept: list[int] = []
    for i in order:
        if all(np.linalg.norm(positions_mm[i] - positions_mm[j]) >= min_distance_mm for j in kept):
            kept.append(int(i))
    return kept


def label_range(allowed: list[int] | None) -> list[int]:
    """The regular sequence, restricted to the span of ``allowed`` labels (those the model was trained on)."""
    seq = regular_labels()
    if not allowed:
        return seq
    ranks = [L.cranio_caudal_rank(a) for a in allowed]
    lo, hi = min(ranks), max(ranks)
    return [lab for lab in seq if lo <= L.cranio_caudal_rank(lab) <= hi]


def assign_consecutive_labels(label_probs: list[dict[int, float]], allowed: list[int] | None = None) -> list[int]:
    """Labels for candidates already sorted head to foot: the consecutive run with the best score.

    Args:
        label_probs: per candidate, ``{label: probability}``.
        allowed: labels the model knows; the run stays within their span (default: C1..S1).

    Returns:
        One label per candidate, consecutive in :func:`regular_labels` order.
    """
    seq = label_range(allowed)
    n = len(label_probs)
    if n == 0:
        return []
    if n > len(seq):
        raise ValueError(f"{n} candidates cannot be {len(seq)} consecutive vertebrae")
    best, best_start = -np.inf, 0
    for start in range(len(seq) - n + 1):
        s = sum(np.log(max(p.get(seq[start + i], 0.0), LOG_FLOOR)) for i, p in enumerate(label_probs))
        if s > best:
            best, best_start = s, start
    return [seq[best_start + i] for i in range(n)]


def order_candidates(positions_mm: np.ndarray, scores, label_probs: list[dict[int, float]], cc_axis: int,
                     distance_mm: float, superior_is_positive: bool = True,
                     allowed: list[int] | None = None) -> list[tuple[int, int]]:
    """``[(candidate index, label)]`` head to foot after suppression and consecutive labelling.

    Args:
        positions_mm: (n, 3) candidate positions in a frame whose ``cc_axis`` runs head-foot.
        scores: heatmap peak values.
        label_probs: per candidate label probabilities.
        cc_axis: index of the cranio-caudal axis in ``positions_mm``.
        distance_mm: median distance between neighbouring vertebrae.
        superior_is_positive: whether larger coordinates along ``cc_axis`` are more cranial.
        allowed: labels the model knows (see :func:`assign_consecutive_labels`); when there are more
            candidates than labels in their span, the weakest candidates are dropped.
    """
    positions_mm = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    if len(positions_mm) == 0:
        return []
    kept = suppress_duplicates(positions_mm, np.asarray(scores), NMS_FRACTION * distance_mm)
    kept = sorted(kept, key=lambda i: -positions_mm[i, cc_axis] if superior_is_positive else positions_mm[i, cc_axis])
    max_n = len(label_range(allowed))
    if len(kept) > max_n:
        keep = set(sorted(kept, key=lambda i: -scores[i])[:max_n])
        kept = [i for i in kept if i in keep]
    labs = assign_consecutive_labels([label_probs[i] for i in kept], allowed)
    return list(zip(kept, labs))
