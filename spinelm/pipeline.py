"""The library API under the ``spinelm`` command: plan, train, plan-and-train and the demo.

Each function takes explicit paths and options, does the work, and returns what it did; the CLI
(:mod:`spinelm.cli`) only parses arguments and prints. Long steps report through ``say`` (a
callable taking one line; the CLI passes ``print``, the default logs).
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def detect_device(device: str | None) -> str:
    """``device`` as given, else ``cuda`` when a GPU is visible, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def detect_gpu_memory(device: str, given: float | None) -> float | None:
    """GPU memory in GB: as given, or read from the first CUDA device (None on the CPU)."""
    if given is not None or not device.startswith("cuda"):
        return given
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA GPU is visible; use --device cpu")
    return torch.cuda.get_device_properties(0).total_memory / 2 ** 30


def plan_dataset(dataset: str | Path, model_dir: str | Path, device: str | None = None,
                 gpu_memory: float | None = None, time_budget: float | None = None, preset: str | None = None,
                 workers: int | None = None, progress: bool = True, precision: str = "auto",
                 unlabelled: bool = True, init: str | Path | None = None, plans_from: str | Path | None = None):
    """Fingerprint + plan a dataset into a self-contained model folder (``plans.json``,
    ``fingerprint.json``, ``dataset.json``); returns the :class:`~spinelm.plans.Plans`. With a time
    budget the plan is fitted to a training step measured on this device in ``precision``
    (:func:`spinelm.budget.plan_within_budget`); with ``plans_from`` (an earlier model folder or its
    ``plans.json``) nothing is timed and its grids, networks and budget split are adopted
    (:func:`adopt_plan`)."""
    from spinelm.dataset import discover_dataset
    from spinelm.fingerprint import compute_fingerprint, save_fingerprint
    from spinelm.io.files import write_json_atomic
    from spinelm.budget import plan_within_budget
    from spinelm.planning import save_plans
    from spinelm.plans import ModelFolder, Plans

    dataset, model = Path(dataset), ModelFolder(model_dir)
    device = detect_device(device)
    gpu_memory = detect_gpu_memory(device, gpu_memory)
    ds = discover_dataset(dataset)
    t0 = time.time()
    fp = compute_fingerprint(dataset, num_workers=workers, progress=progress)
    log.info("fingerprint of %d case(s) in %.1f s", len(fp["cases"]), time.time() - t0)
    if plans_from:
        from spinelm.planning import plan

        raw = plan(fp, preset, device, gpu_memory, time_budget)
        adopt_plan(raw, plans_from)
    else:
        raw = plan_within_budget(fp, preset, device, gpu_memory, time_budget, precision)
    model.root.mkdir(parents=True, exist_ok=True)
    save_fingerprint(fp, model.root / "fingerprint.json")
    write_json_atomic(model.root / "dataset.json", {
        "format": "spinelm-dataset", "version": 1, "root": str(dataset.resolve()),
        "channel_names": fp["channel_names"], "file_ending": ds.file_ending,
        "num_training": len(ds.cases), "num_unlabelled": len(ds.unlabelled),
        "labels_seen": fp["spine"]["label_counts"], "source_dataset_json": ds.dataset_json})
    from spinelm.semisupervised import add_self_training, without_coarse_refresh

    if ds.unlabelled and unlabelled:
        add_self_training(raw, len(ds.unlabelled), len(ds.cases))
    else:
        without_coarse_refresh(raw)
        if ds.unlabelled:
            raw["rationale"].append(f"{len(ds.unlabelled)} unlabelled scan(s) not used (--no-unlabelled)")
    if init:
        adopt_pretrained_network(raw, init)
    if ds.splits:  # the dataset fixes its folds
        raw["training"]["num_folds"] = len(ds.splits)
        raw["training"]["splits_from_dataset"] = True
        write_json_atomic(model.splits_path, list(ds.splits))
        log.info("folds from %s: %d", dataset / "splits.json", len(ds.splits))
    save_plans(raw, model.plans_path)
    return Plans(raw, str(model.plans_path))


#: What :func:`adopt_plan` takes from the earlier plan, per configuration: the grid and the network.
ADOPTED_CONFIGURATION_KEYS = ("spacing", "patch_size", "batch_size", "architecture", "heatmap_sigma_mm")
#: ... and from its measured budget: the timings and how a fold's time is split between the stages.
ADOPTED_BUDGET_KEYS = ("measured_step", "affordable_steps", "measured_step_coarse", "affordable_steps_coarse",
                       "stage_shares")


