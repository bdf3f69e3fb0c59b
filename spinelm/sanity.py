"""Case checks: is the scan what the model expects, and does the labelled column agree with its header?

Two groups, both giving plain-words reasons that end up in ``summary.csv`` (``qc`` = ``ok`` or
``review``, ``qc_reasons``):

- :func:`header_reasons`, before any heavy work, from the header alone: a physical extent far
  outside the training data's (a header whose spacing is in cm or m, a single slice);
- :func:`confidence_reasons`: a vertebra whose calibrated confidence (:mod:`spinelm.confidence`)
  is low;
- :func:`column_reasons`: a labelled column whose shape the training annotations do not allow (a
  skipped level, the neighbour distance of a missed or split vertebra, a sharp bend);
- :func:`orientation_reasons`, after labelling, from where the vertebrae were found: a column that
  runs across the header's cranio-caudal (S-I) axis (axes swapped in the header), label evidence
  that increases towards the head (S-I flipped), or no column at all;
- :func:`turned_over_reasons`, the turned-over comparison: the coarse stage labels the scan as
  stored and turned each way a header can lie about the head-foot axis; a turned orientation with
  clearly stronger heatmap peaks, or one the upright head finds clearly more upright, is reported
  with the fault it implies.

The orientation checks read the label evidence of every candidate *before* the anatomical ordering
(which always orders head to foot, so its output cannot show a flip): the expected level
coordinate of each candidate (:func:`spinelm.labels.level_coordinate` weighted by its label
probabilities) against its height in the body. No SimpleITK and no torch here.
"""
from __future__ import annotations

import numpy as np

from spinelm import labels as L

#: The column is "along S-I" when its main direction makes at most this angle (degrees) with the
#: header's S-I axis (spines curve, scans are oblique: 45 degrees separates along from across).
MAX_COLUMN_ANGLE_DEG = 45.0
#: Rank correlation between the candidates' expected levels and their height (S-I, head up) above
#: which the label evidence runs the wrong way (a flipped S-I axis). A correct column gives values
#: near -1.
MAX_LEVEL_HEIGHT_CORRELATION = 0.3
#: Fewest candidates for the orientation checks to say anything.
MIN_CANDIDATES = 3
#: A scan whose extent along some axis is this many times smaller or larger than the training
#: scans' range is flagged (spacing in the wrong unit, a single slice).
EXTENT_FACTOR = 4.0


def spearman(a, b) -> float:
    """Rank correlation of two equally long sequences (0 when either is constant)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))  # ties share their mean rank
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def expected_levels(label_probs: list[dict[int, float]]) -> np.ndarray:
    """Each candidate's expected level coordinate under its label probabilities."""
    out = []
    for p in label_probs:
        total = sum(p.values()) or 1.0
        out.append(sum(L.level_coordinate(lab) * v for lab, v in p.items()) / total)
    return np.asarray(out, dtype=float)


def column_angle_deg(world_mm: np.ndarray) -> float:
    """Angle between the main direction of points (first principal axis) and the S-I axis."""
    pts = np.asarray(world_mm, float).reshape(-1, 3)
    centred = pts - pts.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return float(np.degrees(np.arccos(min(abs(vt[0][2]), 1.0))))


