"""``spinelm evaluate``: VerSe identification rate, localisation error, Dice, and per-vertebra classes
(accuracy, balanced accuracy, per-class sensitivity/specificity, AUC, confusion matrix) when the
ground truth has ``classesTr.csv`` and the predictions have classes.

The metrics are pure functions on ``{label: position_mm}`` maps and label arrays; the folder
functions read predictions (``CASE_ctd.json``) and ground truth (a dataset folder or centroid
files) and write ``evaluation.json`` and ``evaluation.csv``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: A ground-truth vertebra counts as identified when the prediction with its label lies within this
#: distance and that ground-truth vertebra is the closest one to the prediction (VerSe).
IDENTIFICATION_RADIUS_MM = 20.0


def level_index(label: int) -> int:
    """Level counted from C1 (0) along the regular sequence; T13 and L6 take the slot of the level
    that follows them (L1, S1), so that calling a 13th thoracic vertebra L1 is no shift."""
    from spinelm import labels as L

    rank = L.cranio_caudal_rank(label)
    extra = sum(1 for v in (L.label_of("T13"), L.label_of("L6")) if L.cranio_caudal_rank(v) < rank)
    return rank - extra


def level_shift(pred: dict[int, np.ndarray], gt: dict[int, np.ndarray],
                radius_mm: float = IDENTIFICATION_RADIUS_MM) -> int:
    """By how many levels a case's labels are shifted (0: not shifted).

    Each prediction within ``radius_mm`` of a ground-truth centroid (the closest one) sits on that
    vertebra; its offset is its level minus that vertebra's level (:func:`level_index`). The case is
    shifted by ``k`` when more than half of these predictions share the same non-zero offset ``k``:
    the error users of vertebra labellers meet most, a whole run labelled one level off.
    """
    if not pred or not gt:
        return 0
    gt_labels = list(gt)
    gt_pos = np.asarray([gt[k] for k in gt_labels], dtype=np.float64).reshape(-1, 3)
    offsets = []
    for lab, p in pred.items():
        d = np.linalg.norm(gt_pos - np.asarray(p, dtype=np.float64), axis=1)
        i = int(np.argmin(d))
        if d[i] <= radius_mm:
            offsets.append(level_index(lab) - level_index(gt_labels[i]))
    if not offsets:
        return 0
    values, counts = np.unique(offsets, return_counts=True)
    k = int(values[np.argmax(counts)])
    return k if k != 0 and counts.max() > len(offsets) / 2 else 0


#: A predicted label outside the annotated levels lies "beyond the annotation" when it is further
#: along the column than the annotated end vertebra on its side by at least this fraction of the
#: annotated neighbour distance (see :func:`beyond_annotation`).
BEYOND_FRACTION = 0.5


def beyond_annotation(pred: dict[int, np.ndarray], gt: dict[int, np.ndarray]) -> list[int]:
    """Predicted labels that the annotation says nothing about: a level above the first annotated
    one, found further towards the head than that vertebra (or below the last, further towards the
    feet), by at least :data:`BEYOND_FRACTION` of the annotated neighbour distance. Data sets
    annotate a fixed range (e.g. L1-L5) and leave out vertebrae that are in view, often cut by the
    field of view; such a label is neither right nor wrong. A shifted run is not beyond: its extra
    label sits on an annotated vertebra. Needs two or more annotated vertebrae."""
    from spinelm import labels as L

    order = L.sort_cranio_caudal(gt)
    if len(order) < 2:
        return []
    first, last = np.asarray(gt[order[0]], float), np.asarray(gt[order[-1]], float)
    pts = np.asarray([gt[k] for k in order], float)
    spacing = float(np.median(np.linalg.norm(np.diff(pts, axis=0), axis=1)))
    axis = (last - first) / max(float(np.linalg.norm(last - first)), 1e-9)  # towards the feet
    out = []
    for lab, p in pred.items():
        if lab in gt:
            continue
        p = np.asarray(p, float)
        rank = L.cranio_caudal_rank(lab)
        if rank < L.cranio_caudal_rank(order[0]) and float((first - p) @ axis) >= BEYOND_FRACTION * spacing:
            out.append(lab)
        elif rank > L.cranio_caudal_rank(order[-1]) and float((p - last) @ axis) >= BEYOND_FRACTION * spacing:
            out.append(lab)
    return out


def identification(pred: dict[int, np.ndarray], gt: dict[int, np.ndarray],
                   radius_mm: float = IDENTIFICATION_RADIUS_MM) -> dict:
    """Identification rate and localisation distances of one case.

    Returns ``{"n_gt", "identified" (labels), "distances_mm" ({label: d} for gt labels that were
    predicted), "missed" (gt labels not predicted), "false_positive" (predicted labels not in gt),
    "beyond_annotation" (those of them outside the annotated range, :func:`beyond_annotation`)}``.
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
    return {"n_gt": len(gt), "gt_labels": gt_labels, "identified": identified, "distances_mm": distances,
            "missed": [k for k in gt if k not in pred], "false_positive": [k for k in pred if k not in gt],
            "beyond_annotation": beyond_annotation(pred, gt), "level_shift": level_shift(pred, gt, radius_mm)}