def adopt_plan(raw: dict, source: str | Path) -> None:
    """Give the plan ``raw`` the configurations (spacing, patch, batch, network, heatmap width), the
    classification and level crop sizes and the budget split of an earlier plan (a model folder or
    its ``plans.json``). What is measured on this dataset (intensities, labels, the column's
    statistics) stays its own. For comparisons at a fixed plan (other annotations or code on the same
    scans, where a re-timed budget would size the patch anew), or to reuse a plan on a similar dataset.

    Raises:
        FileNotFoundError / ValueError: naming the file, when it is missing, not a plan, or planned for
        other channels or another axis order than this dataset. Its stages are adopted too (a coarse
        identification stage comes with a patch too small to hold the scan).
    """
    from spinelm.io.files import read_json

    path = Path(source)
    path = path / "plans.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no plans.json there (give a model folder made by 'spinelm plan', or its "
                                f"plans.json)")
    theirs = read_json(path)
    if not isinstance(theirs, dict) or not isinstance(theirs.get("configurations"), dict):
        raise ValueError(f"{path}: not a spinelm plans file (no configurations)")

    def differs(what: str, mine, other) -> ValueError:
        return ValueError(f"{path}: planned for {what} {other}, this dataset's plan has {mine}; its plan cannot be "
                          f"adopted (plan without --plans-from)")

    if list(theirs.get("channel_names", {}).values()) != list(raw.get("channel_names", {}).values()):
        raise differs("channels", list(raw.get("channel_names", {}).values()),
                      list(theirs.get("channel_names", {}).values()))
    if theirs.get("transpose_forward") != raw.get("transpose_forward"):
        raise differs("the axis order", raw.get("transpose_forward"), theirs.get("transpose_forward"))
    if "fine" not in theirs["configurations"]:
        raise differs("the stages", sorted(raw["configurations"]), sorted(theirs["configurations"]))
    configs = {}
    for name, cfg in theirs["configurations"].items():  # its stages too: a coarse stage comes with a capped patch
        configs[name] = dict(raw["configurations"].get(name) or copy.deepcopy(cfg))
        configs[name].update({k: copy.deepcopy(cfg[k]) for k in ADOPTED_CONFIGURATION_KEYS if k in cfg})
    raw["configurations"] = configs
    if "coarse" in configs and theirs.get("identification"):
        raw["identification"] = {**(raw.get("identification") or copy.deepcopy(theirs["identification"])),
                                 "crop_size": theirs["identification"]["crop_size"]}
    elif "coarse" not in configs:
        raw.pop("identification", None)
    if raw.get("classification") and (theirs.get("classification") or {}).get("crop_size"):
        raw["classification"]["crop_size"] = theirs["classification"]["crop_size"]
    budget = theirs.get("budget") or {}
    raw.setdefault("budget", {}).update({k: budget[k] for k in ADOPTED_BUDGET_KEYS if k in budget})
    raw["budget"]["adopted_from"] = str(path.resolve())
    from spinelm.semisupervised import without_coarse_refresh

    # its coarse refresh's share goes back to the stage it came from; this dataset's own self-training
    # (or none) is planned afterwards
    without_coarse_refresh({"budget": raw["budget"], "training": theirs.get("training") or {}})
    patches = ", ".join(f"{n} {'x'.join(map(str, c['patch_size']))}" for n, c in raw["configurations"].items())
    raw["rationale"] = [f"spacing, patch, batch, network and budget split adopted from {path} ({patches}); no "
                        f"training step timed; the earlier plan's reasons follow"] + [
        r for r in theirs.get("rationale", []) if "unlabelled scan(s)" not in r]


def adopt_pretrained_network(raw: dict, pretrained: str | Path) -> None:
    """Give the plan ``raw`` the fine configuration of a pretrained folder (``spinelm pretrain``), so
    that its weights load; the change goes into the plan's rationale."""
    from spinelm.io.files import read_json

    folder = Path(pretrained)
    folder = folder.parent if folder.is_file() else folder
    if not (folder / "plans.json").is_file():
        raise FileNotFoundError(f"{folder}: not a pretrained folder (no plans.json; run spinelm pretrain DATASET -o "
                                f"{folder})")
    theirs = read_json(folder / "plans.json")["configurations"]["fine"]
    mine = raw["configurations"]["fine"]
    if theirs["architecture"] != mine["architecture"] or theirs["spacing"] != mine["spacing"]:
        raw["configurations"]["fine"] = theirs
        raw["rationale"].append(f"fine configuration taken from the pretrained plan {folder / 'plans.json'} (its "
                                f"network differs from this plan's) so that the pretrained weights load")
    else:
        raw["rationale"].append(f"fine stage initialised from {folder} (same network)")


