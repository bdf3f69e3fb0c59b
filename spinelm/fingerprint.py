"""Dataset fingerprint: nnU-Net's (spacings, shapes, foreground intensities) plus spine statistics.

The nnU-Net part is computed with nnunetv2's own pieces (``crop_to_nonzero`` and
``DatasetFingerprintExtractor.collect_foreground_intensities``) on every case read in the
canonical orientation (axes permuted/flipped to LPS, so NumPy axis 0 is cranio-caudal). That
reorientation is what makes per-axis median spacings meaningful when scans come in different
orientations; the user's files are read in place, never copied.

Spine statistics feed the heatmap sigma, the coarse configuration and the ordering model:
labels present per case, vertebra extents (mm), and the distance and offset between consecutive
vertebrae (mean and spread per pair, e.g. ``"L4-L5"``).
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from spinelm import __version__
from spinelm import labels as L
from spinelm.dataset import Case, Dataset, discover_dataset, load_case
from spinelm.io.files import read_versioned_json, write_json_atomic
from spinelm.parallel import parallel_map
from spinelm.sanity import column_shape_statistics

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
#: Foreground voxels sampled for intensity statistics over the whole dataset. nnU-Net samples 1e8,
#: which costs ~0.8 GB per channel; percentiles are stable to well under 1 % with 2e6.
FOREGROUND_SAMPLES_TOTAL = 2_000_000
#: For cases with centroids but no mask, balls of this radius around each centroid stand in for
#: the foreground (vertebral bodies are >= 14 mm high, so the ball stays inside bone).
CENTROID_BALL_RADIUS_MM = 6.0


def _centroid_balls(shape, geometry, landmarks) -> np.ndarray:
    seg = np.zeros(shape, np.int16)
    sp = np.asarray(geometry.array_spacing)
    r_vox = np.ceil(CENTROID_BALL_RADIUS_MM / sp).astype(int)
    for lm in landmarks:
        c = np.round(geometry.world_to_array_index(lm.position_mm)).astype(int)
        lo = np.maximum(c - r_vox, 0)
        hi = np.minimum(c + r_vox + 1, shape)
        if np.any(hi <= lo):
            continue
        grids = np.meshgrid(*[(np.arange(lo[a], hi[a]) - c[a]) * sp[a] for a in range(3)], indexing="ij")
        ball = sum(g ** 2 for g in grids) <= CENTROID_BALL_RADIUS_MM ** 2
        seg[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][ball] = lm.label
    return seg


def _foreground(lc) -> np.ndarray:
    """Where a case's foreground intensities are sampled: its mask; else the vertebra strokes of its
    scribbles; else the inside of its boxes (a box also holds some soft tissue); else balls around its
    centroids."""
    if lc.mask is not None:
        return lc.mask
    shape = lc.image.shape[1:]
    if lc.scribbles is not None:
        return np.where(np.isin(lc.scribbles, L.VALID_LABELS), lc.scribbles, 0).astype(np.int16)
    if lc.boxes:
        from spinelm.io.boxes import box_mask

        seg = np.zeros(shape, np.int16)
        for b in lc.boxes:
            seg[box_mask(b, lc.geometry, shape)] = b.label
        return seg
    return _centroid_balls(shape, lc.geometry, lc.landmarks)


def analyze_case(case: Case, num_samples: int) -> dict:
    """Fingerprint of one case (runs in a worker process)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    lc = load_case(case, canonical=True)
    seg = _foreground(lc)
    data_c, seg_c, _ = crop_to_nonzero(lc.image, seg[None].astype(np.int16))
    intensities, _ = DatasetFingerprintExtractor.collect_foreground_intensities(seg_c, data_c, num_samples=num_samples)
    spacing = lc.geometry.array_spacing
    extents = {}
    if lc.mask is not None:
        from scipy import ndimage
        vertebrae = np.where(np.isin(lc.mask, L.VALID_LABELS), lc.mask, 0)  # not discs, canal, ignore
        boxes = ndimage.find_objects(vertebrae.astype(np.int32))
        for lab, box in enumerate(boxes, start=1):
            if box is None or not L.is_valid_label(lab):
                continue
            ext = [(s.stop - s.start) * spacing[a] for a, s in enumerate(box)]
            extents[lab] = {"si": ext[0], "ap": ext[1], "lr": ext[2],
                            "volume_ml": float(np.count_nonzero(lc.mask[box] == lab) * np.prod(spacing) / 1000)}
    elif lc.boxes:  # a box's reach along the world axes (LPS z, y, x: si, ap, lr); its volume bounds the vertebra's
        for b in lc.boxes:
            reach = np.ptp(b.corners(), axis=0)
            extents[int(b.label)] = {"si": float(reach[2]), "ap": float(reach[1]), "lr": float(reach[0]),
                                     "volume_ml": float(np.prod(b.size_mm) / 1000)}
    return {
        "case": case.case_id,
        "shape_after_crop": list(data_c.shape[1:]),
        "spacing": list(spacing),
        "relative_size_after_cropping": float(np.prod(data_c.shape[1:]) / np.prod(lc.image.shape[1:])),
        "intensities": [np.asarray(x, dtype=np.float32) for x in intensities],
        "image_min": [float(np.percentile(ch, 0.5)) for ch in lc.image],
        "has_mask": lc.mask is not None,
        "structures": sorted({st for v in (np.unique(lc.mask).tolist() if lc.mask is not None else [])
                              if (st := L.structure_of(v)) is not None}),
        "landmarks": {lm.label: list(lm.position_mm) for lm in lc.landmarks},
        "annotation": case.annotation,
        # vertebrae that boxes or scribbles annotate (they give no centroid)
        "loose_labels": sorted({int(b.label) for b in lc.boxes} | (
            {int(v) for v in np.unique(lc.scribbles) if L.is_valid_label(int(v))} if lc.scribbles is not None
            else set())) if lc.mask is None else [],
        "extents": extents,
        "fov_mm": [float(n * s) for n, s in zip(lc.image.shape[1:], spacing)],
    }


