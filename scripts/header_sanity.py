"""How often the orientation check catches a corrupted header, and how often it alarms on clean scans.

For every scan of a labelled dataset folder (held-out cases: ``imagesTr/``) the scan is labelled
four times by a trained model: as stored, with the header's head-foot axis swapped with its
left-right axis, swapped with its front-back axis, and with the head-foot axis flipped (the voxels
untouched, only the direction matrix corrupted, as a broken conversion writes it). Each run's QC
reasons (:mod:`spinelm.sanity`) are recorded; a corrupted scan counts as caught when it gets any.

    python scripts/header_sanity.py MODEL_DIR HELD_OUT [--folds 0] [--out results.json] [--device cpu]
    python scripts/header_sanity.py MODEL_DIR HELD_OUT --rescore results.json
    python scripts/header_sanity.py MODEL_DIR HELD_OUT --turned-only   # the coarse comparison alone

``--turned-only`` runs only the turned-over comparison (the model's coarse stage on the scan as
stored and turned five ways), not the whole prediction: seconds instead of minutes per whole-body
scan; only the "turned-over comparison" line is then meaningful.

HELD_OUT: a dataset folder (``imagesTr/``) or a folder of ``CASE_0000.nii.gz`` files.

Prints one line per scan and variant and the caught / false-alarm shares: for any QC reason, for
the orientation reasons alone (all but low confidence), and for the turned-over comparison alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

VARIANTS = ("clean", "swap_si_lr", "swap_si_ap", "flip_si")


def corrupt(image, variant: str):
    """A copy of a SimpleITK image whose direction matrix lies in the way ``variant`` says."""
    out = image.__class__(image)
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    si = int(np.argmax(np.abs(d[2])))  # grid axis closest to head-foot
    if variant == "flip_si":
        d[:, si] = -d[:, si]
    elif variant.startswith("swap"):
        other = int(np.argmax(np.abs(d[0 if variant == "swap_si_lr" else 1])))
        if other == si:
            other = [a for a in range(3) if a != si][0]
        d[:, [si, other]] = d[:, [other, si]]
    out.SetDirection(tuple(d.ravel()))
    return out


def summarise(rows: list[dict], flip_check: dict | None = None) -> dict:
    """Print and return the caught / false-alarm counts: any QC reason, the orientation reasons only
    (every reason but low confidence), and the turned-over comparison alone (its current rule,
    re-applied to the recorded evidence, with the model's learned ``flip_check``)."""
    from spinelm.sanity import turned_over_reasons

    turned_prefix = "the scan looks more like a spine turned over"
    level_prefix = "the label evidence increases towards the head"
    for r in rows:  # the current rule of the turned-over comparison, on the recorded evidence
        if r.get("turned"):
            r["reasons"] = [x for x in r["reasons"] if not x.startswith((turned_prefix, level_prefix))] + \
                turned_over_reasons(r["turned"], flip_check=flip_check)
    kinds = {
        "any QC reason": lambda r: bool(r["reasons"]),
        "orientation reasons": lambda r: any(not x.startswith("low confidence") for x in r["reasons"]),
        "turned-over comparison": lambda r: bool(turned_over_reasons(r.get("turned") or [], flip_check=flip_check)),
    }
    summary = {}
    for kind, flagged in kinds.items():
        per = {v: [flagged(r) for r in rows if r["variant"] == v] for v in VARIANTS}
        caught = sum(sum(per[v]) for v in VARIANTS[1:])
        n_bad = sum(len(per[v]) for v in VARIANTS[1:])
        print(f"{kind}: corrupted headers caught {caught}/{n_bad} ({100 * caught / max(n_bad, 1):.0f}%), false alarms "
              f"on clean scans {sum(per['clean'])}/{len(per['clean'])}; "
              + ", ".join(f"{v} {sum(per[v])}/{len(per[v])}" for v in VARIANTS))
        summary[kind] = {v: {"cases": len(per[v]), "flagged": int(sum(per[v]))} for v in VARIANTS}
    if any(r.get("turned") for r in rows):
        print("turned-over comparison under each evidence it records (flagged when a turned orientation beats "
              "the stored one):")
        first = next(r["turned"] for r in rows if r.get("turned"))
        for metric in [k for k in first[0] if k not in ("key", "name")]:
            flagged = {v: 0 for v in VARIANTS}
            for r in rows:
                if r.get("turned"):
                    stored = r["turned"][0][metric]
                    flagged[r["variant"]] += any(t[metric] > stored for t in r["turned"][1:])
            print(f"  {metric:11s} " + "  ".join(f"{v} {flagged[v]}/{summary['any QC reason'][v]['cases']}"
                                                for v in VARIANTS))
    return summary


def main(argv=None) -> int:
    import SimpleITK as sitk
    from tqdm import tqdm

    from spinelm.inference import Predictor
    from spinelm.io.image import Geometry, to_canonical

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("dataset")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--folds", default=None, help="folds to use, e.g. 0 (default: every trained fold)")
    ap.add_argument("--rescore", default=None, metavar="RESULTS_JSON",
                    help="re-apply the current rules to a results file of an earlier run (no model is run)")
    ap.add_argument("--turned-only", action="store_true",
                    help="run only the turned-over comparison (the coarse stage), not the whole prediction")
    args = ap.parse_args(argv)
    from spinelm.sanity import describe_flip_check, load_flip_check

    flip_check = load_flip_check(args.model)
    print(f"{args.model}: {describe_flip_check(flip_check)}")
    if args.rescore:
        summarise(json.loads(Path(args.rescore).read_text())["rows"], flip_check)
        return 0
    folds = None if args.folds is None else [int(f) for f in args.folds.split(",")]
    predictor = Predictor.from_model_folder(args.model, folds=folds, device=args.device)
    root = Path(args.dataset)
    files = sorted((root / "imagesTr").glob("*_0000.nii.gz")) or sorted(root.glob("*_0000.nii.gz"))
    rows = []
    for f in tqdm(files, desc="cases", unit="case"):
        case = f.name[:-len("_0000.nii.gz")]
        channels = sorted(f.parent.glob(f"{case}_0*.nii.gz"))
        images = [sitk.ReadImage(str(p)) for p in channels]
        for variant in VARIANTS:
            canon = [to_canonical(corrupt(im, variant) if variant != "clean" else im) for im in images]
            arr = np.stack([sitk.GetArrayFromImage(c).astype(np.float32) for c in canon])
            geometry = Geometry.from_sitk(canon[0])
            if args.turned_only:
                from spinelm.sanity import turned_over_reasons

                turned = predictor.turned_over(*predictor.preprocess(arr, geometry, "coarse")[:2])
                reasons = turned_over_reasons(turned, flip_check=flip_check)
                rows.append({"case": case, "variant": variant, "flagged": bool(reasons), "reasons": reasons,
                             "n_vertebrae": None, "turned": turned})
                print(f"{case:16s} {variant:11s} {'REVIEW' if reasons else 'ok    '} {'; '.join(reasons)[:150]}",
                      flush=True)
                continue
            res = predictor.predict_array(arr, geometry, str(f))
            rows.append({"case": case, "variant": variant, "flagged": bool(res.qc_reasons),
                         "reasons": res.qc_reasons, "n_vertebrae": len(res.landmarks), "turned": res.turned})
            print(f"{case:16s} {variant:11s} {'REVIEW' if res.qc_reasons else 'ok    '} "
                  f"{'; '.join(res.qc_reasons)[:150]}", flush=True)
    summary = summarise(rows, flip_check)
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
