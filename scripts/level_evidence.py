"""How much does each source of label evidence know about a vertebra's level? At every annotated
centre of a held-out dataset, reads the coarse stage's segmentation label probabilities (averaged in
the ball prediction uses) and, when the model has one, its level head's probabilities, and reports
top-1 accuracy, region accuracy (cervical/thoracic/lumbar/sacral) and the mean probability of the
true level. Uniform over 26 labels, that probability is 0.04.

    python scripts/level_evidence.py MODEL_DIR HELD_OUT [--fold 0]

MODEL_DIR: a trained model with a coarse stage; HELD_OUT: a dataset folder with ``imagesTr`` and
``centroidsTr`` (e.g. ``spinelm synth WSV --n 12 --seed 23``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import torch

    from spinelm import labels as L
    from spinelm.inference import Frame, Predictor, coarse_label_probs
    from spinelm.io.landmarks import read_landmarks
    from spinelm.io.scan import collect_inputs, read_scan
    from spinelm.nnunet import run_preprocessor

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("held_out")
    p.add_argument("--fold", type=int, default=0)
    a = p.parse_args(argv)
    pr = Predictor.from_model_folder(a.model, folds=[a.fold])
    plans = pr.plans
    if not pr.coarse_networks:
        print(f"{a.model}: the model has no coarse stage", file=sys.stderr)
        return 2
    labels = list(plans.heads["segmentation"].labels)
    spacing = np.asarray(plans.configuration("coarse").spacing)
    held = Path(a.held_out)
    stats = {"segmentation": [], "level head": []}
    for scan in collect_inputs(held / "imagesTr", plans.n_channels):
        if scan.error:
            continue
        image, geom, _ = read_scan(scan.paths)
        gt = read_landmarks(held / "centroidsTr" / f"{scan.case_id}.json", geom)
        if not gt:
            continue
        data, _, info = run_preprocessor(image, geom.array_spacing, plans, "coarse")
        frame = Frame.from_info(geom, plans.transpose_forward, info)
        world = np.asarray([lm.position_mm for lm in gt])
        with torch.no_grad():
            out = pr.network_outputs(torch.as_tensor(np.asarray(data)), "coarse")
        sources = {"segmentation": coarse_label_probs(world, out, frame, spacing, labels, plans.distance_mm)}
        reader = pr.level_reader(None, None, (data, frame))
        if reader:
            sources["level head"] = reader(world)
        for name, probs in sources.items():
            for lm, pp in zip(gt, probs):
                best = max(pp, key=pp.get)
                stats[name].append((best == lm.label, L.region_of(best) == L.region_of(lm.label), pp.get(lm.label, 0.0)))
        print(f"{scan.case_id}: " + "; ".join(f"{n} p(true) {np.mean([pp.get(lm.label, 0) for lm, pp in zip(gt, pr_)]):.2f}"
                                            for n, pr_ in sources.items()), flush=True)
    report = {}
    for name, rows in stats.items():
        if rows:
            r = np.asarray(rows, dtype=float)
            report[name] = {"vertebrae": len(rows), "top1": round(float(r[:, 0].mean()), 3),
                            "region": round(float(r[:, 1].mean()), 3), "mean_p_true": round(float(r[:, 2].mean()), 3)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