def _pair_statistics(per_case: list[dict]) -> dict:
    """Distance and offset between consecutive vertebrae (allowed successors), per pair."""
    pairs: dict[tuple[int, int], list[np.ndarray]] = defaultdict(list)
    for rec in per_case:
        lms = {int(k): np.asarray(v) for k, v in rec["landmarks"].items()}
        for a in lms:
            for b in L.successors(a):
                if b in lms:
                    pairs[(a, b)].append(lms[b] - lms[a])
    out = {}
    for (a, b), offs in sorted(pairs.items(), key=lambda kv: L.cranio_caudal_rank(kv[0][0])):
        offs = np.asarray(offs)
        dist = np.linalg.norm(offs, axis=1)
        out[f"{L.name_of(a)}-{L.name_of(b)}"] = {
            "from": a, "to": b, "n": int(len(offs)),
            "distance_mm_mean": float(dist.mean()), "distance_mm_std": float(dist.std()),
            "offset_mm_mean": offs.mean(0).tolist(), "offset_mm_std": offs.std(0).tolist(),
        }
    return out


def class_names(ds: Dataset) -> list[str]:
    """Class names in a stable order: dataset.json ``classes`` (by code) first, then the others sorted."""
    mapping = ds.dataset_json.get("classes") if isinstance(ds.dataset_json.get("classes"), dict) else {}

    def code(k):
        return (0, int(k), "") if str(k).lstrip("-").isdigit() else (1, 0, str(k))

    ordered = [str(mapping[k]) for k in sorted(mapping, key=code)]
    seen = {cls for c in ds.cases for _, cls, _ in c.classes}
    return ordered + sorted(seen - set(ordered))


def class_statistics(ds: Dataset, case_ids: list[str]) -> dict:
    """Per-vertebra classes of ``classesTr.csv``: names, how many vertebrae have each (by the most
    probable class of their rows), per label, and how many vertebrae have soft targets."""
    from spinelm.classification import soft_targets

    names = class_names(ds)
    if not names:
        return {}
    keep = set(case_ids)
    total: dict[str, int] = defaultdict(int)
    per_label: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    soft = n_cases = 0
    for c in ds.cases:
        if c.case_id not in keep or not c.classes:
            continue
        n_cases += 1
        for lab, t in soft_targets(c.classes, names).items():
            cls = names[int(np.argmax(t))]
            total[cls] += 1
            per_label[lab][cls] += 1
            soft += int(t.max() < 1.0)
    if not total:  # class names in dataset.json but no vertebra with a class: nothing to learn from
        return {}
    return {"names": names, "cases": n_cases, "vertebrae": int(sum(total.values())),
            "counts": {n: int(total.get(n, 0)) for n in names}, "soft_targets": soft,
            "per_label": {L.name_of(lab): dict(v) for lab, v in sorted(per_label.items(),
                                                                        key=lambda kv: L.cranio_caudal_rank(kv[0]))}}


def _infer_channel_names(ds: Dataset, per_case: list[dict]) -> dict[str, str]:
    """Named channels are kept; an unnamed one that holds air at about -1000 is CT (HU), else MR."""
    names = dict(ds.channel_names)
    for k, v in names.items():
        if v.lower() in ("unknown", "", "image"):
            lows = [rec["image_min"][int(k)] for rec in per_case]
            names[k] = "CT" if np.median(lows) < -500 else "MR"
            log.info("channel %s has no name in dataset.json; inferred %s from its intensities", k, names[k])
    return names


