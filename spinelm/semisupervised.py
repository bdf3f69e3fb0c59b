"""Learning from unlabelled scans: withheld-label experiments and anatomically checked pseudo-labels.

- :func:`withhold_labels` turns a labelled dataset into "N labelled + the rest unlabelled" for one
  fold of its cross-validation (deterministic by seed): the fold's validation cases keep their
  labels, N of its training cases keep theirs, the other training cases move to
  ``imagesUnlabelled/``, and ``splits.json`` fixes the fold so that every row of an experiment
  validates on the same scans.
- :func:`pseudo_label` labels the preprocessed unlabelled scans with the network being trained and
  keeps only those whose labelling the ordering model accepts as an anatomically valid, confident
  sequence (:func:`accept`); the accepted ones join the training cases of the fine stage
  (self-training, Lee 2013; with the anatomical check of teacher-student vertebra labelling).
- :func:`coarse_pseudo_labels` hands the fine stage's last accepted pseudo-labels (their centres)
  to the coarse identification stage, which then trains on for a short refresh: its level head
  learns from the labelled runs and from every accepted unlabelled run, not from the labelled
  runs alone.

No SimpleITK at module level: pseudo-labelling runs inside training.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinelm.io.files import atomic_path, read_json, write_json_atomic

log = logging.getLogger(__name__)

#: Fractions of the fine stage's budget after which the unlabelled scans are pseudo-labelled: a
#: first round once the labels have started to hold, a second with the better network.
SELF_TRAINING_ROUNDS = (0.5, 0.75)
#: Prefix of pseudo-labelled cases in the training cache (never a validation case).
PSEUDO_PREFIX = "pseudo__"
#: A pseudo-labelled scan needs at least this many vertebrae in its accepted run.
MIN_VERTEBRAE = 3
#: Every vertebra of an accepted run has this posterior probability (or more) for its label under
#: the ordering model, given all the evidence of the scan. Chosen on 100 withheld whole-spine phantoms
#: labelled by a model trained on 24 (the supervised row of the README's whole-spine table): 0.7
#: accepted 55 with 93.6 % of their labels right and 3 shifted runs; 0.5 accepted 72 (85.0 %, 11
#: shifted); 0.9 accepted 33 (92.4 %, 2 shifted). The label probability of each peak alone (the
#: earlier rule, >= 0.5 each) accepted none of them: one mid-thoracic vertebra of a long run
#: always looks like its neighbours, which is what the ordering resolves.
MIN_POSTERIOR = 0.7
#: Where a prediction carries no posteriors: every vertebra's own label probability (the label's
#: share of the fused fine/coarse label probabilities of its peak) at least this.
MIN_LABEL_PROBABILITY = 0.5
#: Neighbouring centroids of an accepted run are 0.6-1.6 x the run's median distance apart: a
#: missed vertebra (a gap) or a double peak (a split vertebra) is rejected.
GAP_RANGE = (0.6, 1.6)
#: Every vertebra of an accepted run owns this many voxels of the instance mask, or more.
MIN_MASK_VOXELS = 20
#: A pseudo-labelling round stops after this share of the fine stage's budget (the scans it did not
#: reach wait for the next round, which takes the unseen ones first): with thousands of unlabelled
#: scans, labelling them all would take the whole budget.
ROUND_SHARE = 0.15
#: With a coarse identification stage, the coarse stage trains on after the fine stage for this
#: share of its own budget (taken from the fine stage's), on the labelled runs and the fine stage's
#: accepted pseudo-labels: the level head is otherwise bound by the few labelled runs.
COARSE_REFRESH_OF_COARSE = 0.5
#: Where the coarse stage's pseudo-labels come from: ``"own"`` (it labels the unlabelled scans itself
#: right after its training, alone, and trains on for :data:`COARSE_SELF_SHARE` of its own share
#: before the fine stage starts: the fine stage keeps all its time) or ``"fine"`` (the fine stage's
#: accepted pseudo-labels, after the fine stage, for :data:`COARSE_REFRESH_OF_COARSE` of the coarse
#: share taken from the fine stage's).
COARSE_PSEUDO_SOURCE = "own"
#: The part of the coarse stage's share that its own labelling round and refresh get (``"own"``).
COARSE_SELF_SHARE = 1 / 3
#: The coarse stage labelling scans alone accepts a run only when every label's posterior under the
#: ordering is at least this. Measured on 100 withheld whole-spine phantoms labelled by the coarse
#: stage of a model trained on 24 (0.14 s per scan): at 0.7, 37 accepted with 90.8 % of their labels
#: right (3 shifted runs); at 0.8, 28 accepted with 95.9 % right (1 shifted); at 0.9, 19 with 99.4 %.
COARSE_SELF_POSTERIOR = 0.8


def plan_self_training(n_unlabelled: int, n_labelled: int, shares: dict | None = None,
                       coarse_source: str | None = None) -> dict:
    """The plan's ``training.self_training``: when to pseudo-label the unlabelled scans, and why.
    With the stage shares of a plan that has a coarse stage (``{"coarse": c, "fine": f}``), also the
    share of the fold's budget the coarse stage's refresh gets (``coarse_refresh``) and where its
    pseudo-labels come from (``coarse_source``, default :data:`COARSE_PSEUDO_SOURCE`; the caller moves
    the share from the coarse stage's share for ``"own"``, from the fine stage's for ``"fine"``)."""
    rounds = list(SELF_TRAINING_ROUNDS)
    source = coarse_source or COARSE_PSEUDO_SOURCE
    if source not in ("own", "fine"):
        raise ValueError(f"coarse pseudo-label source {source!r}: use 'own' or 'fine'")
    part = COARSE_SELF_SHARE if source == "own" else COARSE_REFRESH_OF_COARSE
    refresh = round(part * float(shares["coarse"]), 4) if shares and shares.get("coarse") else 0.0
    why = (f"{n_unlabelled} unlabelled scan(s) beside {n_labelled} labelled: self-training. After "
           f"{' and '.join(f'{100 * f:.0f} %' for f in rounds)} of the fine stage's budget the network labels them; "
           f"a scan joins the training cases only when the ordering gives an anatomically valid, confident run "
           f"(>= {MIN_VERTEBRAE} consecutive vertebrae, each label >= {MIN_POSTERIOR} probable under the ordering, "
           f"even "
           f"spacing, a mask for each), and the labelled scans keep at least half of the patches. A round stops "
           f"after {100 * ROUND_SHARE:.0f} % of the fine stage's budget (the next round takes the scans not yet seen "
           f"first). No "
           f"pretraining inside the budget (spinelm pretrain runs it separately; --init loads it). "
           + (f"Then the coarse identification stage trains on for {100 * refresh:.0f} % of the budget (taken from "
              f"the fine stage) on the labelled runs and the accepted pseudo-labels, so that its level head learns "
              f"from every accepted run. " if refresh and source == "fine" else "")
           + (f"Before the fine stage, the coarse identification stage labels the unlabelled scans itself (alone, "
              f"accepting runs whose every label is >= {COARSE_SELF_POSTERIOR} probable under the ordering) and "
              f"trains on, on the labelled runs and those, for {100 * refresh:.0f} % of the budget (a third of its "
              f"own share; the fine stage keeps its time), so that its level head learns from every accepted run. "
              if refresh and source == "own" else "")
           + "--no-unlabelled turns this off")
    out = {"rounds": rounds, "scans": int(n_unlabelled), "round_share": ROUND_SHARE, "why": why}
    if refresh:
        out["coarse_refresh"] = refresh
        out["coarse_source"] = source
    return out


def refresh_source(raw: dict) -> str:
    """The stage whose share the plan's coarse refresh was taken from: ``coarse`` (the coarse stage
    labels the scans itself) or ``fine``."""
    st = (raw.get("training") or {}).get("self_training") or {}
    return "coarse" if st.get("coarse_source") == "own" else "fine"


def without_coarse_refresh(raw: dict) -> dict:
    """The plan's stage shares with an earlier coarse refresh's share given back to the stage it was
    taken from (a plan adopted from a self-training plan, for a run without unlabelled scans); updates
    ``raw``."""
    shares = dict(raw.get("budget", {}).get("stage_shares") or {})
    if "coarse_refresh" in shares:
        back = float(shares.pop("coarse_refresh"))
        stage = refresh_source(raw)
        shares[stage] = round(float(shares.get(stage, 0.0)) + back, 4)
        raw["budget"]["stage_shares"] = shares
    return shares


def add_self_training(raw: dict, n_unlabelled: int, n_labelled: int, coarse_source: str | None = None) -> dict:
    """Give the plan ``raw`` its ``training.self_training`` (:func:`plan_self_training`) and its
    reason; with a coarse stage, the coarse refresh's share of the budget moves from the coarse
    stage's share (``coarse_source`` ``"own"``, the default) or the fine stage's (``"fine"``) to
    ``budget.stage_shares.coarse_refresh``. Returns the self-training entry."""
    if (coarse_source or COARSE_PSEUDO_SOURCE) not in ("own", "fine"):
        raise ValueError(f"coarse pseudo-label source {coarse_source!r}: use 'own' or 'fine'")
    shares = without_coarse_refresh(raw)
    coarse = "coarse" in raw["configurations"]
    st = raw["training"]["self_training"] = plan_self_training(
        n_unlabelled, n_labelled, {"coarse": shares.get("coarse", 0.25)} if coarse else None, coarse_source)
    if st.get("coarse_refresh") and st["coarse_source"] == "own":
        shares.setdefault("coarse", 0.25)
        shares.setdefault("fine", round(1.0 - float(shares["coarse"]), 4))
        coarse_before = float(shares["coarse"])
        shares.update({"coarse": round(coarse_before - st["coarse_refresh"], 4),
                       "coarse_refresh": st["coarse_refresh"]})
        budget = raw.setdefault("budget", {})
        budget["stage_shares"] = shares
        if budget.get("affordable_steps_coarse") and coarse_before > 0:  # counted for the whole coarse share
            st["why"] += (f"; the coarse stage's first training keeps {100 * shares['coarse']:.0f} % of the budget, "
                          f"about {int(budget['affordable_steps_coarse'] * shares['coarse'] / coarse_before)} steps at "
                          f"the measured step")
    elif st.get("coarse_refresh"):
        shares.setdefault("coarse", 0.25)
        fine = float(shares.get("fine", 1.0 - float(shares["coarse"])))
        shares.update({"fine": round(fine - st["coarse_refresh"], 4), "coarse_refresh": st["coarse_refresh"]})
        budget = raw.setdefault("budget", {})
        budget["stage_shares"] = shares
        if budget.get("affordable_steps") and fine > 0:  # the plan counted its steps for the whole fine share
            st["why"] += (f"; the fine stage keeps {100 * shares['fine']:.0f} % of the budget, about "
                          f"{int(budget['affordable_steps'] * shares['fine'] / fine)} steps at the measured step, less "
                          f"the pseudo-labelling rounds")
    raw.setdefault("rationale", []).append(st["why"])
    return st


def _image_digest(paths) -> str:
    """Digest of a scan's voxels (identical scans under two names share a fold)."""
    import SimpleITK as sitk

    h = hashlib.sha1()
    for p in paths:
        h.update(sitk.GetArrayFromImage(sitk.ReadImage(str(p))).tobytes())
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path, symlink: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if symlink:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