def orientation_reasons(world_mm: np.ndarray, label_probs: list[dict[int, float]], kept: list[int],
                        level_order: bool = True) -> list[str]:
    """Reasons to review a labelled scan's orientation (empty when it looks right).

    ``world_mm``: every candidate's position (LPS, head = +z); ``label_probs``: their label evidence
    before ordering; ``kept``: the candidates the ordering labelled. ``level_order``: also check that
    the label evidence falls towards the feet. The predictor turns it off when the turned-over
    comparison ran: measured, it caught no flipped lumbar scan (0 of 14; the model labels an
    upside-down scan in the same order) and flagged 3 of 12 clean whole-spine phantoms of a poorly
    trained model.
    """
    world_mm = np.asarray(world_mm, float).reshape(-1, 3)
    if len(kept) < MIN_CANDIDATES:
        return [f"only {len(kept)} vertebra(e) found: no column (wrong orientation in the header, another body "
                "part, or a scan unlike the training data)"]
    reasons = []
    pts = world_mm[kept]
    angle = column_angle_deg(pts)
    if angle > MAX_COLUMN_ANGLE_DEG:
        axis = "LPS"[int(np.argmax(np.abs(np.linalg.svd(pts - pts.mean(0), full_matrices=False)[2][0])))]
        names = {"L": "left-right", "P": "front-back", "S": "head-foot"}
        reasons.append(f"the vertebrae line up {angle:.0f} degrees off the header's head-foot axis, along its "
                       f"{names[axis]} axis: image axes swapped in the header?")
    rho = spearman(expected_levels([label_probs[i] for i in kept]), pts[:, 2]) if level_order else -1.0
    if rho > MAX_LEVEL_HEIGHT_CORRELATION:
        reasons.append(f"the label evidence increases towards the head (rank correlation {rho:+.2f} with height; "
                       "a correct scan gives about -1): head-foot axis flipped in the header?")
    return reasons


def header_reasons(extent_mm, training_range: dict | None) -> list[str]:
    """Reasons to review a scan from its physical extent (mm per axis, any order) against the
    training scans' range (``plans["scan_extent_mm"]``: ``min`` and ``max`` per axis, axes sorted
    by size)."""
    if not training_range or "min" not in training_range:
        return []
    ext = np.sort(np.asarray(extent_mm, float))
    tmin, tmax = np.asarray(training_range["min"], float), np.asarray(training_range["max"], float)
    if np.all((ext >= tmin / EXTENT_FACTOR) & (ext <= tmax * EXTENT_FACTOR)):
        return []
    return [f"physical extent {' x '.join(f'{e:.0f}' for e in ext)} mm is far from the training scans' "
            f"({' x '.join(f'{a:.0f}-{b:.0f}' for a, b in zip(tmin, tmax))} mm): spacing in the wrong unit, or a "
            "single slice?"]


def confidence_reasons(landmarks, below: float | None = None) -> list[str]:
    """A reason to review when some vertebra's calibrated confidence is below ``below`` (default
    :data:`spinelm.confidence.REVIEW_BELOW`); none without confidences."""
    from spinelm.confidence import REVIEW_BELOW

    below = REVIEW_BELOW if below is None else below
    low = [f"{lm.name} {lm.confidence:.2f}" for lm in landmarks
           if lm.confidence is not None and lm.confidence < below]
    return [f"low confidence: {', '.join(low)}"] if low else []


# --------------------------------------------------------------------------------- column shape
#: The labelled column's shape is checked against what the training annotations allow (the
#: fingerprint's ``column_shape``, :func:`column_shape_statistics`):
#:
#: - the bend at each vertebra (angle between the segments to its two neighbours) must stay below
#:   ``BEND_FACTOR`` times the largest bend of the training centroids. Real lumbar MR (32 annotated
#:   scans) bends at most 24.7 degrees, whole-spine and Dixon phantoms 19-25 degrees; a centroid put
#:   on the posterior arch or on the sacrum bends the predicted column by 40-80 degrees;
#: - each neighbour distance, relative to the training mean of its level pair (and to the case's
#:   own median of these ratios when it has three or more pairs, which takes out body size), must
#:   stay between the training extremes and what a missed (x2) or split (x0.5) vertebra gives:
#:   the limit is the geometric midpoint of the two (:data:`MISSED_RATIO`);
#: - consecutive labels must be anatomical successors: a skipped level is a missed vertebra.
BEND_FACTOR = 1.5
MISSED_RATIO = 2.0
#: Fewest annotated triples (pairs) for a bend (distance) limit.
MIN_SHAPE_SAMPLES = 5


