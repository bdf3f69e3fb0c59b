"""Quality-control pictures: a sagittal and a coronal slice with the vertebra labels (and classes) drawn."""
from __future__ import annotations

import os

import numpy as np

from spinelm.confidence import REVIEW_BELOW
from spinelm.io.files import atomic_path
from spinelm.io.image import Geometry


def _window(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1)


def save_qc_png(path: str | os.PathLike, volume: np.ndarray, geometry: Geometry, landmarks, labels_mask=None,
                title: str = "") -> None:
    """Write a PNG with the sagittal and coronal slices through the labelled spine.

    Args:
        volume: canonical (z, y, x) array (LPS axes: z towards the head, y posterior, x left).
        geometry: its canonical geometry.
        landmarks: predicted :class:`~spinelm.io.landmarks.Landmark` list (world LPS mm).
        labels_mask: optional canonical instance mask drawn as a translucent overlay.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sz, sy, sx = geometry.array_spacing
    idx = (geometry.world_to_array_index(np.asarray([lm.position_mm for lm in landmarks]).reshape(-1, 3))
           if landmarks else np.zeros((0, 3)))
    centre = np.median(idx, axis=0) if len(idx) else np.asarray(volume.shape) / 2
    cx = int(np.clip(round(centre[2]), 0, volume.shape[2] - 1))
    cy = int(np.clip(round(centre[1]), 0, volume.shape[1] - 1))
    views = [("sagittal", volume[:, :, cx], None if labels_mask is None else labels_mask[:, :, cx], 1, sy),
             ("coronal", volume[:, cy, :], None if labels_mask is None else labels_mask[:, cy, :], 2, sx)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 7), dpi=100)
    cmap = plt.get_cmap("tab20")
    for ax, (name, img, lab, col_axis, col_spacing) in zip(axes, views):
        lo, hi = _window(img)
        extent = (0, img.shape[1] * col_spacing, 0, img.shape[0] * sz)  # rows: z (head up)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent, interpolation="bilinear")
        if lab is not None and np.any(lab):
            rgba = np.zeros((*lab.shape, 4))
            for v in np.unique(lab[lab > 0]):
                rgba[lab == v] = (*cmap(int(v) % 20)[:3], 0.35)
            ax.imshow(rgba, origin="lower", extent=extent, interpolation="nearest")
        for lm, p in zip(landmarks, idx):
            x, y = (p[col_axis] + 0.5) * col_spacing, (p[0] + 0.5) * sz
            ax.plot(x, y, "o", ms=4, color=cmap(lm.label % 20), mec="k")
            low = lm.confidence is not None and lm.confidence < REVIEW_BELOW
            text = lm.name if lm.confidence is None else f"{lm.name} {lm.confidence:.2f}"
            cls = lm.class_name
            if cls is not None:
                text += f" {cls} {lm.class_probabilities[cls]:.2f}"
            # red: review the label; cyan: a class other than the first (normal) one
            colour = "red" if low else ("cyan" if cls is not None and cls != next(iter(lm.class_probabilities))
                                        else "yellow")
            ax.text(x + 4 * col_spacing, y, text, color=colour, fontsize=8, va="center",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
        ax.set_title(f"{name} ({'posterior' if name == 'sagittal' else 'left'} to the right)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: {len(landmarks)} vertebrae" + (f" ({landmarks[0].name}-{landmarks[-1].name})"
                                                          if landmarks else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