#: How :func:`withhold_labels` picks the cases that keep their labels.
CHOICES = ("random", "diverse")


def scan_descriptors(images: list[list[Path]]) -> np.ndarray:
    """One row per scan (its first channel): log voxel spacing and log physical extent (each sorted,
    so that storage orientation does not matter) and log intensity at the 50th and 99th percentile of
    the non-zero voxels: what tells scanners and protocols apart."""
    from spinelm.io.image import load_volume

    rows = []
    for paths in images:
        arr, geom = load_volume(paths[0])
        spacing = np.sort(np.asarray(geom.spacing, float))
        extent = np.sort(np.asarray(arr.shape[::-1], float) * np.asarray(geom.spacing, float))
        vals = arr[arr != 0] if np.any(arr != 0) else arr.ravel()
        p50, p99 = np.percentile(vals, [50, 99])
        rows.append([*np.log(spacing), *np.log(np.maximum(extent, 1e-3)),
                     np.log1p(max(float(p50), 0.0)), np.log1p(max(float(p99), 0.0))])
    return np.asarray(rows, float)


def diverse_choice(descriptors: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """``n`` row indices that cover the descriptors (greedy k-centre): first the scan closest to the
    mean, then each time the scan farthest from all chosen ones (standardised columns; ``seed``
    only breaks ties). Deterministic."""
    x = np.asarray(descriptors, float)
    std = x.std(0)
    z = (x - x.mean(0)) / np.where(std > 1e-9, std, 1.0)
    order = np.random.default_rng(seed).permutation(len(z))  # tie-breaking only
    z = z[order]
    chosen = [int(np.argmin(np.linalg.norm(z, axis=1)))]
    dist = np.linalg.norm(z - z[chosen[0]], axis=1)
    dist[chosen[0]] = -1.0  # never picked twice, even among identical scans
    while len(chosen) < n:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(z - z[nxt], axis=1))
        dist[chosen] = -1.0
    return [int(order[i]) for i in chosen]


