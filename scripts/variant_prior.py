"""Re-label a held-out set with another prior for the transitional vertebrae (T13, L6) in the ordering.

The ordering charges the log of a prior for each transitional vertebra on a labelled path
(``spinelm.ordering``: counted from the training labels by the planner, at least 0.05). This script labels HELD_OUT's scans with MODEL exactly as
``spinelm predict`` does, except that the ordering's prior is ``--prior``; then score OUT with
``spinelm evaluate OUT HELD_OUT --all-gt`` and compare with the same model's ``spinelm predict`` run.
It measures what another prior would change, e.g. for a model planned before the planner counted them.

    python scripts/variant_prior.py MODEL HELD_OUT/imagesTr OUT --prior 0.08 [--folds 0] [--device cpu]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("images", help="a folder of scans (e.g. HELD_OUT/imagesTr)")
    p.add_argument("out")
    p.add_argument("--prior", type=float, required=True, help="probability of each transitional vertebra")
    p.add_argument("--folds", default=None, help="comma list (default: every trained fold)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not 0.0 < args.prior < 1.0:
        p.error(f"--prior must lie between 0 and 1, got {args.prior}")

    import spinelm.ordering as ordering
    from spinelm.inference import Predictor
    from spinelm.predict import predict_directory

    from_stats = ordering.SpineModel.from_stats.__func__

    def with_prior(cls, *a, **k):
        return dataclasses.replace(from_stats(cls, *a, **k), variant_prior=args.prior, variant_priors={})

    ordering.SpineModel.from_stats = classmethod(with_prior)  # every ordering of this run uses the prior
    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    predictor = Predictor.from_model_folder(args.model, folds=folds, device=args.device)
    report = predict_directory(args.images, args.out, predictor, progress=True)
    print(f"{report.done} labelled with a transitional-vertebra prior of {args.prior:g}, {len(report.failed)} failed; "
          f"score with: spinelm evaluate {args.out} HELD_OUT --all-gt")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
