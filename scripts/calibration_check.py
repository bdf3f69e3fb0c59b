"""Held-out check of the per-vertebra confidence and the case QC flag, by cross-fitting over folds.

Every scan of the dataset that some trained fold validated on is labelled by that fold's model, with
a confidence model fitted on the *other* folds' validation vertebrae only, and the header check's
orientation thresholds (``orientation.json``) learned on the other folds' validation scans only; so
nothing was fitted on the scan it scores. The scans go through ``spinelm predict`` (the one predictor, the full
QC of ``summary.csv``) into OUT, and the figures the issue asks for are computed from what predict
wrote, against the dataset's ground truth:

- expected calibration error of the per-vertebra confidence (10 equal bins) and the reliability bins;
- the ``review`` flag: how many of the cases with any wrong or missing label it catches, and how
  many cases it flags in all (also with the low-confidence reason alone);
- the risk-coverage curve of the cases (risk as in ``spinelm report``) and its area;
- how the measured ECE compares with what a perfectly calibrated confidence would read on this many
  vertebrae (``ece_noise_floor``), and a 90 % interval of the ECE from resampling whole cases (the
  errors of one scan come together: a level shift makes all its labels wrong).

    python scripts/calibration_check.py MODEL DATASET OUT [--folds 0,1,2,3,4] [--device cpu]
    python scripts/calibration_check.py MODEL DATASET OUT --scored-only
    python scripts/calibration_check.py MODEL DATASET OUT --one-fold-fits

With ``--one-fold-fits`` (from the validation records alone, nothing predicted): the confidence a user
gets who trained one fold, fitted on that fold's validation vertebrae only, scored on every other
fold's; one line per fold, beside the ordering's posterior on the same vertebrae.

With ``--scored-only`` nothing is fitted or predicted: OUT already holds ``spinelm predict``'s outputs
for DATASET's scans (e.g. a held-out set labelled by MODEL with the ``calibration.json`` fitted at the
end of its training), and the same figures are computed from them; MODEL is not read.

MODEL needs two or more trained folds (``spinelm plan-and-train DATASET -o MODEL --fold all``).
``spinelm report OUT --gt DATASET`` then shows the same batch as a page. The figures are written to
``OUT/calibration_check.json``; the validation records the confidence models were fitted on to
``OUT/records.json`` (a rerun reads them instead of predicting the validation folds again; the held-out
scans themselves are labelled anew every time, with the confidence models fitted now).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from spinelm.confidence import FEATURES, collect, cross_fitted, orientation_check
    from spinelm.dataset import discover_dataset
    from spinelm.inference import Predictor
    from spinelm.plans import ModelFolder
    from spinelm.predict import predict_directory

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("out")
    p.add_argument("--folds", default=None, help="comma list (default: every trained fold)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--one-fold-fits", action="store_true",
                   help="score each fold's own calibration fit on the other folds' validation vertebrae")
    p.add_argument("--scored-only", action="store_true",
                   help="OUT already holds spinelm predict's outputs of DATASET: only compute the figures")
    args = p.parse_args(argv)
    if args.scored_only:
        return report_figures(Path(args.out), args.dataset, folds=[])
    model, out = ModelFolder(args.model), Path(args.out)
    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    cache = out / "records.json"
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if isinstance(stored, dict) and stored.get("features") == list(FEATURES) and "turned" in stored:
        records = [(r["fold"], r["case"], np.asarray(r["features"], float).reshape(-1, len(FEATURES)),
                    np.asarray(r["identified"], bool), r["n_gt"]) for r in stored["records"]]
        records = [r for r in records if folds is None or r[0] in folds]
        turned = [(f, rows) for f, rows in stored["turned"] if folds is None or f in folds]
    else:
        turned = []
        records = collect(model.root, folds, args.device, progress=True, flips=turned)
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"features": list(FEATURES), "records": [
            {"fold": f, "case": c, "features": x.tolist(), "identified": y.tolist(), "n_gt": n}
            for f, c, x, y, n in records], "turned": turned}))
    if args.one_fold_fits:
        return one_fold_fits(records, out)
    models, _, _ = cross_fitted(records)
    splits = json.loads(model.splits_path.read_text())
    cases = {c.case_id: c for c in discover_dataset(args.dataset).cases}
    for fold, cal in models.items():
        inputs = out / "inputs" / f"fold_{fold}"
        inputs.mkdir(parents=True, exist_ok=True)
        for case in splits[fold]["val"]:
            for i, src in enumerate(cases[case].images):
                link = inputs / f"{case}_{i:04d}{''.join(Path(src).suffixes[-2:])}"
                if not link.exists():
                    link.symlink_to(Path(src).resolve())
        pred = Predictor.from_model_folder(model.root, folds=[fold], device=args.device)
        pred.calibration = cal
        if turned:  # the orientation checks too, learned on the other folds' validation scans only
            pred.flip_check = orientation_check([rows for f, rows in turned if f != fold])
        for case in splits[fold]["val"]:  # labelled anew: an earlier run's outputs carry its confidence models
            (out / f"{case}_ctd.json").unlink(missing_ok=True)
        predict_directory(inputs, out, pred, continue_=True, progress=True)
    return report_figures(out, args.dataset, folds=sorted(models),
                          fits={str(f): m.fitted_on for f, m in models.items()})


def one_fold_fits(records, out: Path) -> int:
    """Each fold's calibration, fitted on its validation vertebrae alone (what training one fold
    stores), scored on the other folds' validation vertebrae; printed and written to
    ``out/one_fold_fits.json``."""
    from spinelm.confidence import FEATURES, Calibration, ece_noise_floor, expected_calibration_error, wrong_cases

    def stack(rs):
        rs = [r for r in rs if len(r[3])]
        return np.vstack([r[2] for r in rs]), np.concatenate([r[3] for r in rs]).astype(float)

    rows = []
    for fold in sorted({r[0] for r in records}):
        x, y = stack([r for r in records if r[0] == fold])
        xo, yo = stack([r for r in records if r[0] != fold])
        cal = Calibration.fit(x, y, wrong_cases=wrong_cases([r for r in records if r[0] == fold]), folds=[fold])
        post = np.clip(xo[:, FEATURES.index("posterior")], 0, 1)
        row = {"fold": fold, "fitted_on": len(y), "wrong": int(len(y) - y.sum()), "method": cal.method,
               "scored": len(yo), "ece": expected_calibration_error(cal(xo), yo),
               "ece_posterior": expected_calibration_error(post, yo), "ece_if_calibrated": ece_noise_floor(cal(xo))}
        if cal.method == "logistic":
            row["ece_logistic"] = row["ece"]
        else:  # what the logistic fit would have given on these outcomes
            row["ece_logistic"] = expected_calibration_error(
                Calibration.fit(x, y, min_outcomes=0, min_wrong_cases=0)(xo), yo)
        rows.append(row)
        print(f"fold {fold}: fitted on {row['fitted_on']} vertebrae ({row['wrong']} wrong) -> {row['method']}; on the "
              f"other folds' {row['scored']} vertebrae: ECE {row['ece']:.3f} (logistic fit {row['ece_logistic']:.3f}, "
              f"ordering posterior {row['ece_posterior']:.3f}; a calibrated confidence would read "
              f"{row['ece_if_calibrated']['mean']:.3f}, 95 % below {row['ece_if_calibrated']['p95']:.3f})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "one_fold_fits.json").write_text(json.dumps(rows, indent=1))
    return 0


def report_figures(out: Path, dataset, folds, fits: dict | None = None) -> int:
    """The figures of what ``spinelm predict`` wrote to ``out``, against ``dataset``'s ground truth:
    printed and written to ``out/calibration_check.json``."""
    from spinelm import labels as L
    from spinelm.confidence import REVIEW_BELOW, ece_noise_floor, expected_calibration_error, reliability_bins
    from spinelm.report import _attach_ground_truth, read_batch, risk_coverage

    entries = read_batch(out)
    conf, ident = _attach_ground_truth(entries, dataset)
    done = [e for e in entries if e.correct is not None]
    wrong = [e for e in done if not e.correct]
    strict = [e for e in done if not e.correct or e.beyond]
    flagged = [e for e in done if e.qc == "review"]
    low = [e for e in done if e.min_confidence is not None and e.min_confidence < REVIEW_BELOW]
    cov, err, aurc = risk_coverage([e.risk for e in done], [not e.correct for e in done])
    floor = ece_noise_floor(conf)
    per_case = []  # (confidences, identified) of each case's vertebrae, as _attach_ground_truth paired them
    for e in done:
        pairs = [(float(v["confidence"]), v["identified"]) for v in e.vertebrae
                 if v.get("confidence") is not None and v["identified"] is not None]
        if pairs:
            per_case.append((np.asarray([c for c, _ in pairs]), np.asarray([i for _, i in pairs], float)))
    if not per_case:
        print(f"{out}: no scored vertebra with a confidence (no predictions of {dataset}'s scans there, or a model "
              f"without calibration.json)", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(1000):  # resample whole cases
        pick = [per_case[i] for i in rng.integers(len(per_case), size=len(per_case))]
        boot.append(expected_calibration_error(np.concatenate([c for c, _ in pick]), np.concatenate([o for _, o in pick])))
    res = {"cases": len(done), "vertebrae": len(conf), "identified_share": float(np.mean(ident)) if ident else None,
           "mean_confidence": float(np.mean(conf)) if conf else None,
           "ece": expected_calibration_error(conf, ident), "reliability": reliability_bins(conf, ident),
           "ece_case_bootstrap_90": [float(np.percentile(boot, 5)), float(np.percentile(boot, 95))],
           "ece_if_calibrated": floor["mean"], "ece_if_calibrated_p95": floor["p95"],
           "cases_with_error": len(wrong), "flagged": len(flagged),
           # strict: a label outside the annotated range counted as an error too
           "cases_with_error_strict": len(strict), "caught_strict": sum(e.qc == "review" for e in strict),
           "caught": sum(e.qc == "review" for e in wrong),
           "flagged_low_confidence": len(low), "caught_low_confidence": sum(e in low for e in wrong),
           "aurc": aurc, "error_rate_all": float(np.mean([not e.correct for e in done])) if done else None,
           "folds": folds, "fits": fits or {},
           "per_case": [{"case": e.case, "correct": e.correct, "beyond_annotation": [L.name_of(x) for x in e.beyond],
                         "qc": e.qc, "reasons": e.reasons,
                         "min_confidence": e.min_confidence} for e in done]}
    sweep = []
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        hit = [e for e in done if any(not r.startswith("low confidence") for r in e.reasons)
               or (e.min_confidence is not None and e.min_confidence < t)]
        sweep.append((t, sum(not e.correct for e in hit), len(hit)))
    res["review_below_sweep"] = sweep
    (out / "calibration_check.json").write_text(json.dumps(res, indent=1))
    n = max(len(done), 1)
    print(f"{len(done)} held-out cases ({len(conf)} vertebrae, {100 * res['identified_share']:.0f}% identified, "
          f"mean confidence {res['mean_confidence']:.3f}), folds {', '.join(map(str, folds)) or 'as predicted'}")
    print(f"expected calibration error: {res['ece']:.3f} (90 % interval over resampled cases "
          f"{res['ece_case_bootstrap_90'][0]:.3f}-{res['ece_case_bootstrap_90'][1]:.3f}); a perfectly calibrated "
          f"confidence would read {floor['mean']:.3f} on these {len(conf)} vertebrae (95 % of draws below "
          f"{floor['p95']:.3f})")
    for b in res["reliability"]:
        if b["n"]:
            print(f"  confidence {b['lo']:.1f}-{b['hi']:.1f}: {b['n']:4d} vertebrae, mean {b['confidence']:.2f}, "
                  f"identified {b['accuracy']:.2f}")
    print(f"cases with a wrong or missing label: {len(wrong)} ({100 * len(wrong) / n:.0f}%); counting labels "
          f"outside the annotated range as errors too: {len(strict)} (flag caught {res['caught_strict']})")
    print(f"review flag: caught {res['caught']}/{len(wrong)}, flagged {len(flagged)}/{len(done)} "
          f"({100 * len(flagged) / n:.0f}%)")
    print(f"low-confidence reason alone: caught {res['caught_low_confidence']}/{len(wrong)}, flagged "
          f"{len(low)}/{len(done)} ({100 * len(low) / n:.0f}%)")
    print(f"risk-coverage area {aurc:.3f} (error rate of all cases {res['error_rate_all']:.3f})")
    print("the flag with another low-confidence threshold (the other reasons kept): " + "; ".join(
        f"below {t:.1f}: caught {c}/{len(wrong)}, flagged {f}/{len(done)}" for t, c, f in res["review_below_sweep"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