def withhold_labels(source: str | os.PathLike, out: str | os.PathLike, n_labelled: int, fold: int = 0,
                    n_folds: int = 5, seed: int = 0, symlink: bool = True, choose: str = "random") -> dict:
    """Write ``out``: ``source`` with the labels of all but ``n_labelled`` training cases of ``fold``
    withheld (their images in ``imagesUnlabelled/``).

    The folds are those ``spinelm train`` makes for ``source`` (:func:`spinelm.training.make_splits`,
    identical scans grouped); ``out/splits.json`` holds one fold (the N labelled cases for training,
    fold ``fold``'s validation cases) and ``out/withheld.json`` records what was done. Which N cases
    keep their labels: ``choose="random"`` draws them with ``seed``; ``"diverse"`` picks scans that
    cover the training scans' spacing, extent and intensity (:func:`diverse_choice`), so that a small
    labelled set does not come from one scanner or protocol only. Returns the record.
    """
    if choose not in CHOICES:
        raise ValueError(f"unknown choice {choose!r}; expected one of {', '.join(CHOICES)}")
    from spinelm.dataset import discover_dataset
    from spinelm.training import make_splits

    ds = discover_dataset(source)
    errors = [p for p in ds.problems if p.severity == "error"]
    if errors:
        raise ValueError(f"{source}: the dataset has errors (run 'spinelm validate {source}'): {errors[0].message}")
    ids = sorted(c.case_id for c in ds.cases)
    if ds.splits:
        splits = [dict(f) for f in ds.splits]
    else:
        digests = {c.case_id: _image_digest(c.images) for c in ds.cases}
        splits = make_splits(ids, n_folds, digests)
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} does not exist; {source} has folds 0-{len(splits) - 1}")
    train, val = list(splits[fold]["train"]), list(splits[fold]["val"])
    if not 1 <= n_labelled <= len(train):
        raise ValueError(f"--labelled must be between 1 and the fold's {len(train)} training cases, got {n_labelled}")
    by_id = {c.case_id: c for c in ds.cases}
    if choose == "diverse":
        picked = diverse_choice(scan_descriptors([by_id[c].images for c in train]), n_labelled, seed)
    else:
        picked = np.random.default_rng(seed).choice(len(train), n_labelled, replace=False)
    keep = sorted(train[i] for i in picked)
    withheld = sorted(set(train) - set(keep))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder")
    for cid in keep + val:
        case = by_id[cid]
        for p in case.images:
            _link_or_copy(p, out / "imagesTr" / p.name, symlink)
        if case.mask is not None:
            _link_or_copy(case.mask, out / "labelsTr" / case.mask.name, symlink)
        if case.centroids is not None:
            _link_or_copy(case.centroids, out / "centroidsTr" / case.centroids.name, symlink)
        if case.scribbles is not None:
            _link_or_copy(case.scribbles, out / "scribblesTr" / case.scribbles.name, symlink)
        if case.boxes is not None:
            _link_or_copy(case.boxes, out / "boxesTr" / case.boxes.name, symlink)
    for cid in withheld:
        for p in by_id[cid].images:
            _link_or_copy(p, out / "imagesUnlabelled" / p.name, symlink)
    for c in ds.unlabelled:
        for p in c.images:
            _link_or_copy(p, out / "imagesUnlabelled" / p.name, symlink)
    if (Path(source) / "dataset.json").is_file():
        shutil.copy2(Path(source) / "dataset.json", out / "dataset.json")
    classes = Path(source) / "classesTr.csv"
    if classes.is_file():
        with open(classes, newline="") as fh:
            rows = list(csv.reader(fh))
        with atomic_path(out / "classesTr.csv") as tmp, open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(rows[:1] + [r for r in rows[1:] if r and r[0] in set(keep + val)])
    write_json_atomic(out / "splits.json", [{"train": keep, "val": sorted(val)}])
    record = {"source": str(Path(source).resolve()), "fold": fold, "n_folds": len(splits), "seed": seed,
              "choose": choose,
              "labelled": keep, "validation": sorted(val), "withheld": withheld,
              "unlabelled_before": sorted(c.case_id for c in ds.unlabelled)}
    write_json_atomic(out / "withheld.json", record)
    return record


