"""Preprocessing into a cache per model folder, with nnunetv2's own preprocessor.

Each case is read in the canonical orientation (LPS axes; see :mod:`spinelm.io.image`), its mask
values mapped to the segmentation head's channel indices, and handed to nnunetv2's
``DefaultPreprocessor.run_case_npy`` (transpose, crop to non-zero, normalisation, resampling)
through an nnU-Net view of spinelm's plans. Landmarks are carried into preprocessed voxel
coordinates with the same transpose, crop and resampling map.

Cache layout (``MODEL_DIR/preprocessed/<configuration>/``)::

    CASE_data.npy   float32 (C, X0, X1, X2) in network axis order
    CASE_seg.npy    int8/int16 (1 or 2, X0, X1, X2): channel index of the segmentation head; -1 outside
                    the body (nnU-Net's non-zero mask); all 0/-1 when the case has no mask. With a
                    structures head, channel 1 is its target (:func:`structure_target`)
    CASE.json       geometry, crop box, landmarks in preprocessed voxels, has_mask, source signature

A second run reuses every case whose source files and plan are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from spinelm import labels as L
from spinelm.dataset import DEFAULT_IGNORE_VALUE, Case, discover_dataset, load_case
from spinelm.io.files import atomic_path, read_json, write_json_atomic
from spinelm.io.image import Frame
from spinelm.nnunet import run_preprocessor
from spinelm.plans import ModelFolder, as_plans
from spinelm.parallel import parallel_map

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: classes rows carry a weight


def label_lookup(plans: dict, ignore_value: int | None = None) -> np.ndarray:
    """Array mapping mask values (0..MAX_LABEL, and ``ignore_value``) to segmentation channel indices.

    Labels the head does not have map to 0 (background); ``ignore_value`` (a partial mask's
    unannotated voxels) maps to the head's ignore index (its channel count), which the loss skips.
    """
    heads = as_plans(plans).heads
    lut = np.zeros(max(L.MAX_LABEL, ignore_value or 0) + 1, np.int16)
    seg_labels = heads["segmentation"].labels if "segmentation" in heads else ()
    for i, lab in enumerate(seg_labels, start=1):
        lut[lab] = i
    if ignore_value is not None:
        lut[ignore_value] = len(seg_labels) + 1
    return lut


def structure_target(mask: np.ndarray, names, ignore_value: int | None = None) -> np.ndarray:
    """The auxiliary structures head's target from a mask: 0 background, ``1 + names.index(structure)``
    for disc/endplate/canal/cord voxels (TPTBox values), and the head's ignore index ``len(names) + 1``
    for a case that annotates none of them (its background is not known to be background) and for
    ``ignore_value`` voxels."""
    names = list(names)
    values = np.unique(mask)
    lut = {int(v): 1 + names.index(st) for v in values if (st := L.structure_of(int(v))) in names}
    ignore = len(names) + 1
    if not lut:
        return np.full(mask.shape, ignore, np.int16)
    out = np.zeros(mask.shape, np.int16)
    for v, idx in lut.items():
        out[mask == v] = idx
    if ignore_value is not None:
        out[mask == ignore_value] = ignore
    return out


def source_signature(case: Case) -> str:
    """Changes when any source file of the case (path, size, modification time) or its classes change."""
    parts = []
    for p in list(case.images) + [case.mask, case.centroids, case.scribbles, case.boxes]:
        if p is not None:
            st = Path(p).stat()
            parts.append(f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    parts.append(repr(sorted(case.classes)))  # an edited classesTr.csv refreshes the case
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def plan_signature(plans: dict, configuration: str) -> str:
    """Changes when anything preprocessing depends on changes in the plans."""
    plans = as_plans(plans).raw
    keys = {"transpose_forward": plans["transpose_forward"], "heads": plans["heads"].get("segmentation"),
            "structures": plans["heads"].get("structures", {}).get("names"),
            "intensity": plans["foreground_intensity_properties_per_channel"],
            "config": {k: plans["configurations"][configuration][k] for k in
                       ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                        "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")},
            "version": CACHE_VERSION}
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def preprocess_case(case: Case, plans: dict, configuration: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Preprocess one case in memory: ``(data, seg, properties)``."""
    lc = load_case(case, canonical=True)
    seg = None
    ignore_value = case.ignore_value
    if ignore_value is None and case.annotation == "boxes":
        ignore_value = DEFAULT_IGNORE_VALUE
    target = lc.training_mask(ignore_value)
    if target is not None:
        lut = label_lookup(plans, ignore_value)
        values = np.asarray(target)
        seg = np.where((values >= 0) & (values < len(lut)), lut[np.clip(values, 0, len(lut) - 1)], 0)[None]
        seg = seg.astype(np.int16)
        names = as_plans(plans).raw["heads"].get("structures", {}).get("names")
        if names and lc.mask is not None:  # a second channel for the auxiliary structures head
            seg = np.concatenate([seg, structure_target(values, names, ignore_value)[None]])
    data, seg_out, info = run_preprocessor(lc.image, lc.geometry.array_spacing, plans, configuration, seg)
    bbox, shape_after_crop, new_shape = info["bbox"], info["shape_after_cropping"], info["shape"]
    pts = np.asarray([lm.position_mm for lm in lc.landmarks]).reshape(-1, 3)
    frame = Frame.from_info(lc.geometry, as_plans(plans).transpose_forward, info)
    vox = frame.from_world(pts)
    properties = {
        "case": case.case_id,
        "has_mask": target is not None,
        "annotation": case.annotation,
        # boxes or scribbles without a centroid file do not say where the centroids are: the heatmap
        # learns only from their background voxels
        "landmarks_known": case.mask is not None or case.centroids is not None,
        "partial_mask": bool(ignore_value is not None and target is not None and np.any(target == ignore_value)),
        "landmarks_from_mask": lc.landmarks_from_mask,
        "landmarks": [{"label": lm.label, "index": [round(float(v), 3) for v in p], "position_mm": list(lm.position_mm)}
                      for lm, p in zip(lc.landmarks, vox)],
        "canonical_geometry": lc.geometry.to_json(),
        "bbox_used_for_cropping": bbox,
        "shape_after_cropping": shape_after_crop,
        "shape": new_shape,
        "spacing": list(as_plans(plans).configuration(configuration).spacing),
        "classes": [[int(lab), cls, float(w)] for lab, cls, w in case.classes],
        "boxes": [_box_in_voxels(b, frame) for b in lc.boxes],
    }
    seg_out = seg_out.astype(np.int8 if int(np.max(seg_out, initial=0)) < 127 else np.int16)
    return data, seg_out, properties