def pretrain(dataset: str | Path, out: str | Path, time_budget: float = 10.0, device: str | None = None,
             plan_budget: float | None = None, precision: str = "auto", workers: int | None = None,
             progress: bool = True, resume: bool = False, steps: int | None = None) -> dict:
    """Plan ``dataset`` into ``out`` (as ``spinelm plan --time-budget plan_budget``), preprocess its
    labelled and unlabelled images, and pretrain the fine network for ``time_budget`` minutes
    (:func:`spinelm.pretraining.pretrain`)."""
    from spinelm.plans import ModelFolder
    from spinelm.preprocessing import preprocess_dataset
    from spinelm.pretraining import pretrain as run

    device = detect_device(device)
    model = ModelFolder(out)
    if not (resume and model.plans_path.is_file()):
        plan_dataset(dataset, out, device, None, plan_budget, None, workers, progress, precision, unlabelled=False)
    for unl in (False, True):
        preprocess_dataset(dataset, model.root, model.plans, "fine", workers, progress, unlabelled=unl)
    return run(model.root, time_budget, steps, device, resume=resume, progress=progress, precision=precision)


def preprocess(dataset: str | Path, model_dir: str | Path, workers: int | None = None,
               progress: bool = True) -> dict[str, str]:
    """Preprocess every annotated case into the model folder's cache; ``{case: status}``."""
    from spinelm.plans import ModelFolder
    from spinelm.preprocessing import preprocess_dataset

    model = ModelFolder(model_dir)
    status: dict[str, str] = {}
    for stage in model.plans.stages:
        for case, st in preprocess_dataset(dataset, model.root, model.plans, stage, workers, progress).items():
            if st.startswith("failed") or case not in status:
                status[case] = st
    if model.plans.training.get("self_training"):  # the unlabelled scans, for pseudo-labels
        for stage in model.plans.stages:
            for case, st in preprocess_dataset(dataset, model.root, model.plans, stage, workers, progress,
                                               unlabelled=True).items():
                if st.startswith("failed"):
                    log.warning("unlabelled scan %s left out: %s", case, st)
    return status


def parse_folds(value: str | int | None, n_folds: int) -> list[int]:
    """``"all"`` -> every fold; ``"0,2"`` or ``"0 2"`` -> [0, 2]; checked against the plan's folds."""
    if value is None:
        return [0]
    if isinstance(value, int):
        folds = [value]
    elif str(value).strip() == "all":
        return list(range(n_folds))
    else:
        try:
            folds = [int(x) for x in str(value).replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"expected fold numbers like '0 1' or '0,1' or 'all', got {value!r}") from None
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad:
        raise ValueError(f"fold {bad[0]} does not exist; the plan has folds 0-{n_folds - 1}")
    return folds