@dataclass
class Verdict:
    """Whether a pseudo-labelled scan is accepted, and why not."""

    accepted: bool
    reasons: list = field(default_factory=list)


def accept(result, distance_mm: float | None = None, min_posterior: float = MIN_POSTERIOR) -> Verdict:
    """Accept a prediction (:class:`spinelm.inference.CaseResult` on the preprocessed grid) as a
    pseudo-label only when the ordering model's sequence is anatomically valid and confident:

    - at least :data:`MIN_VERTEBRAE` vertebrae, labelled as one consecutive run (the ordering's
      output; a skipped level is rejected),
    - every vertebra's label has posterior >= ``min_posterior`` under the ordering model (without
      posteriors: its own label probability >= :data:`MIN_LABEL_PROBABILITY`),
    - neighbouring centroids neither too close nor too far apart (:data:`GAP_RANGE`),
    - every vertebra owns voxels of the instance mask (when the prediction has one).
    """
    from spinelm import labels as L

    reasons = []
    lab = result.labelled
    landmarks = result.landmarks
    if len(landmarks) < MIN_VERTEBRAE:
        return Verdict(False, [f"{len(landmarks)} vertebra(e) found (< {MIN_VERTEBRAE})"])
    order = np.argsort([L.cranio_caudal_rank(lm.label) for lm in landmarks], kind="stable")
    seq = [landmarks[i].label for i in order]
    if any(b not in L.successors(a) for a, b in zip(seq, seq[1:])):
        reasons.append("the labels skip a level")
    posterior = list(getattr(lab, "posterior", None) or [])
    if len(posterior) == len(lab.labels):
        if min(posterior) < min_posterior:
            worst = int(np.argmin(posterior))
            reasons.append(f"{L.name_of(lab.labels[worst])} has posterior {posterior[worst]:.2f} under the ordering "
                           f"(< {min_posterior:g})")
    else:
        probs = [lab.candidates[i].label_probs.get(label, 0.0) for i, label in zip(lab.kept, lab.labels)]
        if min(probs) < MIN_LABEL_PROBABILITY:
            worst = int(np.argmin(probs))
            reasons.append(f"{L.name_of(lab.labels[worst])} has label probability {probs[worst]:.2f} "
                           f"(< {MIN_LABEL_PROBABILITY})")
    pos = np.asarray([lm.position_mm for lm in landmarks])[order]
    steps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    med = float(np.median(steps))
    if med <= 0 or np.any(steps < GAP_RANGE[0] * med) or np.any(steps > GAP_RANGE[1] * med):
        reasons.append(f"uneven spacing of neighbouring vertebrae ({steps.min():.0f}-{steps.max():.0f} mm, "
                       f"median {med:.0f} mm)")
    if result.instance_mask is not None:
        counts = np.bincount(np.asarray(result.instance_mask).ravel().clip(0), minlength=L.MAX_LABEL + 1)
        empty = [lm.name for lm in landmarks if counts[lm.label] < MIN_MASK_VOXELS]
        if empty:
            reasons.append(f"no mask for {', '.join(empty)}")
    return Verdict(not reasons, reasons)