def _segments(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour distances and bend angles (degrees, at each inner point) of a polyline."""
    seg = np.diff(np.asarray(points, float).reshape(-1, 3), axis=0)
    dist = np.linalg.norm(seg, axis=1)
    if len(seg) < 2:
        return dist, np.zeros(0)
    unit = seg / np.maximum(dist, 1e-9)[:, None]
    cos = np.clip((unit[1:] * unit[:-1]).sum(1), -1.0, 1.0)
    return dist, np.degrees(np.arccos(cos))


def _runs(landmarks: dict[int, np.ndarray]) -> list[list[int]]:
    """The labels of one case cut into runs of anatomical successors (cranio-caudal order)."""
    from spinelm import labels as L

    runs: list[list[int]] = []
    for lab in L.sort_cranio_caudal(landmarks):
        if runs and lab in L.successors(runs[-1][-1]):
            runs[-1].append(lab)
        else:
            runs.append([lab])
    return runs


def relative_distances(landmarks: dict[int, np.ndarray], pair_means: dict[tuple[int, int], float]) -> dict:
    """``{(a, b): ratio}`` for consecutive labels with a training mean: the distance over that mean,
    divided by the case's median ratio when it has three or more such pairs."""
    ratios = {}
    for run in _runs(landmarks):
        for a, b in zip(run[:-1], run[1:]):
            if (a, b) in pair_means and pair_means[(a, b)] > 0:
                ratios[(a, b)] = float(np.linalg.norm(np.asarray(landmarks[b], float) - np.asarray(landmarks[a], float))
                                       / pair_means[(a, b)])
    if len(ratios) >= 3:
        med = float(np.median(list(ratios.values())))
        ratios = {k: v / med for k, v in ratios.items()}
    return ratios


def pair_means_from(consecutive_pairs: dict | None) -> dict[tuple[int, int], float]:
    """The fingerprint's (or plan's) ``consecutive_pairs`` as ``{(a, b): mean distance}``."""
    return {(int(p["from"]), int(p["to"])): float(p["distance_mm_mean"]) for p in (consecutive_pairs or {}).values()}


def column_shape_statistics(cases: list[dict[int, np.ndarray]], consecutive_pairs: dict) -> dict:
    """What the annotated columns of a training set look like (fingerprint ``spine.column_shape``):
    the largest bend at a vertebra and the range of relative neighbour distances
    (:func:`relative_distances`), over runs of anatomical successors, and the limits prediction
    checks against (:data:`BEND_FACTOR`, :data:`MISSED_RATIO`); a limit is None with fewer than
    :data:`MIN_SHAPE_SAMPLES` samples."""
    means = pair_means_from(consecutive_pairs)
    bends, rel = [], []
    for lms in cases:
        lms = {int(k): np.asarray(v, float) for k, v in lms.items()}
        for run in _runs(lms):
            if len(run) >= 3:
                bends += _segments(np.asarray([lms[x] for x in run]))[1].tolist()
        rel += list(relative_distances(lms, means).values())
    out = {"bend_deg_max": float(max(bends)) if bends else None, "bends": len(bends),
           "relative_distance": [float(min(rel)), float(max(rel))] if rel else None, "pairs": len(rel)}
    out["max_bend_deg"] = BEND_FACTOR * out["bend_deg_max"] if len(bends) >= MIN_SHAPE_SAMPLES else None
    out["distance_limits"] = ([float(np.sqrt(min(rel) / MISSED_RATIO)), float(np.sqrt(max(rel) * MISSED_RATIO))]
                              if len(rel) >= MIN_SHAPE_SAMPLES else None)
    return out


def column_reasons(landmarks, spine: dict | None) -> list[str]:
    """Reasons to review a labelled column whose shape the training annotations do not allow
    (:data:`BEND_FACTOR`): a skipped level, a neighbour distance of a missed or split vertebra, a
    sharp bend (a centroid off its vertebra). ``spine``: the plan's ``spine`` section (its
    ``column_shape`` and ``consecutive_pairs``); nothing is checked without ``column_shape``."""
    from spinelm import labels as L

    shape = (spine or {}).get("column_shape")
    if not shape or len(landmarks) < 2:
        return []
    lms = {int(lm.label): np.asarray(lm.position_mm, float) for lm in landmarks}
    reasons = []
    order = L.sort_cranio_caudal(lms)
    for a, b in zip(order[:-1], order[1:]):
        if b not in L.successors(a):
            between = L.regular_sequence(a, b)[1:-1]
            if between:
                reasons.append(f"no vertebra between {L.name_of(a)} and {L.name_of(b)}: "
                               f"{', '.join(map(L.name_of, between))} missed?")
    limits = shape.get("distance_limits")
    if limits:
        for (a, b), r in relative_distances(lms, pair_means_from(spine.get("consecutive_pairs"))).items():
            if r > limits[1]:
                reasons.append(f"{L.name_of(a)}-{L.name_of(b)} are {r:.2f} times as far apart as expected "
                               f"(training {shape['relative_distance'][1]:.2f} at most): a vertebra missed between them?")
            elif r < limits[0]:
                reasons.append(f"{L.name_of(a)}-{L.name_of(b)} are {r:.2f} times as far apart as expected "
                               f"(training {shape['relative_distance'][0]:.2f} at least): one vertebra split in two?")
    if shape.get("max_bend_deg"):
        for run in _runs(lms):
            if len(run) < 3:
                continue
            bends = _segments(np.asarray([lms[x] for x in run]))[1]
            for lab, angle in zip(run[1:-1], bends):
                if angle > shape["max_bend_deg"]:
                    reasons.append(f"the column bends {angle:.0f} degrees at {L.name_of(lab)} (training "
                                   f"{shape['bend_deg_max']:.0f} at most): a centroid off its vertebra?")
    return reasons

#: A run whose next vertebra beyond either end would sit at least this many of its steps (the
#: training annotations' mean offset between the two) inside the scan, where nothing was found, is a
#: reason to review: the scan shows that part of the column, so a vertebra there was missed. Measured on
#: stored predictions (labelled by the models of 20-minute float32 runs): on the 12 held-out Dixon
#: phantoms the six scans that missed C1 had its expected place 2.5-6.1 steps inside the scan (one
#: more whole-spine phantom, 1.6); on real lumbar MR (3 models x 32 scans) the expected place of the
#: vertebra beyond a correct run's end lay at most 0.43 of a step inside (T12 above an L1-L5 run,
#: where the top of the scan cuts through T12), and no correct whole-spine or classification phantom
#: (85 scans) reached 0.
END_MARGIN_STEPS = 1.0


def _inside_mm(world_mm: np.ndarray, geometry) -> float:
    """How far (mm) a world point lies inside the scan's voxel grid (negative: outside)."""
    index = geometry.world_to_index(world_mm)
    spacing = np.asarray(geometry.spacing, float)
    last = (np.asarray(geometry.size, float) - 1) * spacing
    return float(min((index * spacing).min(), (last - index * spacing).min()))


def end_reasons(landmarks, geometry, spine: dict | None) -> list[str]:
    """Reasons to review a labelled run that stops short of the scan's edge: the next vertebra beyond its
    top or bottom end (C1 above C2, the sacrum below L5, ...) would lie at least
    :data:`END_MARGIN_STEPS` steps inside the scan (``geometry``: the scan's canonical geometry) and
    nothing was found there. ``spine``: the plan's ``spine`` section, whose ``consecutive_pairs`` give
    the mean offset from each vertebra to the next (world LPS mm); nothing is checked without them."""
    from spinelm import labels as L

    offsets = {(int(p["from"]), int(p["to"])): (np.asarray(p["offset_mm_mean"], float), int(p.get("n", 0)))
               for p in ((spine or {}).get("consecutive_pairs") or {}).values() if p.get("offset_mm_mean")}
    if not offsets or not landmarks:
        return []
    lms = {int(lm.label): np.asarray(lm.position_mm, float) for lm in landmarks}
    order = L.sort_cranio_caudal(lms)
    reasons = []
    for end, above in ((order[0], True), (order[-1], False)):
        pairs = [(n, end) if above else (end, n) for n in (L.predecessors(end) if above else L.successors(end))]
        pairs = [p for p in pairs if p in offsets]
        if not pairs:
            continue
        pair = max(pairs, key=lambda p: offsets[p][1])  # the usual neighbour (e.g. S1 rather than L6 below L5)
        step = offsets[pair][0]
        where = lms[end] - step if above else lms[end] + step
        inside = _inside_mm(where, geometry)
        if inside >= END_MARGIN_STEPS * float(np.linalg.norm(step)) > 0:
            other = L.name_of(pair[0] if above else pair[1])
            reasons.append(f"the scan shows the column {'above' if above else 'below'} {L.name_of(end)} (where {other} "
                           f"would be, {inside:.0f} mm inside the field of view) but no vertebra was found there: "
                           f"{other} missed?")
    return reasons


#: A scan turned onto another axis (head-foot swapped with left-right or front-back) whose ordered
#: vertebrae's heatmap peaks sum to more than this many times the stored orientation's is reported:
#: the column lies across the header's head-foot axis. Measured (models of 20-min float32 runs; each
#: held-out scan as stored and with its header's head-foot axis swapped with either other axis or
#: flipped): on clean scans no swapped orientation reached 0.82 times the stored peaks (real lumbar
#: MR fold 0, 7 scans with two models; whole-spine phantoms, 24), while the scans with swapped axes
#: gave 1.36 times or more when turned back (62 scans). Flips are left to the upright head: their
#: peak sums differ from the stored ones by chance (0.6-1.7 times on whole-spine phantoms).
PEAK_RATIO = 1.1
#: A turned orientation that the upright head finds upright with a probability (mean over its
#: ordered vertebrae) at least this much higher than the stored one, with a larger upright-weighted
#: peak sum, is reported too: the scan is upside down. Measured on real lumbar MR: the head gave
#: 0.00-0.02 to the flipped scans and 1.00 to the same scans turned back. A head that learned no
#: orientation (whole-spine phantoms, whose vertebrae are nearly symmetric head to foot: 0.6-0.75
#: for every orientation) raises no flag, so a flip goes unnoticed there rather than flagging
#: clean scans.
UPRIGHT_GAIN = 0.5


#: The flip check each model learns on its own validation scans (:func:`fit_flip_check`, stored in
#: ``MODEL/orientation.json`` by ``spinelm calibrate`` and at the end of training). A metric of the
#: turned-over comparison joins it when, on every validation scan, the scan turned head over foot
#: scores clearly lower than as stored: the level head's mean probability of the assigned labels
#: (``level_p``) by at least the factor ``exp(-margin)``, the upright head's probability
#: (``upright``) by at least ``margin``. Prediction then reports a scan whose flipped orientation
#: scores higher than as stored on such a metric (the midpoint: a clean scan and its flip are mirror
#: images of each other in these measures). Measured (held-out whole-body Dixon phantoms, model of
#: a 20-min float32 run): clean scans turned over kept 0.56-0.90 of their ``level_p`` and lost
#: 0.07-0.22 of ``upright``; on whole-spine phantoms without a body around the column both went
#: either way (``level_p`` 0.33-2.7 times), so their models learn no flip check and flag no flip.
FLIP_METRICS = {"level_p": ("log_ratio", float(np.log(1 / 0.9))), "upright": ("difference", 0.05)}
#: A model's swap threshold is this times the largest swapped / stored peak ratio of its own
#: validation scans, when that exceeds :data:`PEAK_RATIO` (:func:`fit_flip_check`): a clean scan is
#: then flagged only when it looks more turned than every validation scan did, which happens to at
#: most one in (validation scans + 1) clean scans like them. Measured on real lumbar MR with models
#: trained 3 minutes per fold (float32): clean scans reached 0.37-1.37 times their stored peaks
#: when swapped, and 5 of 32 were flagged by :data:`PEAK_RATIO`; a 20-minute whole-spine phantom
#: model's reached 1.17.
SWAP_MARGIN = 1.0
#: Fewest validation scans for a flip check (and a swap threshold).
MIN_FLIP_CASES = 3
FLIP_CHECK_FILE = "orientation.json"


def flip_measure(metric: str, turned: dict, stored: dict) -> float | None:
    """How much more ``turned`` scores than ``stored`` on ``metric`` (:data:`FLIP_METRICS`): the log
    ratio or the difference; None when either row lacks the metric."""
    if metric not in turned or metric not in stored:
        return None
    if FLIP_METRICS[metric][0] == "log_ratio":
        return float(np.log(max(turned[metric], 1e-6) / max(stored[metric], 1e-6)))
    return float(turned[metric] - stored[metric])


def swap_ratio(rows: list[dict]) -> float | None:
    """The largest heatmap peak sum of a swapped orientation of the turned-over comparison relative to
    the scan as stored (``rows``: :meth:`spinelm.inference.Predictor.turned_over`, ``stored`` first);
    None without swapped rows."""
    if not rows or rows[0]["key"] != "stored":
        return None
    ratios = [r["peak_sum"] / max(rows[0]["peak_sum"], 1e-6) for r in rows[1:] if r["key"].startswith("swap")]
    return float(max(ratios)) if ratios else None


def fit_flip_check(pairs: list[tuple[dict, dict]], swap_ratios: list[float] | None = None) -> dict:
    """The orientation checks of a model from its validation scans (their headers are right).

    Flips: ``pairs`` of ``(stored row, flipped row)`` of the turned-over comparison. A metric is
    ``enabled`` when its :func:`flip_measure` is at most ``-margin`` on every scan
    (:data:`FLIP_METRICS`); ``worst`` is the highest measure seen.

    Swaps: ``swap_ratios``, each scan's :func:`swap_ratio`. A scan is reported when a swapped
    orientation has more than ``peak_ratio`` times its stored peaks: :data:`PEAK_RATIO`, or
    :data:`SWAP_MARGIN` times the highest ratio of a validation scan when that is higher (a model
    early in training can find a clean scan's swapped orientation as spine-like as the stored one).
    """
    metrics = {}
    for metric, (kind, margin) in FLIP_METRICS.items():
        values = [v for v in (flip_measure(metric, f, s) for s, f in pairs) if v is not None]
        worst = max(values) if values else None
        metrics[metric] = {"kind": kind, "margin": margin, "cases": len(values), "worst": worst,
                           "enabled": bool(len(values) >= MIN_FLIP_CASES and worst <= -margin)}
    out = {"format": "spinelm-orientation", "version": 1, "cases": len(pairs), "metrics": metrics}
    ratios = [r for r in (swap_ratios or []) if r is not None]
    if len(ratios) >= MIN_FLIP_CASES:
        out["swap"] = {"cases": len(ratios), "worst": max(ratios),
                       "peak_ratio": max(PEAK_RATIO, SWAP_MARGIN * max(ratios))}
    return out


def describe_flip_check(check: dict | None) -> str:
    """One line on what a model's flip check (:func:`fit_flip_check`) learned."""
    if not check:
        return "no flip check (no coarse stage, or not calibrated): a header that flips the head-foot axis is " \
               "caught only by the upright head's fixed rule"
    words = {"level_p": "level probability", "upright": "upright probability"}
    on = [m for m, spec in check["metrics"].items() if spec["enabled"]]

    def worst(m):
        spec = check["metrics"][m]
        if spec["worst"] is None:
            return f"{words.get(m, m)} not measured"
        v = spec["worst"]
        return (f"{words.get(m, m)} {np.exp(v):.2f}x" if spec["kind"] == "log_ratio" else f"{words.get(m, m)} {v:+.2f}")
    seen = ", ".join(worst(m) for m in check["metrics"])
    swap = check.get("swap")
    swap_words = (f"; swapped axes reported above {swap['peak_ratio']:.2f}x the stored heatmap peaks (validation scans "
                  f"swapped reached {swap['worst']:.2f}x)") if swap else ""
    if not on:
        return (f"no flip check learned: on {check['cases']} validation scans turned head over foot the coarse stage "
                f"did not score clearly lower than as stored (at worst: {seen}); a flipped header is caught only by "
                "the upright head's fixed rule" + swap_words)
    return (f"flip check learned on {check['cases']} validation scans: {', '.join(words.get(m, m) for m in on)} "
            f"(turned head over foot, at worst: {seen} of as stored); a scan that scores higher flipped is reported"
            + swap_words)


def load_flip_check(model_dir) -> dict | None:
    """The model's flip check (:data:`FLIP_CHECK_FILE`), or None when it has none; an unreadable or
    foreign file is ignored with a warning naming it (as ``calibration.json`` is)."""
    from pathlib import Path

    from spinelm.io.files import read_model_file

    def problem(doc: dict) -> str | None:
        ok = doc.get("format") == "spinelm-orientation" and isinstance(doc.get("metrics"), dict)
        return None if ok else "not a spinelm flip check"

    return read_model_file(Path(model_dir) / FLIP_CHECK_FILE, problem, "no flip check")


def turned_over_reasons(rows: list[dict], peak_ratio: float | None = None,
                        upright_gain: float | None = None, flip_check: dict | None = None) -> list[str]:
    """A reason to review when the scan looks more like a spine to the model turned over than as
    stored (``rows``: :meth:`spinelm.inference.Predictor.turned_over`, ``stored`` first): a swapped
    orientation with :data:`PEAK_RATIO` times the peaks, any turned one that the upright head finds
    :data:`UPRIGHT_GAIN` more upright (models without an upright head: swaps only), or the flipped one
    scoring higher than as stored on a metric of the model's ``flip_check`` (:func:`fit_flip_check`).
    The swap ratio is the model's own (``flip_check["swap"]``) when it learned one."""
    if peak_ratio is None:
        peak_ratio = float((flip_check or {}).get("swap", {}).get("peak_ratio", PEAK_RATIO))
    upright_gain = UPRIGHT_GAIN if upright_gain is None else upright_gain
    if not rows or rows[0]["key"] != "stored" or len(rows) < 2:
        return []
    stored = rows[0]
    learned = [m for m, spec in (flip_check or {}).get("metrics", {}).items()
               if spec.get("enabled") and m in FLIP_METRICS]

    def why(r):
        if r["key"].startswith("swap") and r["peak_sum"] > peak_ratio * stored["peak_sum"]:
            return f"heatmap peaks {r['peak_sum']:.2f} against {stored['peak_sum']:.2f} as stored"
        if "upright" in r and "upright" in stored and r["upright"] >= stored["upright"] + upright_gain \
                and r["upright_sum"] > stored["upright_sum"]:
            return f"upright {r['upright']:.2f} against {stored['upright']:.2f} as stored"
        if r["key"] == "flip":
            for m in learned:
                v = flip_measure(m, r, stored)
                if v is not None and v > 0:
                    return f"{m} {r[m]:.2f} against {stored[m]:.2f} as stored (the model's learned flip check)"
        return None

    found = [(r, why(r)) for r in rows[1:]]
    found = [(r, w) for r, w in found if w]
    if not found:
        return []
    best, w = max(found, key=lambda f: f[0].get("upright_sum", f[0]["peak_sum"]))
    return [f"the scan looks more like a spine turned over ({best['name']}: {best['n']} vertebrae, {w}): "
            f"{best['name']} in the header?"]
