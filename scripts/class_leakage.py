"""How much a vertebra's class probabilities change when everything outside its own (dilated) mask
changes: the measured leakage figure of the classification head.

For every annotated vertebra of a labelled dataset folder (e.g. held-out phantoms), the scan is
preprocessed with the model's plan and its ground-truth mask, and the vertebra is classified
(:class:`spinelm.classification.Classifier`) twice: as stored, and with every voxel outside the
vertebra's mask dilated by the plan's margin replaced (by another draw of noise at the image's own
intensity spread, with an added offset: a bright neighbour, the pelvis, anything). The same is done
with an unmasked variant of the same head: the same crop and weights with nothing blanked. Prints
the largest and the mean absolute change of any class probability for both.

    python scripts/class_leakage.py MODEL_DIR DATASET [--cases N] [--fold 0] [--out leakage.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("dataset", help="labelled dataset folder (imagesTr/, labelsTr/)")
    p.add_argument("--cases", type=int, default=10, help="at most this many cases (default 10)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)

    from scipy import ndimage

    from spinelm.classification import Classifier, vertebra_crop
    from spinelm.dataset import discover_dataset
    from spinelm.inference import load_network
    from spinelm.plans import ModelFolder
    from spinelm.preprocessing import preprocess_case

    model = ModelFolder(args.model)
    plans = model.plans
    if plans.classification is None:
        print(f"{args.model}: the model has no classification head", file=sys.stderr)
        return 1
    net = load_network(model, args.fold)
    clf = Classifier.from_plans([net], plans)
    seg_labels = np.asarray([0, *plans.heads["segmentation"].labels], np.int16)
    rng = np.random.default_rng(args.seed)
    masked, unmasked = [], []
    cases = [c for c in discover_dataset(args.dataset).cases if c.mask is not None][: args.cases]
    for case in cases:
        data, seg, _ = preprocess_case(case, plans.raw, "fine")
        known = (seg[0] > 0) & (seg[0] < len(seg_labels))  # a partial mask's ignored voxels are no vertebra
        inst = np.where(known, seg_labels[np.clip(seg[0], 0, len(seg_labels) - 1)], 0)
        for lab in [int(v) for v in np.unique(inst) if v > 0]:
            own = inst == lab
            keep = ndimage.binary_dilation(own, structure=clf.structure)
            changed = data.copy()
            noise = rng.normal(data.mean() + 2.0, data.std() + 1e-6, size=(data.shape[0], int((~keep).sum())))
            changed[:, ~keep] = noise
            for struct, sink in ((clf.structure, masked), (None, unmasked)):
                a = vertebra_crop(data, own, clf.crop_size, struct, clf.outside)
                b = vertebra_crop(changed, own, clf.crop_size, struct, clf.outside)
                pa, pb = clf.probabilities(np.stack([a, b]))
                sink.append(float(np.abs(pa - pb).max()))
        print(f"{case.case_id}: {len(masked)} vertebrae so far; masked max {max(masked):.2e}, unmasked max "
              f"{max(unmasked):.3f}", flush=True)
    result = {"model": str(Path(args.model).resolve()), "dataset": str(Path(args.dataset).resolve()),
              "n_vertebrae": len(masked), "margin_mm": plans.classification.get("margin_mm"),
              "masked": {"max": max(masked), "mean": float(np.mean(masked))},
              "unmasked_variant": {"max": max(unmasked), "mean": float(np.mean(unmasked))}}
    print(f"{len(masked)} vertebrae of {len(cases)} case(s): largest change of a class probability when everything "
          f"outside the vertebra's mask (dilated {result['margin_mm']} mm) is replaced: {result['masked']['max']:.2e} "
          f"(mean {result['masked']['mean']:.2e}); the same head without the mask: "
          f"{result['unmasked_variant']['max']:.3f} (mean {result['unmasked_variant']['mean']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