def case_is_right(result: dict) -> bool:
    """Every annotated vertebra identified and no wrong label: a label outside the annotated range
    (:func:`beyond_annotation`) is not counted against the case."""
    wrong = set(result["false_positive"]) - set(result.get("beyond_annotation", []))
    return not result["missed"] and not wrong and len(result["identified"]) == result["n_gt"]


#: Regions reported separately (identification rate per region: thoracic levels are the hardest to count).
REGIONS = ("cervical", "thoracic", "lumbar", "sacral", "coccygeal")


def summarise(results: list[dict]) -> dict:
    """Dataset-level identification rate (over all gt vertebrae), per region, and mean distance (d_mean)."""
    from spinelm import labels as L

    n = sum(r["n_gt"] for r in results)
    ident = sum(len(r["identified"]) for r in results)
    dists = [d for r in results for d in r["distances_mm"].values()]
    by_region: dict[str, dict] = {}
    for r in results:
        for lab in r.get("gt_labels", []):
            reg = by_region.setdefault(L.region_of(lab), {"n_gt": 0, "n_identified": 0})
            reg["n_gt"] += 1
            reg["n_identified"] += int(lab in r["identified"])
    for reg in by_region.values():
        reg["id_rate"] = reg["n_identified"] / reg["n_gt"]
    return {"by_region": dict(sorted(by_region.items(), key=lambda kv: REGIONS.index(kv[0]) if kv[0] in REGIONS
                                     else len(REGIONS))),
            "id_rate": ident / n if n else float("nan"), "d_mean_mm": float(np.mean(dists)) if dists else float("nan"),
            "n_gt": n, "n_identified": ident, "n_missed": sum(len(r["missed"]) for r in results),
            "n_false_positive": sum(len(r["false_positive"]) for r in results),
            "n_beyond_annotation": sum(len(r.get("beyond_annotation", [])) for r in results),
            "n_cases": len(results), "n_cases_level_shifted": sum(1 for r in results if r.get("level_shift")),
            "level_shifted_share": (sum(1 for r in results if r.get("level_shift")) / len(results)) if results
            else float("nan")}