def train(model_dir: str | Path, folds: str | int | None = "0", **settings) -> list[dict]:
    """Train the given folds of a planned, preprocessed model folder (``settings``: the fields of
    :class:`spinelm.training.TrainSettings` but ``fold``); one result per fold (the fine stage's,
    with the coarse stage's under ``"coarse"`` when the plan has one).

    Each fold trains its stages in order, the coarse identification stage first (the fine stage's
    validation uses it), each for its share of the time budget. With ``resume`` a stage that has
    finished (``checkpoint_final``) is not trained again.
    """
    from spinelm.plans import ModelFolder
    from spinelm.semisupervised import refresh_source
    from spinelm.training import (TrainSettings, coarse_labels_itself, coarse_refresh_due, coarse_self_training,
                                  record_coarse_refresh, refresh_coarse, revalidate_fine, train_fold)

    model = ModelFolder(model_dir)
    settings["device"] = detect_device(settings.get("device"))
    results = []
    for f in parse_folds(folds, model.plans.training["num_folds"]):
        stage_results = {}
        s = TrainSettings(fold=f, **settings)
        own_refresh = None
        for stage in model.plans.stages:
            done = model.checkpoint(f, "final", stage)
            if settings.get("resume") and stage != model.plans.stages[-1] and done.is_file():
                log.info("fold %d: the %s stage has finished (%s); not training it again", f, stage, done)
            else:
                stage_results[stage] = train_fold(model.root, s, stage)
            if stage == "coarse" and coarse_labels_itself(model, s) and coarse_refresh_due(model, f, s):
                own_refresh = coarse_self_training(model.root, s)  # before the fine stage, which validates with it
        result = stage_results.get("fine", {})
        if "coarse" in stage_results:
            result["coarse"] = stage_results["coarse"]
        if own_refresh is not None:
            result["coarse_refresh"] = own_refresh
            record_coarse_refresh(model, f, own_refresh)
        if refresh_source(model.plans.raw) == "fine" and coarse_refresh_due(model, f, s) and \
                int(os.environ.get("WORLD_SIZE", "1")) == 1:
            pseudo = (result.get("self_training") or {}).get("cases")  # None: self-training did not run
            refreshed = refresh_coarse(model.root, s, pseudo) if pseudo is not None else None
            if refreshed is not None:
                result["coarse_refresh"] = refreshed
                result.update(revalidate_fine(model.root, s, result))
        results.append(result)
    if int(os.environ.get("RANK", "0")) == 0:
        calibrate_quietly(model.root, settings["device"], settings.get("progress", True))
    return results


