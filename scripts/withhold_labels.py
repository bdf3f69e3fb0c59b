#!/usr/bin/env python3
"""Turn a labelled dataset into "N labelled + the rest unlabelled" for one cross-validation fold.

The fold's validation cases keep their labels; N of its training cases (drawn with --seed) keep
theirs; the other training cases go to imagesUnlabelled/ without labels. splits.json fixes the
fold, so that supervised and semi-supervised rows validate on the same scans. Files are symlinked
(--copy to copy them). Example (real lumbar MR, fold 0, 4 labelled scans):

    python scripts/withhold_labels.py ../shared/data/lumbar-mr /tmp/LUMBAR4 --labelled 4 --fold 0
    spinelm plan-and-train /tmp/LUMBAR4 -o M4semi --device cpu --time-budget 20 --precision fp32
    spinelm plan-and-train /tmp/LUMBAR4 -o M4 --device cpu --time-budget 20 --precision fp32 --no-unlabelled
"""
import argparse
import sys

from spinelm.semisupervised import withhold_labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="labelled dataset folder (nnU-Net v2 raw layout)")
    ap.add_argument("out", help="new dataset folder (must not exist or be empty)")
    ap.add_argument("--labelled", type=int, required=True, help="training cases that keep their labels")
    ap.add_argument("--fold", type=int, default=0, help="cross-validation fold (default 0)")
    ap.add_argument("--folds", type=int, default=5, help="number of folds, as spinelm plans them (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="which cases keep their labels (default 0)")
    ap.add_argument("--choose", choices=("random", "diverse"), default="random",
                    help="random: drawn with --seed (default); diverse: scans that cover the training scans' "
                         "spacing, extent and intensity (greedy k-centre), so that a few labels do not all "
                         "come from one scanner or protocol")
    ap.add_argument("--copy", action="store_true", help="copy the files instead of symlinking them")
    args = ap.parse_args(argv)
    try:
        rec = withhold_labels(args.source, args.out, args.labelled, args.fold, args.folds, args.seed,
                              symlink=not args.copy, choose=args.choose)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(rec['labelled'])} labelled training case(s) ({', '.join(rec['labelled'])}), "
          f"{len(rec['validation'])} validation case(s) of fold {rec['fold']}, "
          f"{len(rec['withheld'])} withheld into imagesUnlabelled/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
