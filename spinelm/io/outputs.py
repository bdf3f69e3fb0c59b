"""Output files of a prediction, all written atomically (temporary file, then rename).

    CASE_ctd.json        spinelm centroids, world LPS mm, with scores, the model and the source
    CASE_verse_ctd.json  VerSe centroid format (voxels of the input reoriented to P, I, R)
    CASE.mrk.json        3D Slicer markups (LPS)
    CASE_seg.nii.gz      instance mask (VerSe labels) on the input's own grid
    CASE_qc.png          sagittal and coronal views with the labels (and classes) drawn
    CASE_classes.csv     with a classification head: one row per vertebra (class, probabilities)
    summary.csv          one row per case of a batch (with vertebrae per class)

``CASE_ctd.json`` is written last and marks a case as done for ``--continue``.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from spinelm.io.files import write_text_atomic
from spinelm.io.image import Geometry

# the stages of one scan's prediction, in order, timed in CaseResult.stages and written to summary.csv as
# seconds_STAGE after the total: read the file(s); resample and normalise (both stages); the networks'
# sliding windows (fine and coarse); decode the peaks, read the level head at them, order the run and
# the confidence; the instance mask; the class head; the header check (the coarse stage on the turned
# scan) and the QC reasons; write the outputs
STAGES = ("read", "preprocess", "network", "order", "mask", "classes", "check", "write")
STAGE_FIELDS = [f"seconds_{s}" for s in STAGES]
SUMMARY_FIELDS = ["case", "status", "n_vertebrae", "labels", "classes", "qc", "qc_reasons", "seconds", *STAGE_FIELDS,
                  "error", "input"]


def output_paths(out_dir: Path, case: str) -> dict[str, Path]:
    return {"ctd": out_dir / f"{case}_ctd.json", "verse": out_dir / f"{case}_verse_ctd.json",
            "mrk": out_dir / f"{case}.mrk.json", "seg": out_dir / f"{case}_seg.nii.gz",
            "qc": out_dir / f"{case}_qc.png", "classes": out_dir / f"{case}_classes.csv"}


def class_counts(landmarks) -> str:
    """``"normal:5 oedema:1"``: vertebrae per most probable class (empty without classes)."""
    from collections import Counter

    counts = Counter(lm.class_name for lm in landmarks if lm.class_name is not None)
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def write_classes_csv(path: Path, case: str, landmarks) -> None:
    """``case,label,name,class,p_<class>...``: one row per classified vertebra, head to foot."""
    rows = [lm for lm in landmarks if lm.class_probabilities]
    names = list(rows[0].class_probabilities) if rows else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "label", "name", "class", *[f"p_{n}" for n in names]])
    for lm in rows:
        w.writerow([case, lm.label, lm.name, lm.class_name,
                    *[f"{lm.class_probabilities.get(n, 0.0):.4f}" for n in names]])
    write_text_atomic(path, buf.getvalue())


def write_case_outputs(out_dir: Path, case: str, result, canonical_image: np.ndarray,
                       canonical_geometry: Geometry, original, source: list[Path], run_info: dict,
                       qc: bool = True) -> None:
    """Every output of one case; the centroid JSON last (it marks the case done)."""
    import SimpleITK as sitk

    from spinelm.io.image import make_image, write_image
    from spinelm.io.landmarks import write_slicer_markups, write_verse_json, write_spinelm_json
    from spinelm.qc import save_qc_png

    paths = output_paths(out_dir, case)
    original_geometry = Geometry.from_sitk(original)
    if result.instance_mask is not None:
        canon = make_image(result.instance_mask, canonical_geometry)
        seg = sitk.Resample(canon, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
        write_image(seg, paths["seg"])
    if qc:
        save_qc_png(paths["qc"], canonical_image[0], canonical_geometry, result.landmarks, result.instance_mask,
                    title=case)
    if any(lm.class_probabilities for lm in result.landmarks):
        write_classes_csv(paths["classes"], case, result.landmarks)
    write_verse_json(paths["verse"], result.landmarks, original_geometry)
    write_slicer_markups(paths["mrk"], result.landmarks)
    write_spinelm_json(paths["ctd"], result.landmarks, source=[str(p) for p in source], **run_info)


def read_summary(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


def write_summary(path: Path, rows: dict[str, dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for case in sorted(rows):
        w.writerow(rows[case])
    write_text_atomic(path, buf.getvalue())