def dice_per_label(pred: np.ndarray, gt: np.ndarray) -> dict[int, float]:
    """Dice of every label present in the ground-truth mask (0 where the prediction lacks it)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"masks differ in shape: prediction {pred.shape}, ground truth {gt.shape}")
    out = {}
    for lab in np.unique(gt):
        if lab == 0:
            continue
        g, p = gt == lab, pred == lab
        out[int(lab)] = float(2 * np.count_nonzero(g & p) / (np.count_nonzero(g) + np.count_nonzero(p)))
    return out


# ------------------------------------------------------------------------------------- folders


_PRED_SUFFIXES = ("_ctd.json", ".mrk.json", ".json")


def match_classes(pred_lms: list, gt: dict[int, np.ndarray], gt_classes, names: list[str],
                  radius_mm: float = IDENTIFICATION_RADIUS_MM) -> tuple[list[str], list[dict], int]:
    """Pair every vertebra with a ground-truth class with the predicted vertebra on it (the closest
    prediction within ``radius_mm`` whose closest ground-truth vertebra it is, whatever its label: a
    class is judged on the vertebra it was computed from, even when the level is wrong).

    Returns ``(true class names, predicted probabilities, annotated vertebrae with no prediction)``.
    """
    from spinelm.classification import soft_targets

    targets = soft_targets(gt_classes, names)
    gt_labels = [lab for lab in gt]
    gt_pos = np.asarray([gt[k] for k in gt_labels], dtype=np.float64).reshape(-1, 3)
    owner: dict[int, tuple[float, object]] = {}
    for lm in pred_lms:
        if not lm.class_probabilities or not len(gt_pos):
            continue
        d = np.linalg.norm(gt_pos - np.asarray(lm.position_mm), axis=1)
        i = int(np.argmin(d))
        if d[i] <= radius_mm and (gt_labels[i] not in owner or d[i] < owner[gt_labels[i]][0]):
            owner[gt_labels[i]] = (float(d[i]), lm)
    truth, probs, missed = [], [], 0
    for lab, t in targets.items():
        if lab not in gt:
            continue
        if lab in owner:
            truth.append(names[int(np.argmax(t))])
            probs.append(owner[lab][1].class_probabilities)
        else:
            missed += 1
    return truth, probs, missed


def _prediction_files(pred_dir: Path) -> dict[str, Path]:
    """``{case: centroid file}`` for a prediction folder (``CASE_ctd.json`` first, then Slicer/JSON)."""
    found: dict[str, Path] = {}
    for suffix in _PRED_SUFFIXES:
        for p in sorted(pred_dir.glob(f"*{suffix}")):
            name = p.name
            if name.endswith("_verse_ctd.json") or name in ("predict.json", "evaluation.json") \
                    or name.startswith("predict_part"):
                continue
            found.setdefault(name[: -len(suffix)], p)
    return found


def _ground_truth(gt_dir: Path) -> dict[str, dict]:
    """``{case: {"landmarks": {label: mm}, "mask": path or None}}`` from a dataset folder or a centroid folder."""
    from spinelm.dataset import discover_dataset, ground_truth_landmarks
    from spinelm.io.landmarks import as_dict, read_landmarks

    out: dict[str, dict] = {}
    if any((gt_dir / d).is_dir() for d in ("imagesTr", "labelsTr", "centroidsTr")):
        for case in discover_dataset(gt_dir).cases:
            if case.mask is not None or case.centroids is not None:  # boxes or scribbles alone give no centroids
                out[case.case_id] = {"landmarks": as_dict(ground_truth_landmarks(case)[0]), "mask": case.mask,
                                     "classes": list(case.classes)}
        return out
    for case, p in _prediction_files(gt_dir).items():
        out[case] = {"landmarks": as_dict(read_landmarks(p)), "mask": None}
    return out


def _attempted_cases(pred_dir: Path) -> set[str]:
    """Cases a ``spinelm predict`` batch tried (its ``summary*.csv``), failed ones included."""
    import csv

    out: set[str] = set()
    for p in pred_dir.glob("summary*.csv"):
        with open(p, newline="", encoding="utf-8") as fh:
            out |= {row["case"] for row in csv.DictReader(fh) if row.get("case")}
    return out


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                     radius_mm: float = IDENTIFICATION_RADIUS_MM, all_gt: bool = False) -> dict:
    """Evaluate a prediction folder against ground truth.

    ``gt_dir`` is a dataset folder (centroids from ``centroidsTr/`` or the masks of ``labelsTr/``) or a
    folder of centroid files named like the predictions. The cases evaluated are those with a
    prediction or a failed row in the batch's ``summary.csv`` (a failed case counts as all missed),
    or every ground-truth case with ``all_gt`` (e.g. a held-out split predicted in full).
    Predictions without ground truth are listed and ignored. Dice per vertebra is computed where
    ``CASE_seg.nii.gz`` and a ground-truth mask both exist.
    """
    from spinelm import labels as L
    from spinelm.io.landmarks import as_dict, read_landmarks

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: prediction folder not found")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"{gt_dir}: ground-truth folder not found")
    preds = _prediction_files(pred_dir)
    gts = _ground_truth(gt_dir)
    if not gts:
        raise ValueError(f"{gt_dir}: no ground-truth centroids or masks found")
    wanted = set(gts) if all_gt else (set(preds) | _attempted_cases(pred_dir)) & set(gts)
    if not wanted:
        raise ValueError(f"{pred_dir}: no prediction matches a ground-truth case of {gt_dir} (case names differ?)")
    cases, results, dices = [], [], []
    cls_truth, cls_probs, cls_unmatched, cls_names = [], [], 0, None
    for case in sorted(wanted):
        gt = gts[case]["landmarks"]
        pred_lms = read_landmarks(preds[case]) if case in preds else []
        pred = as_dict(pred_lms)
        if gts[case].get("classes") and any(lm.class_probabilities for lm in pred_lms):
            cls_names = cls_names or list(next(lm for lm in pred_lms if lm.class_probabilities).class_probabilities)
            t, p, missed = match_classes(pred_lms, gt, gts[case]["classes"], cls_names, radius_mm)
            cls_truth += t
            cls_probs += p
            cls_unmatched += missed
        r = identification(pred, gt, radius_mm)
        row = {"case": case, "predicted": case in preds, **r}
        seg = pred_dir / f"{case}_seg.nii.gz"
        if gts[case]["mask"] is not None and seg.is_file():
            from spinelm.io.image import load_volume
            pm, _ = load_volume(seg, dtype=None)
            gm, _ = load_volume(gts[case]["mask"], dtype=None)
            row["dice"] = {L.name_of(k): v for k, v in dice_per_label(pm, gm).items()}
            dices += list(row["dice"].values())
        results.append(r)
        cases.append(row)
    overall = summarise(results)
    overall["n_cases"] = len(wanted)
    overall["n_ground_truth_cases_not_evaluated"] = len(gts) - len(wanted)
    overall["n_cases_without_prediction"] = sum(not c["predicted"] for c in cases)
    overall["dice_mean"] = float(np.mean(dices)) if dices else None
    if cls_names:
        from spinelm.classification import class_metrics

        overall["classification"] = {**class_metrics(cls_truth, cls_probs, cls_names),
                                     "n_annotated_not_found": cls_unmatched}
    return {"format": "spinelm-evaluation", "version": 1, "prediction": str(pred_dir.resolve()),
            "ground_truth": str(gt_dir.resolve()), "radius_mm": radius_mm, "overall": overall,
            "cases": cases, "predictions_without_ground_truth": sorted(set(preds) - set(gts))}


def write_evaluation(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``evaluation.json`` and ``evaluation.csv`` (one row per case, one for all) in ``out_dir``."""
    import csv
    import io

    from spinelm import labels as L
    from spinelm.io.files import write_json_atomic, write_text_atomic

    out = Path(out_dir)
    jpath = write_json_atomic(out / "evaluation.json", report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "n_gt", "n_identified", "id_rate", "d_mean_mm", "level_shift", "missed", "false_positive",
                "dice_mean"])
    for c in report["cases"]:
        d = list(c["distances_mm"].values())
        dice = list(c.get("dice", {}).values())
        w.writerow([c["case"], c["n_gt"], len(c["identified"]),
                    f"{len(c['identified']) / c['n_gt']:.4f}" if c["n_gt"] else "",
                    f"{np.mean(d):.3f}" if d else "", c.get("level_shift", 0), " ".join(L.name_of(x) for x in c["missed"]),
                    " ".join(L.name_of(x) for x in c["false_positive"]), f"{np.mean(dice):.4f}" if dice else ""])
    o = report["overall"]
    w.writerow(["ALL", o["n_gt"], o["n_identified"], f"{o['id_rate']:.4f}",
                f"{o['d_mean_mm']:.3f}" if np.isfinite(o["d_mean_mm"]) else "", o["n_cases_level_shifted"], o["n_missed"],
                o["n_false_positive"], f"{o['dice_mean']:.4f}" if o["dice_mean"] is not None else ""])
    cpath = write_text_atomic(out / "evaluation.csv", buf.getvalue())
    return jpath, cpath


