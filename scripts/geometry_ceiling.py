"""What can the column's geometry alone tell about the levels? Orders the *annotated* centres of a
held-out set (perfect detection) with flat label evidence (no image), under the ordering model built
from a training set's annotated centres, with and without the step directions:

- ``distances``: the fingerprint's distances between consecutive vertebrae, field-of-view and
  variant priors (the ordering before step directions);
- ``distances + directions``: the same plus the tilt of every step in the patient frame
  (:func:`spinelm.ordering.tilt_evidence`).

A run is placed right when every centre gets its own label. Nothing is trained or predicted: it
takes seconds, and it bounds what the ordering adds to a model whose label evidence says nothing.

    python scripts/geometry_ceiling.py TRAIN HELD_OUT [HELD_OUT ...]

TRAIN and HELD_OUT: dataset folders with ``centroidsTr`` (e.g. from ``spinelm synth``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def centres(dataset) -> dict[str, dict[int, np.ndarray]]:
    from spinelm.io import read_landmarks

    return {p.stem: {lm.label: np.asarray(lm.position_mm, float) for lm in read_landmarks(p)}
            for p in sorted(Path(dataset, "centroidsTr").glob("*.json"))}


def spine_statistics(train: dict[str, dict[int, np.ndarray]]) -> dict:
    """The ``spine`` statistics the fingerprint would give these centres."""
    from spinelm import labels as L
    from spinelm.fingerprint import _pair_statistics

    per_case = [{"landmarks": {k: v.tolist() for k, v in lms.items()}} for lms in train.values()]
    firsts, lasts = {}, {}
    for lms in train.values():
        order = L.sort_cranio_caudal(set(lms))
        firsts[L.name_of(order[0])] = firsts.get(L.name_of(order[0]), 0) + 1
        lasts[L.name_of(order[-1])] = lasts.get(L.name_of(order[-1]), 0) + 1
    return {"consecutive_pairs": _pair_statistics(per_case), "first_label_counts": firsts, "last_label_counts": lasts}


def place(lms: dict[int, np.ndarray], model, distance_mm: float) -> bool:
    from spinelm import labels as L
    from spinelm.ordering import order_candidates, sequence_labels

    labels = L.sort_cranio_caudal(set(lms))
    pos = np.asarray([lms[lab] for lab in labels])
    flat = {lab: 1.0 for lab in sequence_labels()}
    got = [lab for _, lab in order_candidates(pos, [0.9] * len(pos), [flat] * len(pos), cc_axis=2,
                                              distance_mm=distance_mm, model=model)]
    return got == labels


def main(argv=None) -> int:
    from spinelm.ordering import SpineModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train")
    p.add_argument("held_out", nargs="+")
    args = p.parse_args(argv)
    spine = spine_statistics(centres(args.train))
    blind = {**spine, "consecutive_pairs": {
        k: {x: v[x] for x in v if not x.startswith("offset")} for k, v in spine["consecutive_pairs"].items()}}
    distance = float(np.median([v["distance_mm_mean"] for v in spine["consecutive_pairs"].values()]))
    models = {"distances": SpineModel.from_stats(blind), "distances + directions": SpineModel.from_stats(spine)}
    for held in args.held_out:
        cases = centres(held)
        for name, model in models.items():
            right = [case for case, lms in cases.items() if place(lms, model, distance)]
            print(f"{held}: {name}: {len(right)} of {len(cases)} runs placed right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