def compute_fingerprint(dataset: str | os.PathLike | Dataset, num_workers: int | None = None,
                        progress: bool = True) -> dict:
    """Fingerprint of a dataset folder (see module docstring for the fields).

    Raises:
        ValueError: when the dataset has no usable annotated case.
    """
    ds = dataset if isinstance(dataset, Dataset) else discover_dataset(dataset)
    cases = [c for c in ds.cases if c.annotated]
    if not cases:
        raise ValueError(f"{ds.root}: no annotated training case; run 'spinelm validate {ds.root}'")
    workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 4, len(cases))
    per_sample = max(FOREGROUND_SAMPLES_TOTAL // len(cases), 1000)
    try:
        per_case = parallel_map(analyze_case, [(c, per_sample) for c in cases], workers, "Fingerprinting", progress)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{exc} (run 'spinelm validate {ds.root}' to list every problem)") from None
    n_ch = len(per_case[0]["intensities"])
    stats = {}
    for ch in range(n_ch):
        vals = np.concatenate([rec["intensities"][ch] for rec in per_case]).astype(np.float64)
        if vals.size == 0:
            raise ValueError(f"{ds.root}: no foreground voxels in any case; masks and centroids are empty")
        p005, p50, p995 = np.percentile(vals, (0.5, 50.0, 99.5))
        stats[str(ch)] = {"mean": float(vals.mean()), "median": float(p50), "std": float(vals.std()),
                          "min": float(vals.min()), "max": float(vals.max()),
                          "percentile_99_5": float(p995), "percentile_00_5": float(p005)}
    label_counts: dict[str, int] = defaultdict(int)
    for rec in per_case:
        for lab in set(map(int, rec["landmarks"])) | set(rec.get("loose_labels", [])):
            label_counts[L.name_of(int(lab))] += 1
    extents: dict[int, list[dict]] = defaultdict(list)
    for rec in per_case:
        for lab, e in rec["extents"].items():
            extents[int(lab)].append(e)
    extent_stats = {L.name_of(lab): {k: float(np.mean([e[k] for e in es])) for k in ("si", "ap", "lr", "volume_ml")}
                    | {"n": len(es)} for lab, es in sorted(extents.items(), key=lambda kv: L.cranio_caudal_rank(kv[0]))}
    pairs = _pair_statistics(per_case)
    class_stats = class_statistics(ds, [rec["case"] for rec in per_case])
    all_dists = [p["distance_mm_mean"] for p in pairs.values() for _ in range(p["n"])]
    seg_labels = sorted({int(lab) for rec in per_case if rec["has_mask"] for lab in rec["extents"]}
                        | {int(lab) for rec in per_case for lab in rec.get("loose_labels", [])})
    fp = {
        "format": "spinelm-fingerprint",
        "version": FINGERPRINT_VERSION,
        "spinelm_version": __version__,
        "dataset": str(Path(ds.root).resolve()),
        "orientation": "LPS (NumPy axis 0 = cranio-caudal)",
        "channel_names": _infer_channel_names(ds, per_case),
        "cases": [rec["case"] for rec in per_case],
        "files": {c.case_id: {"images": [str(Path(p).resolve()) for p in c.images],
                              "label": str(Path(c.mask).resolve()) if c.mask else "",
                              "centroids": str(Path(c.centroids).resolve()) if c.centroids else ""} for c in cases},
        # the nnU-Net part, in nnU-Net's keys, per case in the order of "cases"
        "spacings": [rec["spacing"] for rec in per_case],
        "shapes_after_crop": [rec["shape_after_crop"] for rec in per_case],
        "foreground_intensity_properties_per_channel": stats,
        "median_relative_size_after_cropping": float(np.median([r["relative_size_after_cropping"] for r in per_case])),
        # spine statistics
        "spine": {
            "cranio_caudal_axis": 0,
            "labels_per_case": {rec["case"]: L.sort_cranio_caudal(set(map(int, rec["landmarks"]))
                                                                  | set(rec.get("loose_labels", [])))
                                for rec in per_case},
            "label_counts": dict(sorted(label_counts.items(), key=lambda kv: L.cranio_caudal_rank(L.label_of(kv[0])))),
            "segmentation_labels": seg_labels,
            "cases_with_mask": int(sum(r["has_mask"] for r in per_case)),
            "structures": {st: n for st in L.STRUCTURES
                           if (n := int(sum(st in r.get("structures", []) for r in per_case)))},
            "cases_with_centroids_only": int(sum(r.get("annotation", "centroids") == "centroids" for r in per_case)),
            "cases_with_boxes_or_scribbles": int(sum(r.get("annotation") in ("boxes", "scribbles") for r in per_case)),
            "vertebra_extent_mm": extent_stats,
            "consecutive_pairs": pairs,
            "column_shape": column_shape_statistics([rec["landmarks"] for rec in per_case], pairs),
            "median_consecutive_distance_mm": float(np.median(all_dists)) if all_dists else None,
            "median_vertebrae_per_case": float(np.median([len(r["landmarks"]) for r in per_case])),
            "median_fov_mm": np.median([r["fov_mm"] for r in per_case], 0).tolist(),
        },
    }
    if class_stats:
        fp["classes"] = class_stats
    return fp


def save_fingerprint(fp: dict, path: str | os.PathLike) -> Path:
    return write_json_atomic(path, fp)


def load_fingerprint(path: str | os.PathLike) -> dict:
    return read_versioned_json(path, "spinelm-fingerprint", FINGERPRINT_VERSION)