def calibrate_quietly(model_dir, device: str = "cpu", progress: bool = True):
    """Fit ``calibration.json`` (:func:`spinelm.confidence.calibrate`) on the trained folds; a failure
    is logged, not raised (training results stay valid without confidences)."""
    from spinelm.confidence import calibrate

    try:
        cal = calibrate(model_dir, device=device, progress=progress)
    except (FileNotFoundError, ValueError) as exc:  # e.g. no trained fold, no validation vertebra
        log.warning("no calibration: %s", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - training results stay valid without confidences; a bug, so the trace
        log.warning("no calibration (%s: %s); run 'spinelm calibrate %s' to retry", type(exc).__name__, exc, model_dir,
                    exc_info=True)
        return None
    f = cal.fitted_on
    held = (f"; held-out expected calibration error {f['held_out_ece']:.3f} (each fold scored by a fit on the "
            f"others)") if "held_out_ece" in f else ""
    log.info("calibrated per-vertebra confidence on %d validation vertebrae (%.0f%% identified)%s%s",
             f["vertebrae"], 100 * f["identified_share"], held,
             f"; no logistic fit ({f['why']}): the confidence is the ordering's posterior" if cal.method == "posterior"
             else "")
    from spinelm.confidence import ORDERING_FILE, describe_ordering
    from spinelm.io.files import read_json
    from spinelm.plans import ModelFolder
    from spinelm.sanity import describe_flip_check, load_flip_check

    try:
        log.info("%s", describe_ordering(read_json(Path(model_dir) / ORDERING_FILE)))
    except Exception as exc:  # noqa: BLE001 - logged, not raised, like the calibration itself
        log.warning("no label weight fitted: %s", exc)
    if ModelFolder(model_dir).plans.has_coarse:
        log.info("header check: %s", describe_flip_check(load_flip_check(model_dir)))
    return cal


@dataclass
class PlanAndTrainResult:
    validation: object  # spinelm.validation.ValidationReport
    plans: object | None = None
    failed_preprocessing: list[str] = field(default_factory=list)
    folds: list[dict] = field(default_factory=list)


def plan_and_train(dataset: str | Path, model_dir: str | Path, device: str | None = None,
                   gpu_memory: float | None = None, time_budget: float | None = None, preset: str | None = None,
                   workers: int | None = None, folds: str | int | None = "0", progress: bool = True,
                   say: Say = log.info, plans_from: str | Path | None = None, **settings) -> PlanAndTrainResult:
    """Validate, fingerprint, plan, preprocess and train, reporting each step through ``say`` as it
    ends. Stops after validation when the dataset has errors (``result.validation.ok`` is False);
    cases that fail preprocessing are left out."""
    from spinelm.planning import summarize
    from spinelm.validation import validate_dataset

    result = PlanAndTrainResult(validate_dataset(dataset, progress=progress))
    for line in result.validation.lines() + [result.validation.summary()]:
        say(line)
    if not result.validation.ok:
        return result
    result.plans = plan_dataset(dataset, model_dir, device, gpu_memory, time_budget, preset, workers, progress,
                                settings.get("precision", "auto"), settings.get("unlabelled", True),
                                settings.get("init"), plans_from)
    say(summarize(result.plans))
    status = preprocess(dataset, model_dir, workers, progress)
    result.failed_preprocessing = sorted(c for c, st in status.items() if st.startswith("failed"))
    if result.failed_preprocessing:
        say(f"preprocessing failed for {', '.join(result.failed_preprocessing)}; training without them")
    result.folds = train(model_dir, folds, device=device, time_budget_min=time_budget, progress=progress, **settings)
    return result


def demo_phantom_config(modality: str = "MR"):
    """Phantoms of the demo: a lumbar protocol (runs of 6-9 vertebrae ending at the sacrum), random
    axis orders and flips, no oblique grids, no transitional vertebrae."""
    from spinelm.synthetic import PhantomConfig

    return PhantomConfig(modality=modality, min_vertebrae=6, max_vertebrae=9, last_label="S1", p_t13=0.0,
                         p_l6=0.0, p_oblique=0.0, p_class=0.0, max_voxels=1_500_000)


@dataclass
class DemoResult:
    evaluation: dict
    batch: object  # spinelm.predict.BatchReport
    minutes: float
    predictions: Path
    ok: bool = True


def demo(out: str | Path = "spinelm_demo", n: int = 20, held_out: int = 6, seed: int = 0, modality: str = "MR",
         time_budget: float = 8.0, unlabelled: int = 0, resume: bool = False, precision: str = "auto",
         progress: bool = True, say: Say = log.info) -> DemoResult | None:
    """Synthesise phantoms, validate, plan for the CPU, preprocess, train fold 0 for ``time_budget``
    minutes, predict the held-out phantoms with the one predictor and evaluate them.

    Returns None when the synthetic dataset does not validate (a bug, reported through ``say``).
    """
    from spinelm.evaluation import evaluate_folders, write_evaluation
    from spinelm.inference import Predictor
    from spinelm.planning import summarize
    from spinelm.predict import predict_directory
    from spinelm.synthetic import synthesize_dataset
    from spinelm.validation import validate_dataset

    t0 = time.perf_counter()
    out = Path(out)
    data, held, model, pred = out / "dataset", out / "heldout", out / "model", out / "predictions"
    cfg = demo_phantom_config(modality)
    say(f"[1/6] synthesising {n} training and {held_out} held-out phantoms ({modality}, lumbar field of view) in {out}")
    synthesize_dataset(data, n, seed=seed, config=cfg, n_unlabelled=unlabelled, progress=progress)
    synthesize_dataset(held, held_out, seed=seed + 1000, config=cfg, progress=progress, prefix="heldout")
    say(f"[2/6] validating {data}")
    report = validate_dataset(data, progress=progress)
    for line in report.lines() + [report.summary()]:
        say("  " + line)
    if not report.ok:
        return None
    say(f"[3/6] fingerprint and plan for the CPU into {model}")
    say(summarize(plan_dataset(data, model, "cpu", None, time_budget, None, None, progress, precision)))
    say("[4/6] preprocessing")
    preprocess(data, model, None, progress)
    say(f"[5/6] training fold 0 for {time_budget:g} min on the CPU (checkpoints in {model / 'fold_0'})")
    r = train(model, 0, time_budget_min=time_budget, device="cpu", seed=seed, validate_every=10_000, resume=resume,
              progress=progress, precision=precision)[0]
    if "coarse" in r:
        say(f"  coarse identification stage: {r['coarse']['epochs_run']} epochs in "
            f"{r['coarse']['elapsed_s'] / 60:.1f} min")
    say(f"  {r['epochs_run']} epochs in {r['elapsed_s'] / 60:.1f} min")
    say(f"[6/6] predicting the held-out phantoms into {pred} and evaluating")
    batch = predict_directory(held / "imagesTr", pred, Predictor.from_model_folder(model, device="cpu"),
                              progress=progress, arguments={"demo": True})
    ev = evaluate_folders(pred, held, all_gt=True)
    write_evaluation(ev, pred)
    return DemoResult(ev, batch, (time.perf_counter() - t0) / 60, pred, batch.ok)


__all__ = ["DemoResult", "PlanAndTrainResult", "demo", "demo_phantom_config", "detect_device", "detect_gpu_memory",
           "parse_folds", "plan_and_train", "plan_dataset", "preprocess", "train"]
