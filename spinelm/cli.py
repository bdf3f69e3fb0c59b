"""The ``spinelm`` command: one console script, one subcommand per stage.

Heavy modules (torch, nnunetv2, SimpleITK) are imported inside the commands so ``--help`` is instant.
Errors in the input end in one line naming the file and the problem, never a traceback
(``--debug`` shows it).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from spinelm import __version__

log = logging.getLogger("spinelm")

EXIT_INPUT_ERROR = 2


def _workers(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def _positive(value: str) -> float:
    v = float(value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return v


def _fraction(value: str) -> float:
    v = float(value)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return v


# ---------------------------------------------------------------------------------------------- commands


def cmd_synth(args) -> int:
    from spinelm.synthetic import PhantomConfig, synthesize_dataset

    channels = args.channels if args.channels is not None else (2 if args.protocol == "dixon" else 1)
    cfg = PhantomConfig(modality=args.modality, min_vertebrae=args.min_vertebrae, max_vertebrae=args.max_vertebrae,
                        slice_thickness_mm=args.slice_thickness, protocol=args.protocol, channels=channels,
                        max_voxels=args.max_voxels, last_label=args.last_label, p_class=args.abnormal / 2,
                        structures=args.structures, ribs=args.ribs, posture_deg=args.posture)
    t0 = time.time()
    out = synthesize_dataset(args.out, args.n, seed=args.seed, config=cfg, n_unlabelled=args.unlabelled,
                             with_classes=not args.no_classes, progress=not args.no_progress, loose=args.loose,
                             loose_kinds=tuple(k.strip() for k in args.loose_kinds.split(",") if k.strip()))
    print(f"wrote {args.n} labelled + {args.unlabelled} unlabelled phantom(s) to {out} in {time.time() - t0:.1f} s")
    return 0


def cmd_validate(args) -> int:
    from spinelm.validation import validate_dataset

    report = validate_dataset(args.dataset, num_workers=args.workers or None, progress=not args.no_progress)
    for line in report.lines():
        print(line)
    print(report.summary())
    if report.ok:
        print("OK: no errors" + (" (warnings above are worth a look)" if report.warnings else ""))
        return 0
    return 1


def cmd_convert_verse(args) -> int:
    from spinelm.io.verse import convert_verse

    rep = convert_verse(args.src, args.dst, copy_images=not args.symlink, progress=not args.no_progress)
    for scan, why in rep.skipped:
        print(f"skipped {scan}: {why}", file=sys.stderr)
    print(f"converted {len(rep.converted)} scan(s) into {args.dst}; {len(rep.skipped)} skipped")
    return 0 if rep.converted else 1


def cmd_fingerprint(args) -> int:
    from spinelm.fingerprint import compute_fingerprint, save_fingerprint

    fp = compute_fingerprint(Path(args.dataset), num_workers=args.workers, progress=not args.no_progress)
    out = Path(args.output) if args.output else Path(args.dataset) / "fingerprint.json"
    save_fingerprint(fp, out)
    sp = fp["spine"]
    print(f"fingerprint of {len(fp['cases'])} case(s) -> {out}")
    print(f"  channels {fp['channel_names']}; vertebrae seen: {', '.join(sp['label_counts'])}; "
          f"median neighbour distance {sp['median_consecutive_distance_mm'] or float('nan'):.1f} mm")
    return 0


def cmd_plan(args) -> int:
    from spinelm.pipeline import plan_dataset
    from spinelm.planning import summarize

    plans = plan_dataset(args.dataset, args.output, args.device, args.gpu_memory, args.time_budget, args.preset,
                         args.workers, not args.no_progress, args.precision, not args.no_unlabelled,
                         plans_from=args.plans_from)
    print(summarize(plans))
    print(f"wrote {Path(args.output) / 'plans.json'}, fingerprint.json and dataset.json")
    return 0


def cmd_preprocess(args) -> int:
    from spinelm.pipeline import preprocess
    from spinelm.preprocessing import cache_dir

    status = preprocess(args.dataset, args.model, args.workers, not args.no_progress)
    bad = {c: s for c, s in status.items() if s.startswith("failed")}
    for case, why in bad.items():
        print(f"{case}: {why}", file=sys.stderr)
    counts = {k: sum(1 for s in status.values() if s == k) for k in ("done", "cached")}
    print(f"{counts['done']} preprocessed, {counts['cached']} reused from the cache, {len(bad)} failed "
          f"-> {cache_dir(args.model)}")
    return 1 if bad else 0


def _train_settings(args) -> dict:
    return {"epochs": args.epochs, "iterations_per_epoch": args.iterations, "time_budget_min": args.time_budget,
            "device": args.device, "seed": args.seed, "validate_every": args.validate_every,
            "num_workers": args.num_workers, "resume": args.resume, "progress": not args.no_progress,
            "precision": args.precision, "unlabelled": not args.no_unlabelled, "init": args.init}


def _print_folds(results: list[dict], verbose: bool) -> None:
    import json

    for r in results:
        if "coarse" in r:
            c = r["coarse"]
            cf = c["final"] or {}
            print(f"{Path(c['folder']).name}: coarse identification stage, {c['epochs_run']} epochs in "
                  f"{c['elapsed_s'] / 60:.1f} min; alone it identifies {cf.get('id_rate', float('nan')):.3f} "
                  f"(d_mean {cf.get('d_mean_mm', float('nan')):.2f} mm) -> {c['folder']}")
        if "folder" not in r:
            continue  # --resume of a finished fold
        fin = r["final"] or {}
        print(f"{Path(r['folder']).name}: {r['epochs_run']} epochs in {r['elapsed_s'] / 60:.1f} min; validation id "
              f"rate {fin.get('id_rate', float('nan')):.3f}, d_mean {fin.get('d_mean_mm', float('nan')):.2f} mm "
              f"({fin.get('n_identified', 0)}/{fin.get('n_gt', 0)} vertebrae), {fin.get('n_cases_level_shifted', 0)} of "
              f"{fin.get('n_cases', 0)} case(s) level-shifted -> {r['folder']}")
        for k, rnd in enumerate((r.get("self_training") or {}).get("rounds", []), start=1):
            if rnd.get("skipped"):
                print(f"  self-training round {k} (after epoch {rnd['epoch']}): skipped, too little time would be left "
                      f"to train on its labels")
                continue
            print(f"  self-training round {k} (after epoch {rnd['epoch']}): {rnd.get('examined', rnd['scans'])} of "
                  f"{rnd['scans']} unlabelled scans labelled in {rnd.get('seconds', 0):.0f} s, "
                  f"{rnd.get('accepted_now', rnd['accepted'])} accepted; {rnd['accepted']} pseudo-labelled scans in "
                  f"training")
        if r.get("coarse_refresh") and r["coarse_refresh"].get("round"):
            c, rnd = r["coarse_refresh"], r["coarse_refresh"]["round"]
            cf = c["final"] or {}
            print(f"  coarse stage self-training (before the fine stage): it labelled {rnd['examined']} of "
                  f"{rnd['scans']} unlabelled scans alone in {rnd['seconds']:.0f} s and accepted {rnd['accepted']}, "
                  f"then trained {c['epochs_run']} epochs in {c['elapsed_s'] / 60:.1f} min on {c['labelled_runs']} "
                  f"labelled and {c['pseudo_labelled_runs']} pseudo-labelled runs; alone it now identifies "
                  f"{cf.get('id_rate', float('nan')):.3f} (d_mean {cf.get('d_mean_mm', float('nan')):.2f} mm) -> "
                  f"{c['folder']}")
        elif r.get("coarse_refresh"):
            c = r["coarse_refresh"]
            cf = c["final"] or {}
            print(f"  coarse stage refresh: {c['epochs_run']} epochs in {c['elapsed_s'] / 60:.1f} min on "
                  f"{c['labelled_runs']} labelled and {c['pseudo_labelled_runs']} pseudo-labelled runs; alone it now "
                  f"identifies {cf.get('id_rate', float('nan')):.3f} (d_mean {cf.get('d_mean_mm', float('nan')):.2f} "
                  f"mm); its weights replace the coarse stage's (the fold's validation above is with them; "
                  f"{(r.get('final_before_refresh') or {}).get('id_rate', float('nan')):.3f} with the labelled-only "
                  f"ones) -> {c['folder']}")
        if verbose:
            print(json.dumps(r, indent=1, default=str))


def _print_ordering(model_dir) -> None:
    """The fitted weight of the label evidence (``ordering.json``, written by the calibration at the end
    of training), when there is one."""
    from spinelm.confidence import ORDERING_FILE, describe_ordering
    from spinelm.io.files import read_json

    path = Path(model_dir) / ORDERING_FILE
    if path.is_file():
        try:
            print(describe_ordering(read_json(path)))
        except Exception as exc:  # noqa: BLE001 - a damaged file must not hide the training results
            print(f"{path}: unreadable ({exc}); run 'spinelm calibrate {model_dir}'", file=sys.stderr)


def cmd_train(args) -> int:
    from spinelm.pipeline import train

    _print_folds(train(args.model, args.fold, **_train_settings(args)), args.verbose)
    _print_ordering(args.model)
    return 0


def cmd_pretrain(args) -> int:
    from spinelm.pipeline import pretrain

    info = pretrain(args.dataset, args.output, args.time_budget, args.device, args.plan_budget, args.precision,
                    args.workers, not args.no_progress, args.resume, args.steps)
    print(f"pretrained on {info['images']} images: {info['steps']} steps in {info['elapsed_s'] / 60:.1f} min, "
          f"reconstruction loss {info['final_loss']:.4f} -> {Path(args.output) / 'pretrained.pt'}\n"
          f"fine-tune with: spinelm plan-and-train {args.dataset} -o MODEL_DIR --init {args.output}")
    return 0


def cmd_plan_and_train(args) -> int:
    from spinelm.pipeline import plan_and_train

    settings = _train_settings(args)
    for key in ("device", "time_budget_min", "progress"):
        settings.pop(key)
    r = plan_and_train(args.dataset, args.output, args.device, args.gpu_memory, args.time_budget, args.preset,
                       args.workers, args.fold, not args.no_progress, say=print, plans_from=args.plans_from,
                       **settings)
    if not r.validation.ok:
        print("fix the errors above first (spinelm validate lists them)", file=sys.stderr)
        return 1
    _print_folds(r.folds, args.verbose)
    _print_ordering(args.output)
    return 0


def cmd_predict(args) -> int:
    from spinelm.inference import Predictor
    from spinelm.pipeline import detect_device, parse_folds
    from spinelm.plans import ModelFolder
    from spinelm.predict import predict_directory

    device = detect_device(args.device)
    folds = None if args.folds in (None, "all") else parse_folds(args.folds, ModelFolder(args.model).plans
                                                                 .training["num_folds"])
    predictor = Predictor.from_model_folder(args.model, folds=folds, checkpoint=args.checkpoint, device=device,
                                            mirror=args.tta, step_size=args.step_size)
    predictor.turned_check = not args.no_header_check
    from spinelm.predict import slurm_array_part

    if args.num_parts is None and args.part_id is None:
        array = slurm_array_part()
        args.num_parts, args.part_id = array if array else (1, 0)
        if array:
            print(f"SLURM array task: part {args.part_id} of {args.num_parts}")
    elif args.num_parts is None or args.part_id is None:
        raise ValueError("give both --num-parts and --part-id (or neither: a SLURM array sets them)")
    if args.masks is not None:
        if predictor.classifier is None:
            raise ValueError(f"{args.model}: the model has no classification head; --masks grades the vertebrae of "
                             "given masks with one (train on a dataset with classesTr.csv)")
        if not Path(args.masks).is_dir():
            raise FileNotFoundError(f"{args.masks}: --masks folder not found")
    arguments = {k: v for k, v in vars(args).items() if k != "func"}
    print(f"model {args.model}: folds {predictor.folds}, checkpoint {args.checkpoint}, device {device}"
          f"{', mirroring TTA' if args.tta else ''}"
          f"{f', grading the vertebrae of the masks in {args.masks}' if args.masks else ''}")
    report = predict_directory(args.input, args.output, predictor, recursive=args.recursive, pattern=args.pattern,
                               continue_=args.continue_, num_parts=args.num_parts, part_id=args.part_id,
                               qc=not args.no_qc, progress=not args.no_progress, arguments=arguments,
                               masks=args.masks)
    print(f"{report.done} labelled, {report.skipped} already done, {len(report.failed)} failed; "
          f"summary: {report.summary_csv}")
    if report.timing_line():
        print(report.timing_line())
    for case, msg in report.failed:
        print(f"  failed {case}: {msg}")
    return 0 if report.ok else 1


def cmd_merge(args) -> int:
    from spinelm.predict import merge_parts

    r = merge_parts(args.output)
    done = sum(1 for row in r.rows.values() if row.get("status") == "done")
    print(f"{len(r.parts_found)} of {r.parts_expected} part(s) found; {done} case(s) labelled, {len(r.failed)} failed "
          f"-> {r.summary_csv}")
    for k in r.missing_parts:
        print(f"  part {k} of {r.parts_expected}: no summary (never started?); rerun it with --part-id {k}")
    for line in r.not_attempted:
        print(f"  {line} (killed?); rerun that part with --continue")
    for case in r.failed:
        print(f"  failed {case}: {r.rows[case].get('error', '')}")
    return 0 if r.ok else 1


def cmd_calibrate(args) -> int:
    from spinelm.confidence import CALIBRATION_FILE, calibrate
    from spinelm.pipeline import detect_device, parse_folds
    from spinelm.plans import ModelFolder

    model = ModelFolder(args.model)
    folds = None if args.fold in (None, "all") else parse_folds(args.fold, model.plans.training["num_folds"])
    cal = calibrate(model.root, folds, detect_device(args.device), not args.no_progress)
    f = cal.fitted_on
    print(f"calibrated on {f['vertebrae']} validation vertebrae of fold(s) {', '.join(map(str, f['folds']))} "
          f"({f['cases']} cases, {100 * f['identified_share']:.0f}% identified); expected calibration error on them "
          f"{f['ece']:.3f}")
    if cal.method == "posterior":
        print(f"no logistic fit: {f['why']}; the confidence is the ordering's posterior probability of each label")
    if "held_out_ece" in f:
        print(f"held out (each fold scored by a fit on the other folds, {f['held_out_vertebrae']} vertebrae): "
              f"expected calibration error {f['held_out_ece']:.3f}")
        if "held_out_ece_if_calibrated" in f:
            print(f"  a perfectly calibrated confidence would read {f['held_out_ece_if_calibrated']:.3f} on this many "
                  f"vertebrae (95 % of draws below {f['held_out_ece_if_calibrated_p95']:.3f}): "
                  + ("the difference is real" if f["held_out_ece"] > f["held_out_ece_if_calibrated_p95"]
                     else "the difference is within sampling noise"))
    else:
        print("held-out error not measured: train two or more folds (--fold all) to measure it")
    print(f"written: {model.root / CALIBRATION_FILE} (predict now writes 'confidence' per vertebra)")
    _print_ordering(model.root)
    if model.plans.has_coarse:
        from spinelm.sanity import FLIP_CHECK_FILE, describe_flip_check, load_flip_check

        print(f"header check: {describe_flip_check(load_flip_check(model.root))}")
        print(f"written: {model.root / FLIP_CHECK_FILE}")
    return 0


def cmd_report(args) -> int:
    from spinelm.report import write_report

    path = write_report(args.out, args.gt)
    print(f"written: {path} (open it in a browser; the QC pictures it shows are the CASE_qc.png files beside it)")
    return 0


def cmd_evaluate(args) -> int:
    from spinelm.evaluation import evaluate_folders, format_table, write_evaluation

    report = evaluate_folders(args.pred, args.gt, radius_mm=args.radius, all_gt=args.all_gt)
    jpath, cpath = write_evaluation(report, args.output or args.pred)
    print(format_table(report))
    print(f"written: {jpath}, {cpath}")
    return 0


def cmd_demo(args) -> int:
    from spinelm.evaluation import format_table
    from spinelm.pipeline import demo

    r = demo(args.out, args.n, args.held_out, args.seed, args.modality, args.time_budget, args.unlabelled,
             args.resume, args.precision, not args.no_progress, say=print)
    if r is None:
        return 1
    print(format_table(r.evaluation))
    o = r.evaluation["overall"]
    print(f"\ndemo finished in {r.minutes:.1f} min: held-out identification rate {o['id_rate']:.3f}, d_mean "
          f"{o['d_mean_mm']:.2f} mm ({o['n_identified']}/{o['n_gt']} vertebrae)")
    print(f"QC pictures: {r.predictions}/*_qc.png; centroids: {r.predictions}/*_ctd.json (open *.mrk.json in 3D "
          f"Slicer); evaluation: {r.predictions / 'evaluation.csv'}")
    return 0 if r.ok else 1


# ---------------------------------------------------------------------------------------------- parser


PLANS_FROM_HELP = ("adopt the stages, spacing, patch, batch, network and budget split of an earlier plan (a model "
                   "folder or its plans.json) instead of timing training steps: to compare annotations or code at "
                   "a fixed plan, or reuse a plan on similar data")


def _add_train_options(s) -> None:
    s.add_argument("--fold", default="0", help="fold number, comma list, or 'all' (default 0)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--epochs", type=int, help="maximum epochs (default: the plan's)")
    s.add_argument("--iterations", type=int, help="iterations per epoch (default: the plan's)")
    s.add_argument("--time-budget", type=_positive, metavar="MIN",
                   help="stop training after this many minutes per fold (default: the plan's; none on GPU)")
    s.add_argument("--resume", action="store_true", help="continue from the fold's checkpoint_latest.pt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--validate-every", type=int, default=5, metavar="N", help="validate every N epochs (default 5)")
    s.add_argument("--num-workers", type=_workers, default=None,
                   help="data-loading processes per training process (default: none on a CPU, where the "
                        "training step uses every core; on a GPU the free cores, at most 8)")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="arithmetic: auto = float16 AMP on CUDA, bfloat16 + channels-last on a CPU with bfloat16 "
                        "instructions (about 2x faster), float32 otherwise (default auto)")
    s.add_argument("--no-unlabelled", action="store_true",
                   help="do not learn from the scans of imagesUnlabelled/ (by default they are pseudo-labelled during "
                        "training and the anatomically valid, confident ones join the training cases)")
    s.add_argument("--init", metavar="PRETRAINED", help="start the fine stage from the weights of 'spinelm pretrain' "
                   "(its folder); plan-and-train adopts its network")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spinelm",
        description="Find and label vertebrae in spine MR and CT with a self-configuring nnU-Net pipeline.",
        epilog="Run 'spinelm COMMAND --help' for the options of a command.")
    p.add_argument("--version", action="version", version=f"spinelm {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log details of each step")
    common.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and batch jobs)")
    common.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("synth", parents=[common], help="write a synthetic phantom dataset",
                       description="Write N synthetic spine phantoms (image, vertebra mask, centroids, per-vertebra "
                                   "classes) as a dataset folder in the nnU-Net v2 raw layout. Deterministic per seed.")
    s.add_argument("out", help="output dataset folder")
    s.add_argument("--n", type=int, default=12, help="number of labelled cases (default 12)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--modality", choices=["MR", "CT", "mixed"], type=lambda x: {"mr": "MR", "ct": "CT"}.get(
        x.lower(), x), default="MR", help="contrast of the phantoms (default MR: T1 or T2 per case)")
    s.add_argument("--unlabelled", type=int, default=0, help="extra cases in imagesUnlabelled/ (default 0)")
    s.add_argument("--min-vertebrae", type=int, default=5, help="shortest visible run (default 5)")
    s.add_argument("--max-vertebrae", type=int, default=12, help="longest visible run (default 12)")
    s.add_argument("--slice-thickness", type=_positive, metavar="MM",
                   help="give every case thick slices of this spacing (default: 2.5-4.5 mm in most cases)")
    s.add_argument("--protocol", choices=["spine", "dixon"], default="spine",
                   help="spine: a spine protocol, a run of 5-12 vertebrae anywhere from C1 to the sacrum (default); "
                        "dixon: biobank-like neck-to-knee Dixon MR, the whole column in a stitched axial volume "
                        "(2.23 mm in-plane, 3-4.5 mm slices, 226 x 175 x 180-370 voxels, neck to mid-thigh)")
    s.add_argument("--channels", type=int, choices=[1, 2, 4],
                   help="Dixon channels: 2 = water, fat (default); 4 = also in-phase, opposed-phase")
    s.add_argument("--max-voxels", type=int, metavar="N",
                   help="largest grid per case; the spacing grows to respect it (default 2.5 million, Dixon 16 "
                        "million: its own resolution)")
    s.add_argument("--last-label", metavar="NAME",
                   help="end every run at this vertebra, e.g. S1 for a lumbar protocol (default: anywhere)")
    s.add_argument("--abnormal", type=_fraction, default=0.16, metavar="FRACTION",
                   help="share of vertebrae (not C1 or S1) with a class other than normal, half oedema (marrow "
                        "signal: dark on T1, bright on T2, water-rich on Dixon) and half wedge fracture (anterior "
                        "height lowered by up to 45%%) (default 0.16)")
    s.add_argument("--loose", type=_fraction, default=0.0, metavar="FRACTION",
                   help="share of cases with loose annotations, alternately a partial mask (every other vertebra "
                        "unannotated: value 'ignore' of dataset.json) and centroids only (no mask); centroids and "
                        "classes stay complete; annotations.json lists each case's kind (default 0)")
    s.add_argument("--loose-kinds", default="partial,centroids", metavar="KINDS",
                   help="the kinds of loose annotation --loose hands out in turn, comma-separated, from: partial, "
                        "centroids, boxes (boxesTr/CASE.json, one box per vertebra; no mask, no centroid file), "
                        "scribbles (scribblesTr/CASE.nii.gz, strokes through each vertebra and its neighbours; no "
                        "centroid file) (default partial,centroids)")
    s.add_argument("--structures", action="store_true",
                   help="masks also carry discs (100 + the vertebra above), canal (61) and cord (60), as in "
                        "TPTBox: spinelm then trains an auxiliary structures head")
    s.add_argument("--ribs", action="store_true",
                   help="draw a pair of ribs at every thoracic vertebra (bone in the image, not in the mask): "
                        "they fall away from the spine towards the feet, the head-foot cue of a thoracic field "
                        "of view (default: no ribs, as in the phantoms of the figures measured before them)")
    s.add_argument("--posture", type=float, default=0.0, metavar="DEG",
                   help="spread (standard deviation, degrees) of a whole-body pitch and sideways lean drawn per case, "
                        "as people lie on the table; the rest of each phantom stays the same (default 0: every "
                        "column upright, as in the phantoms of the figures measured before this option)")
    s.add_argument("--no-classes", action="store_true", help="do not write classesTr.csv")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("validate", parents=[common], help="check a dataset folder and report every problem",
                       description="Check every file of a dataset folder (images, masks, centroids, classes) and "
                                   "report all problems at once, one line each. Exit status 1 when there are errors.")
    s.add_argument("dataset", help="dataset folder (imagesTr/, labelsTr/, centroidsTr/, ...)")
    s.add_argument("--workers", type=_workers, default=0, help="parallel readers (default: up to 4)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("convert-verse", parents=[common], help="convert the VerSe release layout to a dataset folder",
                       description="Convert VerSe (rawdata/, derivatives/, *_ctd.json) into a spinelm dataset folder "
                                   "with centroids in world LPS mm.")
    s.add_argument("src", help="VerSe folder")
    s.add_argument("dst", help="output dataset folder")
    s.add_argument("--symlink", action="store_true", help="link the CT files instead of copying them")
    s.set_defaults(func=cmd_convert_verse)

    s = sub.add_parser("fingerprint", parents=[common], help="compute the dataset fingerprint",
                       description="Spacings, shapes, foreground intensities (as nnU-Net) plus spine statistics: "
                                   "labels per case, vertebra extents, distances between consecutive vertebrae.")
    s.add_argument("dataset", help="dataset folder")
    s.add_argument("-o", "--output", help="output JSON (default DATASET/fingerprint.json)")
    s.add_argument("--workers", type=_workers, default=None, help="worker processes (default: up to 4; 0 = serial)")
    s.set_defaults(func=cmd_fingerprint)

    s = sub.add_parser("plan", parents=[common], help="fingerprint and plan a dataset into a model folder",
                       description="Derive target spacing, patch size, batch size, network topology, heatmap sigma "
                                   "and output heads for a dataset and a compute budget. Writes MODEL_DIR/plans.json, "
                                   "fingerprint.json and dataset.json and prints what was chosen and why.")
    s.add_argument("dataset", help="dataset folder")
    s.add_argument("-o", "--output", required=True, help="model folder to create")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--gpu-memory", type=_positive, help="GPU memory in GB (default: detected)")
    s.add_argument("--time-budget", type=_positive, metavar="MIN",
                   help="training time budget in minutes: a few real training steps are timed on this device (cached) "
                        "and the patch is capped so the budget buys the steps the recipe needs (default: preset's)")
    s.add_argument("--preset", help="planner preset name or JSON path (default: by device; see plans/)")
    s.add_argument("--workers", type=_workers, default=None, help="fingerprint worker processes")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the arithmetic training will use; with --time-budget a few training steps are timed in it "
                        "on this device to size the patch (default auto)")
    s.add_argument("--no-unlabelled", action="store_true",
                   help="plan without the scans of imagesUnlabelled/ (default: self-training on them)")
    s.add_argument("--plans-from", metavar="MODEL_DIR", help=PLANS_FROM_HELP)
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("preprocess", parents=[common], help="preprocess a dataset into a model folder's cache",
                       description="Resample, crop and normalise every annotated case with nnunetv2's preprocessor "
                                   "as the plans say, carrying the centroids along. Unchanged cases are reused.")
    s.add_argument("dataset", help="dataset folder")
    s.add_argument("-m", "--model", required=True, help="model folder made by 'spinelm plan'")
    s.add_argument("--workers", type=_workers, default=None, help="worker processes (default: up to 4)")
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("train", parents=[common], help="train a planned, preprocessed model folder",
                       description="Train one or more cross-validation folds of a model folder (after 'spinelm plan' "
                                   "and 'spinelm preprocess'). Checkpoints, log and training curve go to "
                                   "MODEL_DIR/fold_N/. Multi-GPU: torchrun --nproc_per_node=N -m spinelm train ...")
    s.add_argument("model", help="model folder")
    _add_train_options(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("pretrain", parents=[common], help="self-supervised pretraining on every image of a dataset",
                       description="Plan DATASET into OUT and pretrain the plan's fine network on all its images "
                                   "(imagesTr and imagesUnlabelled; labels are not used) by masked-image "
                                   "reconstruction: 60 %% of 8-voxel blocks of each patch are hidden and filled in. "
                                   "Then 'spinelm plan-and-train DATASET -o MODEL --init OUT' fine-tunes from it.")
    s.add_argument("dataset", help="dataset folder")
    s.add_argument("-o", "--output", required=True, help="pretrained folder to create")
    s.add_argument("--time-budget", type=_positive, default=10.0, metavar="MIN",
                   help="pretraining minutes (default 10)")
    s.add_argument("--steps", type=int, help="stop after this many steps (default: the time budget decides)")
    s.add_argument("--plan-budget", type=_positive, metavar="MIN",
                   help="plan the network for this training budget, as plan-and-train --time-budget (default none)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="arithmetic, as for training (default auto)")
    s.add_argument("--workers", type=_workers, default=None, help="fingerprint/preprocessing worker processes")
    s.add_argument("--resume", action="store_true", help="continue from OUT/pretrain_latest.pt")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("plan-and-train", parents=[common], help="validate, plan, preprocess and train in one command",
                       description="Validate DATASET, fingerprint and plan it into MODEL_DIR, preprocess, and train.")
    s.add_argument("dataset", help="dataset folder")
    s.add_argument("-o", "--output", required=True, help="model folder to create")
    s.add_argument("--gpu-memory", type=_positive, help="GPU memory in GB (default: detected)")
    s.add_argument("--preset", help="planner preset name or JSON path")
    s.add_argument("--workers", type=_workers, default=None, help="fingerprint/preprocessing worker processes")
    s.add_argument("--plans-from", metavar="MODEL_DIR", help=PLANS_FROM_HELP)
    _add_train_options(s)
    s.set_defaults(func=cmd_plan_and_train)

    s = sub.add_parser("predict", parents=[common], help="label every scan of a folder with a trained model",
                       description="Find and label the vertebrae of every image under INPUT (NIfTI, MHA, NRRD; "
                                   "multi-channel cases as CASE_0000, CASE_0001, ...). Writes per case CASE_ctd.json "
                                   "(LPS mm), CASE_verse_ctd.json, CASE.mrk.json (3D Slicer), CASE_seg.nii.gz "
                                   "(instance mask on the input grid), CASE_qc.png, CASE_classes.csv (with a classification "
                                   "head), and summary.csv for the batch. A "
                                   "bad file is reported and skipped; the exit status is 1 when any case failed.")
    s.add_argument("-i", "--input", required=True, help="folder of scans, or one scan")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("-m", "--model", required=True, help="trained model folder")
    s.add_argument("-f", "--folds", help="folds to ensemble, e.g. '0 1 2' (default: every trained fold)")
    s.add_argument("--checkpoint", default="final", choices=["final", "best", "latest"],
                   help="checkpoint of each fold (default final)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (never cranio-caudal)")
    s.add_argument("--step-size", type=_positive, default=0.5, help="sliding-window step, fraction of the patch "
                                                                     "(default 0.5)")
    s.add_argument("--recursive", action="store_true", help="also scans in subfolders")
    s.add_argument("--pattern", help="glob for the files to take, e.g. '*_T2*.nii.gz' (default: every image)")
    s.add_argument("--continue", dest="continue_", action="store_true",
                   help="skip cases whose outputs are complete (resume a killed batch)")
    s.add_argument("--num-parts", type=int, help="split the batch into this many parts (default: "
                                                 "$SLURM_ARRAY_TASK_COUNT in a SLURM array, else 1); each part "
                                                 "writes summary_partKofN.csv, 'spinelm merge' joins them")
    s.add_argument("--part-id", type=int, help="which part this process runs, 0-based (default: "
                                               "$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN in a SLURM array, "
                                               "else 0)")
    s.add_argument("--no-qc", action="store_true", help="skip the QC pictures")
    s.add_argument("--no-header-check", action="store_true",
                   help="skip the turned-over comparison that checks each header's head-foot axis (five more passes "
                        "of the coarse network per scan: about 1 s of a 2-2.5 s lumbar MR scan on 2 CPU cores)")
    s.add_argument("--masks", metavar="DIR",
                   help="grade the vertebrae of these instance masks (DIR/CASE.nii.gz, VerSe labels, on each scan's "
                        "grid: ground truth or another tool's output) instead of predicted ones; centroids and "
                        "labels come from the masks (needs a model with a classification head)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("merge", parents=[common], help="join the per-part summaries of a split batch",
                       description="Merge the summary_partKofN.csv files that 'spinelm predict --num-parts N "
                                   "--part-id K' (or a SLURM array) wrote into OUTPUT/summary.csv, and report parts "
                                   "that never ran, parts that stopped early and failed cases (rerun those parts "
                                   "with --continue). Exit status 1 if anything is missing or failed.")
    s.add_argument("output", help="the prediction folder the parts wrote to")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("calibrate", parents=[common], help="fit per-vertebra confidence on the validation folds",
                       description="Run every trained fold's final model on its own validation cases (the one "
                                   "predictor). First it fits how much the ordering weighs the network's label "
                                   "probabilities against the column's geometry (1, 0.7, 0.5, 0.35 or 0.25: the weight "
                                   "under which the annotated labels are most probable; MODEL/ordering.json, used by "
                                   "predict). Then, with that weight, it fits a logistic model of 'this vertebra is identified' (right "
                                   "label within 20 mm) on its heatmap peak, label probability, the margin of its "
                                   "run over the run shifted by one level, neighbour spacing, and the mean label probability of "
                                   "the whole run (errors come by case: a shifted run makes all its labels wrong). With fewer "
                                   "than 10 wrong (or right) validation vertebrae to fit on, the confidence is the "
                                   "ordering's posterior probability of each label instead. Writes "
                                   "MODEL/calibration.json; predict then writes a 'confidence' per vertebra and "
                                   "flags cases with a vertebra below 0.5 for review. It also learns the header check's flip "
                                   "check: on each validation scan, whether the coarse stage scores the scan turned "
                                   "head over foot clearly lower than as stored (MODEL/orientation.json); where it "
                                   "does, predict reports scans that score higher flipped; and the swap threshold: a "
                                   "scan is reported when turned onto another axis it has more than 1.1 times the "
                                   "heatmap peaks as stored, or than the most any validation scan reached, "
                                   "whichever is higher. Training runs it at its end.")
    s.add_argument("model", help="trained model folder")
    s.add_argument("--fold", help="folds to calibrate on, e.g. 0,1 (default: every trained fold)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("report", parents=[common], help="an HTML page to review a prediction batch",
                       description="Write OUT/report.html: the cases sorted by risk (QC review first, then by the "
                                   "least confident vertebra) with their QC pictures, flags and per-vertebra "
                                   "confidence, the batch statistics and a reliability diagram; with --gt also a "
                                   "risk-coverage curve. Opens from the file, offline.")
    s.add_argument("out", help="prediction folder (summary.csv, CASE_ctd.json, CASE_qc.png)")
    s.add_argument("--gt", help="ground truth (dataset folder or centroid files) for the reliability diagram and "
                                "the risk-coverage curve")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("evaluate", parents=[common], help="compare predictions with ground truth",
                       description="VerSe identification rate (prediction with the right label within 20 mm and "
                                   "closest to that vertebra), d_mean (mm), missed and false-positive labels, and "
                                   "Dice per vertebra when both masks exist. Writes evaluation.json/.csv.")
    s.add_argument("pred", help="prediction folder (CASE_ctd.json files)")
    s.add_argument("gt", help="ground truth: a dataset folder (centroidsTr/, labelsTr/) or a folder of centroid "
                              "files named like the predictions")
    s.add_argument("-o", "--output", help="where evaluation.json/.csv go (default: PRED)")
    s.add_argument("--radius", type=_positive, default=20.0, help="identification radius in mm (default 20)")
    s.add_argument("--all-gt", action="store_true", help="evaluate every ground-truth case; those without a "
                                                         "prediction count as all missed (default: the cases the "
                                                         "prediction batch attempted)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("demo", parents=[common], help="run the pipeline end to end on synthetic phantoms",
                       description="Synthesise phantoms (a lumbar protocol: runs ending at the sacrum, random axis "
                                   "orders), validate, plan for the CPU, train for a few minutes, predict held-out "
                                   "phantoms, evaluate, and print the figures and where the QC pictures are. About "
                                   "8 minutes on 2 CPU cores.")
    s.add_argument("--out", default="spinelm_demo", help="output folder (default ./spinelm_demo)")
    s.add_argument("--n", type=int, default=20, help="training phantoms (default 20)")
    s.add_argument("--held-out", type=int, default=6, help="held-out phantoms to predict and evaluate (default 6)")
    s.add_argument("--unlabelled", type=int, default=0, help="unlabelled phantoms (default 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--modality", default="MR", choices=["MR", "CT", "mixed"])
    s.add_argument("--time-budget", type=_positive, default=8.0, metavar="MIN", help="CPU training minutes (default 8)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted demo's training")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="training arithmetic (default auto: bfloat16 on CPUs with bfloat16 instructions)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_INPUT_ERROR
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from spinelm.nnunet import set_default_processes

    set_default_processes()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("spinelm: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, OSError, MemoryError) as exc:
        if args.debug:
            raise
        msg = str(exc).strip("'\"") or exc.__class__.__name__
        print(f"spinelm {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