def format_table(report: dict) -> str:
    """A compact text table: one line per case and the overall figures."""
    from spinelm import labels as L

    lines = [f"{'case':<24} {'gt':>3} {'id':>3} {'id rate':>8} {'d_mean':>8} {'shift':>5}  missed / false positive"]
    for c in report["cases"]:
        d = list(c["distances_mm"].values())
        rate = len(c["identified"]) / c["n_gt"] if c["n_gt"] else float("nan")
        note = "" if c["predicted"] else "  (no prediction)"
        lines.append(f"{c['case'][:24]:<24} {c['n_gt']:>3} {len(c['identified']):>3} {rate:>8.2f} "
                     f"{(f'{np.mean(d):.1f} mm') if d else '-':>8} {c.get('level_shift', 0):>+5d}  "
                     f"{','.join(L.name_of(x) for x in c['missed']) or '-'} / "
                     f"{','.join(L.name_of(x) for x in c['false_positive']) or '-'}{note}")
    o = report["overall"]
    dice = f", Dice {o['dice_mean']:.3f}" if o.get("dice_mean") is not None else ""
    lines.append(f"overall: identification rate {o['id_rate']:.3f} ({o['n_identified']}/{o['n_gt']}), d_mean "
                 f"{o['d_mean_mm']:.2f} mm, {o['n_cases_level_shifted']} of {o['n_cases']} case(s) level-shifted, "
                 f"{o['n_missed']} missed, {o['n_false_positive']} false positive "
                 f"label(s)" + (f" ({o['n_beyond_annotation']} of them outside the annotated levels, where the annotation "
                                "says nothing)" if o.get("n_beyond_annotation") else "") + f"{dice}; {o['n_cases']} case(s), {o['n_cases_without_prediction']} without prediction"
                 + (f"; {o['n_ground_truth_cases_not_evaluated']} ground-truth case(s) not predicted and not "
                    f"evaluated (--all-gt counts them)" if o.get("n_ground_truth_cases_not_evaluated") else ""))
    c = o.get("classification")
    if c and c.get("n"):
        per = ", ".join(f"{k} {v['n']}: sensitivity {v['sensitivity']:.3f}, specificity {v['specificity']:.3f}"
                        for k, v in c["per_class"].items())
        lines.append(f"classes of {c['n']} vertebrae ({c['n_annotated_not_found']} annotated not found): accuracy "
                     f"{c['accuracy']:.3f}, balanced accuracy {c['balanced_accuracy']:.3f}, AUC {c['auc']:.3f} "
                     f"(abnormal vs {c['classes'][0]} {c['auc_abnormal']:.3f}); {per}")
        lines.append("confusion (rows true, columns predicted: " + ", ".join(c["classes"]) + "): "
                     + " | ".join(" ".join(str(x) for x in row) for row in c["confusion_matrix"]["counts"]))
    if len(o.get("by_region", {})) > 1:
        lines.append("by region: " + ", ".join(f"{k} {v['id_rate']:.3f} ({v['n_identified']}/{v['n_gt']})"
                                               for k, v in o["by_region"].items()))
    return "\n".join(lines)
