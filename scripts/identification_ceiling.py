"""How far could identification go on a held-out set, and what limits it? Labels every scan with
the model, then re-runs only the anatomical ordering on the same candidates under these readings:

- ``model``: the candidates and label evidence as prediction has them (what ``spinelm evaluate``
  scores);
- ``true peaks``: only the candidates within ``--radius`` mm of an annotated centre (perfect
  detection), label evidence unchanged;
- ``true peaks + region``: the same, with every candidate's label evidence restricted to the labels
  of its true region (cervical, thoracic, lumbar, sacral) and renormalised: the model's own evidence
  within a region, never a wrong region;
- ``true peaks + region only``: the label evidence replaced by a uniform share over the labels of
  the true region: a head that knows each vertebra's region perfectly and nothing finer.

- ``true peaks, geometry only``: the true peaks where the network put them, with flat label evidence
  (the same probability for every label): what the column's distances and step directions alone
  make of the detected positions;
- ``annotated centres, geometry only``: the same vertebrae moved to their annotated centres, flat
  label evidence: what the geometry could do with perfect localisation.

The fourth row is what counting from region boundaries alone gives: a run that shows no boundary
(e.g. T3-T9 only) can be placed only by finer cues (sizes, spacings), so it stays ambiguous there.
The last two tell localisation noise from what the geometry cannot know.

    python scripts/identification_ceiling.py MODEL_DIR HELD_OUT [--fold 0] [--radius 10]

MODEL_DIR: a trained model; HELD_OUT: a dataset folder with ``imagesTr`` and ``centroidsTr``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def region_evidence(label: int, probs: dict[int, float] | None = None) -> dict[int, float]:
    """``probs`` restricted to the labels of ``label``'s region (variants included) and renormalised;
    uniform over that region without ``probs`` (or when they give it nothing)."""
    from spinelm import labels as L
    from spinelm.ordering import sequence_labels

    same = [lab for lab in sequence_labels() if L.region_of(lab) == L.region_of(label)]
    weights = np.asarray([max((probs or {}).get(lab, 0.0), 0.0) for lab in same])
    if weights.sum() <= 0:
        weights = np.ones(len(same))
    return {lab: float(w) for lab, w in zip(same, weights / weights.sum())}


def main(argv=None) -> int:
    from spinelm import labels as L
    from spinelm.evaluation import identification, summarise
    from spinelm.inference import Predictor
    from spinelm.io.landmarks import as_dict, read_landmarks
    from spinelm.io.scan import collect_inputs, read_scan
    from spinelm.ordering import order_candidates

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("held_out")
    p.add_argument("--fold", type=int, default=None, help="one fold's network (default: all trained folds)")
    p.add_argument("--radius", type=float, default=10.0, help="a candidate this close (mm) to an annotated "
                   "centre counts as a true peak (default 10)")
    a = p.parse_args(argv)
    pr = Predictor.from_model_folder(a.model, folds=None if a.fold is None else [a.fold])
    plans = pr.plans
    held = Path(a.held_out)
    rows = {"model": [], "true peaks": [], "true peaks + region": [], "true peaks + region only": [],
            "true peaks, geometry only": [], "annotated centres, geometry only": []}
    flat = {lab: 1.0 / len(plans.known_labels) for lab in plans.known_labels}
    for scan in collect_inputs(held / "imagesTr", plans.n_channels):
        if scan.error:
            print(f"{scan.case_id}: skipped ({scan.error})", file=sys.stderr)
            continue
        image, geom, _ = read_scan(scan.paths)
        gt = as_dict(read_landmarks(held / "centroidsTr" / f"{scan.case_id}.json", geom))
        if not gt:
            continue
        lab = pr.predict_array(image, geom, str(scan.paths[0])).labelled
        world = lab.candidate_world_mm.reshape(-1, 3)
        gt_labels = list(gt)
        gt_pos = np.asarray([gt[k] for k in gt_labels])
        nearest = [int(np.argmin(np.linalg.norm(gt_pos - w, axis=1))) for w in world]
        true = [i for i, w in enumerate(world) if np.linalg.norm(gt_pos[nearest[i]] - w) <= a.radius]
        readings = {
            "model": (list(range(len(world))), [c.label_probs for c in lab.candidates]),
            "true peaks": (true, [lab.candidates[i].label_probs for i in true]),
            "true peaks + region": (true, [region_evidence(gt_labels[nearest[i]], lab.candidates[i].label_probs)
                                           for i in true]),
            "true peaks + region only": (true, [region_evidence(gt_labels[nearest[i]]) for i in true]),
            "true peaks, geometry only": (true, [flat] * len(true)),
            "annotated centres, geometry only": (true, [flat] * len(true)),
        }
        at_centres = world.copy()
        at_centres[true] = gt_pos[[nearest[i] for i in true]]
        line = [scan.case_id, "-".join(L.name_of(k) for k in (gt_labels[0], gt_labels[-1]))]
        for name, (idx, probs) in readings.items():
            where = at_centres if name.startswith("annotated") else world
            ordered = order_candidates(where[idx], [lab.candidates[i].score for i in idx], probs, cc_axis=2,
                                       distance_mm=plans.distance_mm, superior_is_positive=True,
                                       allowed=plans.known_labels, model=plans.spine_model()) if idx else []
            pred = {label: where[idx[j]] for j, label in ordered}
            res = identification(pred, gt)
            rows[name].append(res)
            line.append(f"{name}: {len(res['identified'])}/{res['n_gt']}")
        print("  ".join(line), flush=True)
    print(f"\n{'reading':34s} {'id rate':>8s} {'shifted':>8s}  by region")
    for name, res in rows.items():
        s = summarise(res)
        regions = ", ".join(f"{k} {v['id_rate']:.2f}" for k, v in s["by_region"].items())
        print(f"{name:34s} {s['id_rate']:8.3f} {s['n_cases_level_shifted']:>4d}/{s['n_cases']:<3d}  {regions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
