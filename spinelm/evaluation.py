"""Localisation metrics (VerSe definitions); pure functions on ``{label: position_mm}`` maps."""
from __future__ import annotations

import numpy as np

#: A ground-truth vertebra counts as identified when the prediction with its label lies within this
#: distance and that ground-truth vertebra is the closest one to the prediction (VerSe).
IDENTIFICATION_RADIUS_MM = 20.0


def identification(pred: dict[int, np.ndarray], gt: dict[int, np.ndarray],
                   radius_mm: float = IDENTIFICATION_RADIUS_MM) -> dict:
    """Identification rate and localisation distances of one case.

    Returns ``{"n_gt", "identified" (labels), "distances_mm" ({label: d} for gt labels that were
    predicted), "missed" (gt labels not predicted), "false_positive" (predicted labels not in gt)}``.
    """
    gt_labels = list(gt)
    gt_pos = np.asarray([gt[k] for k in gt_labels], dtype=np.float64).reshape(-1, 3)
    identified, distances = [], {}
    for lab, g in gt.items():
        if lab not in pred:
            continue
        p = np.asarray(pred[lab], dtype=np.float64)
        d = float(np.linalg.norm(p - np.asarray(g)))
        distances[lab] = d
        closest = gt_labels[int(np.argmin(np.linalg.norm(gt_pos - p, axis=1)))]
        if d <= radius_mm and closest == lab:
            identified.append(lab)
    return {"n_gt": len(gt), "identified": identified, "distances_mm": distances,
            "missed": [k for k in gt if k not in pred], "false_positive": [k for k in pred if k not in gt]}


def summarise(results: list[dict]) -> dict:
    """Dataset-level identification rate (over all gt vertebrae) and mean distance (d_mean)."""
    n = sum(r["n_gt"] for r in results)
    ident = sum(len(r["identified"]) for r in results)
    dists = [d for r in results for d in r["distances_mm"].values()]
    return {"id_rate": ident / n if n else float("nan"), "d_mean_mm": float(np.mean(dists)) if dists else float("nan"),
            "n_gt": n, "n_identified": ident, "n_missed": sum(len(r["missed"]) for r in results),
            "n_false_positive": sum(len(r["false_positive"]) for r in results)}