def write_case(cache: Path, name: str, data: np.ndarray, seg: np.ndarray, props: dict) -> None:
    """One training case in a cache (``NAME_data.npy``, ``NAME_seg.npy``, ``NAME.json``), atomically."""
    for suffix, arr in (("_data.npy", data), ("_seg.npy", seg)):
        with atomic_path(Path(cache) / f"{name}{suffix}") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(arr))
    write_json_atomic(Path(cache) / f"{name}.json", props)


def remove_cases(cache: Path, names) -> None:
    """Remove the files of the cases ``names`` from a cache."""
    for name in names:
        for suffix in (".json", "_data.npy", "_seg.npy"):
            (Path(cache) / f"{name}{suffix}").unlink(missing_ok=True)


def pseudo_cases(cache: Path, prefix: str = PSEUDO_PREFIX) -> list[str]:
    """The pseudo-labelled cases in a training cache."""
    return sorted(p.name[:-5] for p in Path(cache).glob(f"{prefix}*.json"))


def round_order(cases: list[str], seen: list[str], seed) -> list[str]:
    """The order a round labels the unlabelled scans in: those no round has seen first, then the
    others (each group shuffled with ``seed``), so that rounds cut short by their time cap together
    reach every scan."""
    rng = np.random.default_rng(seed)
    seen_set = set(seen)
    new, old = [c for c in cases if c not in seen_set], [c for c in cases if c in seen_set]
    return [new[i] for i in rng.permutation(len(new))] + [old[i] for i in rng.permutation(len(old))]