def _box_in_voxels(box, frame: Frame) -> dict:
    """A vertebra box in preprocessed voxel coordinates (:meth:`spinelm.io.boxes.Box.in_index_space`)."""
    c, h = box.in_index_space(frame.from_world)
    return {"label": int(box.label), "center": [round(float(v), 3) for v in c],
            "half_axes": [[round(float(v), 4) for v in row] for row in h]}


def _preprocess_and_save(case: Case, plans: dict, configuration: str, out_dir: str, signature: str) -> str:
    out = Path(out_dir)
    try:
        data, seg, props = preprocess_case(case, plans, configuration)
    except (OSError, ValueError) as exc:
        return f"failed: {exc}"
    props["signature"] = signature
    with atomic_path(out / f"{case.case_id}_data.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, data)
    with atomic_path(out / f"{case.case_id}_seg.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, seg)
    write_json_atomic(out / f"{case.case_id}.json", props)  # written last: marks the case complete
    return "done"


def cache_dir(model_dir: str | os.PathLike, configuration: str = "fine") -> Path:
    return ModelFolder(model_dir).cache_dir(configuration)


def preprocess_dataset(dataset_root: str | os.PathLike, model_dir: str | os.PathLike, plans: dict,
                       configuration: str = "fine", num_workers: int | None = None,
                       progress: bool = True, unlabelled: bool = False) -> dict[str, str]:
    """Preprocess every annotated case of a dataset into the model folder's cache (``unlabelled``:
    the scans of ``imagesUnlabelled/`` into :meth:`~spinelm.plans.ModelFolder.unlabelled_cache_dir`).

    Returns ``{case: "cached" | "done" | "failed: ..."}``; failures are also logged. Cases whose
    sources and plan are unchanged are reused, so the call is idempotent and resumable.
    """
    ds = discover_dataset(dataset_root)
    out = ModelFolder(model_dir).unlabelled_cache_dir(configuration) if unlabelled else cache_dir(model_dir,
                                                                                                 configuration)
    out.mkdir(parents=True, exist_ok=True)
    psig = plan_signature(plans, configuration)
    status: dict[str, str] = {}
    todo = []
    for case in (ds.unlabelled if unlabelled else ds.cases):
        if not case.annotated and not unlabelled:
            continue
        sig = hashlib.sha1((psig + source_signature(case)).encode()).hexdigest()
        meta = out / f"{case.case_id}.json"
        if meta.is_file():
            try:
                if read_json(meta).get("signature") == sig and (out / f"{case.case_id}_data.npy").is_file():
                    status[case.case_id] = "cached"
                    continue
            except ValueError:
                pass
        todo.append((case, plans, configuration, str(out), sig))
    workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 4)
    results = parallel_map(_preprocess_and_save, todo, workers,
                           f"Preprocessing ({configuration}{', unlabelled' if unlabelled else ''})", progress)
    for (case, *_), res in zip(todo, results):
        status[case.case_id] = res
        if res.startswith("failed"):
            log.error("%s: %s", case.case_id, res)
    write_json_atomic(out / "cache.json", {"format": "spinelm-cache", "version": CACHE_VERSION,
                                           "configuration": configuration, "plan_signature": psig,
                                           "cases": sorted(c for c, s in status.items() if not s.startswith("failed"))})
    return status


def load_preprocessed(model_dir: str | os.PathLike, configuration: str, case_id: str,
                      mmap: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """A cached case: ``(data, seg, properties)``, arrays memory-mapped by default."""
    d = cache_dir(model_dir, configuration)
    mode = "r" if mmap else None
    return (np.load(d / f"{case_id}_data.npy", mmap_mode=mode), np.load(d / f"{case_id}_seg.npy", mmap_mode=mode),
            read_json(d / f"{case_id}.json"))
