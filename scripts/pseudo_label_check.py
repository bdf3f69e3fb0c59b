"""How right are the pseudo-labels the acceptance rule keeps? Labels the withheld scans of a
``withhold_labels.py`` dataset with a trained model (fold 0), applies the rule of self-training
(:func:`spinelm.semisupervised.accept`) and scores every accepted scan against its withheld truth.

    python scripts/pseudo_label_check.py MODEL_DIR DATASET SOURCE

MODEL_DIR: a model trained on DATASET (e.g. the supervised-on-N row of ``semi_ablation.py``);
DATASET: the withheld-label dataset; SOURCE: the labelled original (its ``centroidsTr``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from spinelm.evaluation import identification
    from spinelm.inference import Predictor
    from spinelm.plans import ModelFolder
    from spinelm.preprocessing import preprocess_dataset
    from spinelm.semisupervised import pseudo_label

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("source")
    args = p.parse_args(argv)
    model = ModelFolder(args.model)
    for stage in model.plans.stages:
        preprocess_dataset(args.dataset, model.root, model.plans, stage, 1, False, unlabelled=True)
    predictor = Predictor.from_model_folder(model.root, [0])
    out = Path(tempfile.mkdtemp())
    res = pseudo_label(predictor, model.unlabelled_cache_dir("fine"), out, model.plans,
                       model.unlabelled_cache_dir("coarse") if model.plans.has_coarse else None, prefix="p__")
    print(f"accepted {len(res['accepted'])} of {res['scans']}")
    for case, why in sorted(res["rejected"].items()):
        print(f"rejected {case}: {'; '.join(why)}")
    right = 0
    for name in res["accepted"]:
        case = name[len("p__"):]
        props = json.loads((out / f"{name}.json").read_text())
        truth = json.loads((Path(args.source) / "centroidsTr" / f"{case}.json").read_text())["vertebrae"]
        r = identification({lm["label"]: np.asarray(lm["position_mm"]) for lm in props["landmarks"]},
                           {v["label"]: np.asarray(v["position_mm"]) for v in truth})
        right += len(r["identified"]) == r["n_gt"] and not r["false_positive"]
        print(f"accepted {case}: {len(r['identified'])}/{r['n_gt']} identified, level shift {r['level_shift']}, "
              f"false labels {r['false_positive']}")
    print(f"fully right: {right} of {len(res['accepted'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