def pseudo_label(predictor, unlabelled_cache: Path, cache: Path, plans, coarse_cache: Path | None = None,
                 prefix: str = PSEUDO_PREFIX, progress: bool = False, max_seconds: float | None = None,
                 order: list[str] | None = None, min_posterior: float = MIN_POSTERIOR,
                 centres_only: bool = False) -> dict:
    """Label the preprocessed unlabelled scans of ``unlabelled_cache`` with ``predictor`` (in
    ``order``, by default the cache's; until ``max_seconds`` have passed, at least one scan) and write
    the accepted ones to the training ``cache`` as ``{prefix}{case}`` (data, segmentation target,
    centroids; with ``centres_only`` the labelled centres alone, for the coarse stage's level head: no
    mask, and its heatmap does not learn them). An earlier pseudo-label with that prefix is replaced
    when its scan is labelled again and removed when it is now rejected; one whose scan this round did
    not reach stays. Returns
    ``{"accepted": [...] (every pseudo-label in the cache now), "rejected": {case: reasons}, "scans":
    unlabelled scans, "examined": [scans labelled this round], "new": accepted this round}``."""
    import time

    from tqdm import tqdm

    from spinelm.io.image import Frame, Geometry
    from spinelm.preprocessing import label_lookup

    unlabelled_cache, cache = Path(unlabelled_cache), Path(cache)
    before = pseudo_cases(cache, prefix)
    cases = read_json(unlabelled_cache / "cache.json")["cases"] if (unlabelled_cache / "cache.json").is_file() else []
    if order is not None:
        listed = set(cases)
        cases = [c for c in order if c in listed]
    lut = label_lookup(plans.raw)
    accepted, rejected, examined = [], {}, []
    t0 = time.perf_counter()
    for case in tqdm(cases, desc="pseudo-labelling", unit="scan", disable=not progress):
        if max_seconds is not None and examined and time.perf_counter() - t0 > max_seconds:
            break
        examined.append(case)
        props = read_json(unlabelled_cache / f"{case}.json")
        data = np.load(unlabelled_cache / f"{case}_data.npy")
        frame = Frame.from_info(Geometry.from_json(props["canonical_geometry"]), plans.transpose_forward, props)
        coarse = None
        if predictor.uses_coarse and coarse_cache is not None:
            if not (coarse_cache / f"{case}.json").is_file():
                rejected[case] = ["not preprocessed for the coarse stage"]
                continue
            cprops = read_json(coarse_cache / f"{case}.json")
            coarse = (np.load(coarse_cache / f"{case}_data.npy"),
                      Frame.from_info(Geometry.from_json(cprops["canonical_geometry"]), plans.transpose_forward, cprops))
        result = predictor.predict_preprocessed(data, frame, coarse=coarse, **({"with_mask": False} if centres_only
                                                                                else {}))
        verdict = accept(result, plans.distance_mm, min_posterior)
        if not verdict.accepted:
            rejected[case] = verdict.reasons
            continue
        has_mask = result.instance_mask is not None  # a plan without a segmentation head has none
        mask = np.asarray(result.instance_mask) if has_mask else np.zeros(data.shape[1:], np.int16)
        seg = lut[np.clip(mask, 0, len(lut) - 1)][None]
        if (unlabelled_cache / f"{case}_seg.npy").is_file():  # keep the outside-the-body marker (-1)
            seg = np.where(np.load(unlabelled_cache / f"{case}_seg.npy")[:1] < 0, -1, seg)
        seg = seg.astype(np.int8 if int(seg.max(initial=0)) < 127 else np.int16)
        vox = frame.from_world(np.asarray([lm.position_mm for lm in result.landmarks]).reshape(-1, 3))
        name = f"{prefix}{case}"
        out_props = {**props, "case": name, "has_mask": has_mask, "partial_mask": False, "landmarks_from_mask": False,
                     "pseudo_label": True, "classes": [], "landmarks_known": not centres_only,
                     "landmarks": [{"label": lm.label, "index": [round(float(v), 3) for v in p],
                                    "position_mm": list(lm.position_mm)} for lm, p in zip(result.landmarks, vox)]}
        write_case(cache, name, data, seg, out_props)
        accepted.append(name)
    redone = {f"{prefix}{c}" for c in examined}
    remove_cases(cache, (set(before) & redone) - set(accepted))  # earlier pseudo-labels this round did not confirm
    return {"accepted": sorted(set(accepted) | (set(before) - redone)), "rejected": rejected,
            "scans": len(cases), "examined": examined, "new": accepted}


def coarse_pseudo_labels(cache: Path, coarse_unlabelled_cache: Path, coarse_cache: Path, plans, cases: list[str],
                         prefix: str = PSEUDO_PREFIX) -> list[str]:
    """Write the fine stage's accepted pseudo-labels ``cases`` (names in the fine ``cache``, each
    ``{prefix}{scan}``) to the coarse stage's ``coarse_cache`` under the same names: the scan as
    preprocessed for the coarse stage (from ``coarse_unlabelled_cache``) and the accepted centres
    mapped to its grid through world coordinates. No mask (``has_mask`` false): the coarse stage's
    segmentation learns from the labelled scans only; its heatmap and level head learn from the
    centres. Earlier coarse pseudo-labels with ``prefix`` that are not in ``cases`` are removed.
    Returns the names written (a scan missing from the coarse cache is left out)."""
    from spinelm.io.image import Frame, Geometry

    cache, coarse_unlabelled_cache, coarse_cache = Path(cache), Path(coarse_unlabelled_cache), Path(coarse_cache)
    before = pseudo_cases(coarse_cache, prefix)
    written = []
    for name in cases:
        scan = name[len(prefix):] if name.startswith(prefix) else name
        src = coarse_unlabelled_cache / f"{scan}.json"
        if not src.is_file() or not (cache / f"{name}.json").is_file():
            log.warning("pseudo-label %s has no coarse-stage preprocessing; the coarse refresh leaves it out", name)
            continue
        props, cprops = read_json(cache / f"{name}.json"), read_json(src)
        frame = Frame.from_info(Geometry.from_json(cprops["canonical_geometry"]), plans.transpose_forward, cprops)
        pos = np.asarray([lm["position_mm"] for lm in props["landmarks"]], float).reshape(-1, 3)
        vox = frame.from_world(pos)
        data = np.load(coarse_unlabelled_cache / f"{scan}_data.npy", mmap_mode="r")
        seg = np.zeros((1, *data.shape[1:]), np.int8)
        if (coarse_unlabelled_cache / f"{scan}_seg.npy").is_file():  # keep the outside-the-body marker (-1)
            seg = np.where(np.load(coarse_unlabelled_cache / f"{scan}_seg.npy")[:1] < 0, -1, 0).astype(np.int8)
        write_case(coarse_cache, name, data, seg, {
            **cprops, "case": name, "has_mask": False, "partial_mask": False, "landmarks_from_mask": False,
            "pseudo_label": True, "classes": [], "landmarks_known": True,
            "landmarks": [{"label": int(lm["label"]), "index": [round(float(v), 3) for v in p],
                           "position_mm": [float(v) for v in lm["position_mm"]]}
                          for lm, p in zip(props["landmarks"], vox)]})
        written.append(name)
    remove_cases(coarse_cache, set(before) - set(written))
    return written
