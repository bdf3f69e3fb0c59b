"""Per-vertebra confidence: the probability that a predicted vertebra is identified (right label
within 20 mm, the VerSe criterion), from signals the pipeline already has, calibrated on the
cross-validation folds.

Signals of a kept vertebra (:func:`vertebra_features`):

- ``heatmap``: its heatmap peak value (is there a vertebra here?);
- ``label_prob``: the probability its own label has in the (fused) label evidence;
- ``shift_margin``: how much better the whole run's labels explain the evidence than the same
  run shifted one level up or down (log-likelihood per vertebra), the error users meet most;
- ``spacing``: how far the distances to its labelled neighbours are from the expected ones
  (``|log(observed / expected)|``, 0 when it has none);
- ``run_label_prob``: the mean of ``label_prob`` over the whole run (the same for every vertebra of
  a case). Errors come by case (a shifted run makes all its labels wrong), and a case whose labels
  are unsure overall is where a single vertebra's evidence misleads: on lumbar MR (32 scans of 5
  folds, each scored by a fit on the other folds) it lowered the held-out calibration error from
  0.121 to 0.051;
- ``posterior``: the probability of its label under the ordering model given all the evidence of
  the case (:func:`spinelm.ordering.label_marginals`: every labelling of the run summed, not just
  the best one), which needs no fitting.

A logistic model on the first five (:class:`Calibration`) is fitted by ``spinelm calibrate MODEL``
(and at the end of training) on every fold's validation cases, run through the same predictor, and
stored in ``MODEL/calibration.json``; prediction then writes ``confidence`` for every vertebra. A fit
needs wrong vertebrae to learn from: with fewer than :data:`MIN_OUTCOMES` wrong (or right) ones the
stored model is the ordering's posterior itself. Measured on real lumbar MR (5 folds of 3-minute
float32 training, each fold's fit scored on the other four folds' 142-147 vertebrae): a logistic fit
on a fold whose validation held no wrong vertebra (3 of the 5 folds) read 0.238-0.246 expected
calibration error, the posterior 0.065-0.092. Without a calibration file no confidence is written.
With two or more folds, the error on vertebrae the fit has not seen is measured too, by fitting on
all folds but one (:func:`cross_fitted`). No SimpleITK here.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinelm import labels as L

log = logging.getLogger(__name__)

FEATURES = ("heatmap", "label_prob", "shift_margin", "spacing", "run_label_prob", "posterior")
#: The features of the logistic model (adding ``posterior`` to them changed the held-out error by
#: -0.005 on lumbar MR and +0.014 on classification phantoms, both within sampling noise).
FITTED_FEATURES = FEATURES[:5]
#: A logistic fit needs at least this many wrong and this many right vertebrae; with fewer the
#: confidence is the ordering's posterior (``method: "posterior"``).
MIN_OUTCOMES = 10
#: ... and its wrong vertebrae must come from at least this many validation cases: errors come by case
#: (a level shift makes every label of a scan wrong), so 13 wrong vertebrae of 2 scans are 2 examples,
#: not 13. On real lumbar MR (5 folds of 3-minute float32 training, the ordering with step
#: directions) a fit on the errors of 2 scans read 0.70 expected calibration error on a held-out fold
#: where the ordering's posterior read 0.15.
MIN_WRONG_CASES = 3
#: L2 penalty of the logistic fit (on standardised features): a few hundred validation vertebrae
#: must not give extreme weights.
L2_PENALTY = 1.0
#: Vertebrae below this confidence make a case ``review``.
REVIEW_BELOW = 0.5
#: Calibration file in the model folder.
CALIBRATION_FILE = "calibration.json"
#: The ordering's weight of the label evidence fitted on the validation cases (:func:`fit_ordering`).
ORDERING_FILE = "ordering.json"


def _log(p: float) -> float:
    return float(np.log(max(p, 1e-4)))


def vertebra_features(labelled, distance_mm: float) -> np.ndarray:
    """Features (:data:`FEATURES`) of each kept vertebra of a :class:`spinelm.inference.Labelled`, head to foot."""
    kept, labels = list(labelled.kept), list(labelled.labels)
    n = len(kept)
    if n == 0:
        return np.zeros((0, len(FEATURES)))
    cands = [labelled.candidates[i] for i in kept]
    coords = {lab: L.level_coordinate(lab) for c in cands for lab in c.label_probs}
    # run-level margin against the run shifted by one level (labels by level coordinate)
    by_coord = {}
    for lab, x in coords.items():
        by_coord.setdefault(x, lab)

    def run_loglik(offset: int) -> float:
        total = 0.0
        for c, lab in zip(cands, labels):
            other = by_coord.get(L.level_coordinate(lab) + offset)
            total += _log(c.label_probs.get(other, 0.0)) if other is not None else _log(0.0)
        return total

    own = run_loglik(0)
    margin = (own - max(run_loglik(1), run_loglik(-1))) / n
    pos = labelled.candidate_world_mm[kept]
    feats = []
    for i, (c, lab) in enumerate(zip(cands, labels)):
        devs = []
        for j in (i - 1, i + 1):
            if 0 <= j < n:
                steps = abs(L.level_coordinate(labels[j]) - L.level_coordinate(lab)) or 1.0
                observed = float(np.linalg.norm(pos[j] - pos[i]))
                devs.append(abs(np.log(max(observed, 1e-3) / (steps * distance_mm))))
        feats.append([c.score, c.label_probs.get(lab, 0.0), margin, max(devs) if devs else 0.0])
    feats = np.asarray(feats, dtype=np.float64)
    posterior = np.asarray(labelled.posterior if len(labelled.posterior) == n else np.full(n, np.nan), float)
    return np.column_stack([feats, np.full(n, feats[:, 1].mean()), posterior])


def judged_flags(labelled, gt_mm: dict[int, np.ndarray], radius_mm: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """For each kept vertebra: is it identified (``spinelm evaluate``'s VerSe rule,
    :func:`spinelm.evaluation.identification`), and does the annotation judge it at all (False for a
    label outside the annotated range, :func:`spinelm.evaluation.beyond_annotation`: e.g. a T12 in
    view of a scan annotated L1-L5, which is neither right nor wrong)?"""
    from spinelm.evaluation import identification

    pred = {lab: labelled.candidate_world_mm[i] for i, lab in zip(labelled.kept, labelled.labels)}
    r = identification(pred, gt_mm, radius_mm) if pred and gt_mm else {"identified": [], "beyond_annotation": []}
    ok, beyond = set(r["identified"]), set(r["beyond_annotation"])
    return (np.asarray([lab in ok for lab in labelled.labels], dtype=bool),
            np.asarray([lab not in beyond for lab in labelled.labels], dtype=bool))


def expected_calibration_error(prob, outcome, bins: int = 10) -> float:
    """ECE with equal-width bins: the mean |accuracy - confidence| weighted by bin size."""
    prob, outcome = np.asarray(prob, float), np.asarray(outcome, float)
    if not len(prob):
        return float("nan")
    idx = np.minimum((prob * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(outcome[sel].mean() - prob[sel].mean())
    return float(ece)


def ece_noise_floor(prob, n_draws: int = 2000, seed: int = 0) -> dict:
    """The expected calibration error a *perfectly calibrated* confidence shows on this many vertebrae
    with these confidences (outcomes drawn as Bernoulli(p), ``n_draws`` times): ``{"mean", "p95"}``.

    ECE over 10 bins is biased upwards on small samples: on 190 lumbar vertebrae a perfect
    confidence reads about 0.07, so a measured value below ``p95`` is not evidence of miscalibration
    and a target below ``mean`` cannot be shown on that sample."""
    prob = np.asarray(prob, float)
    if not len(prob):
        return {"mean": float("nan"), "p95": float("nan")}
    rng = np.random.default_rng(seed)
    draws = [expected_calibration_error(prob, rng.random(len(prob)) < prob) for _ in range(n_draws)]
    return {"mean": float(np.mean(draws)), "p95": float(np.percentile(draws, 95))}


def reliability_bins(prob, outcome, bins: int = 10) -> list[dict]:
    """Per-bin mean confidence, accuracy and count (for a reliability diagram)."""
    prob, outcome = np.asarray(prob, float), np.asarray(outcome, float)
    idx = np.minimum((prob * bins).astype(int), bins - 1)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "n": int((idx == b).sum()),
             "confidence": float(prob[idx == b].mean()) if (idx == b).any() else None,
             "accuracy": float(outcome[idx == b].mean()) if (idx == b).any() else None} for b in range(bins)]


@dataclass
class Calibration:
    """A logistic model ``p = sigmoid(w . (x - mean) / std + b)`` over ``features`` (columns of
    :data:`FEATURES`), or (``method == "posterior"``) the ordering's posterior as it is."""

    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    fitted_on: dict
    features: tuple = FITTED_FEATURES
    method: str = "logistic"

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, float).reshape(-1, len(FEATURES))
        if self.method == "posterior":  # (the label's own probability where no posterior was computed)
            post = x[:, FEATURES.index("posterior")]
            return np.clip(np.where(np.isfinite(post), post, x[:, FEATURES.index("label_prob")]), 0.0, 1.0)
        x = (x[:, [FEATURES.index(f) for f in self.features]] - self.mean) / self.std
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.weights) + self.bias)))

    @classmethod
    def fit(cls, features: np.ndarray, outcome: np.ndarray, min_outcomes: int = MIN_OUTCOMES,
            wrong_cases: int | None = None, min_wrong_cases: int = MIN_WRONG_CASES, **info) -> "Calibration":
        """Penalised maximum likelihood (L-BFGS) of the logistic model on :data:`FITTED_FEATURES`; with
        fewer than ``min_outcomes`` wrong or right vertebrae, or wrong ones from fewer than
        ``min_wrong_cases`` validation cases (``wrong_cases``, when given), the ordering's posterior instead."""
        from scipy.optimize import minimize

        x_all = np.asarray(features, float).reshape(-1, len(FEATURES))
        y = np.asarray(outcome, float)
        if not len(y):
            raise ValueError("no validation vertebra to calibrate on (are the folds trained?)")
        wrong = int(len(y) - y.sum())
        why = None
        if min(wrong, len(y) - wrong) < min_outcomes:
            why = (f"{wrong} wrong and {len(y) - wrong} right validation vertebrae, fewer than {min_outcomes} of either "
                   f"to fit on")
        elif wrong_cases is not None and wrong_cases < min_wrong_cases:
            why = (f"the {wrong} wrong validation vertebrae come from {wrong_cases} case(s), fewer than "
                   f"{min_wrong_cases}: a case's errors come together, so that is too few examples to fit on")
        if why is not None:
            model = cls([], [], [], 0.0, {}, (), "posterior")
            model.fitted_on = {"vertebrae": int(len(y)), "identified_share": float(y.mean()),
                               "ece": expected_calibration_error(model(x_all), y), "method": "posterior",
                               "why": why, **info}
            return model
        x = x_all[:, [FEATURES.index(f) for f in FITTED_FEATURES]]
        mean, std = x.mean(0), x.std(0)
        std[std < 1e-6] = 1.0
        z = (x - mean) / std
        rate = float(np.clip(y.mean(), 0.01, 0.99))

        def loss(theta):
            w, b = theta[:-1], theta[-1]
            s = z @ w + b
            nll = np.sum(np.logaddexp(0, s) - y * s)
            p = 1 / (1 + np.exp(-s))
            grad = np.append(z.T @ (p - y), np.sum(p - y))
            return nll + 0.5 * L2_PENALTY * w @ w, grad + np.append(L2_PENALTY * w, 0.0)

        theta0 = np.append(np.zeros(z.shape[1]), np.log(rate / (1 - rate)))
        res = minimize(loss, theta0, jac=True, method="L-BFGS-B")
        model = cls(mean.tolist(), std.tolist(), res.x[:-1].tolist(), float(res.x[-1]), {})
        model.fitted_on = {"vertebrae": int(len(y)), "identified_share": float(y.mean()),
                           "ece": expected_calibration_error(model(x_all), y), "method": "logistic", **info}
        return model

    def save(self, path: str | os.PathLike) -> Path:
        from spinelm.io.files import write_json_atomic

        return write_json_atomic(path, {"format": "spinelm-calibration", "version": 1, "method": self.method,
                                        "features": list(self.features), "mean": self.mean, "std": self.std,
                                        "weights": self.weights, "bias": self.bias, "fitted_on": self.fitted_on})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration | None":
        from spinelm.io.files import read_model_file

        def problem(doc):
            if doc.get("method", "logistic") not in ("logistic", "posterior"):
                return f"an unknown method ({doc.get('method')})"
            unknown = [f for f in doc.get("features") or [] if f not in FEATURES]
            if unknown:
                return f"made for other features ({unknown})"
            if doc.get("method", "logistic") == "logistic" and len(doc.get("features") or []) != len(doc.get("weights") or []):
                return "its features and weights do not match"
            return None

        raw = read_model_file(path, problem, "no confidences")
        if raw is None:
            return None
        return cls(raw["mean"], raw["std"], raw["weights"], float(raw["bias"]), raw.get("fitted_on", {}),
                   tuple(raw.get("features") or ()), raw.get("method", "logistic"))


def collect(model_dir, folds: list[int] | None = None, device: str = "cpu", progress: bool = True,
            flips: list | None = None, labelled: list | None = None):
    """Features and outcomes of every validation vertebra of the trained folds (each fold's final
    checkpoint on its own validation cases, through the one predictor); also returns per-case
    records ``(fold, case, confidence features, outcomes, n ground truth)``. ``flips``: a list that
    receives ``(fold, rows)`` for every validation case of a model with a coarse stage: the
    turned-over comparison's rows of the scan as stored and turned every way
    (:func:`spinelm.sanity.fit_flip_check`). ``labelled``: a list that receives ``(fold, case,
    labelled, annotated centres {label: mm})`` of every validation case (to order again,
    :func:`fit_ordering`)."""
    from tqdm import tqdm

    from spinelm.inference import Predictor
    from spinelm.plans import ModelFolder
    from spinelm.training import _cached_case

    model = ModelFolder(model_dir)
    splits = json.loads(model.splits_path.read_text())
    folds = folds if folds is not None else [f for f in range(len(splits))
                                             if model.checkpoint(f, "final").is_file()]
    if not folds:
        raise FileNotFoundError(f"{model_dir}: no trained fold (checkpoint_final.pt) to calibrate on")
    records = []
    for fold in folds:
        pred = Predictor.from_model_folder(model.root, folds=[fold], device=device)
        for case in tqdm(splits[fold]["val"], desc=f"calibrating on fold {fold}", disable=not progress):
            data, frame, props = _cached_case(model.cache_dir(), case, pred.plans)
            coarse = _cached_case(model.cache_dir("coarse"), case, pred.plans)[:2] if pred.uses_coarse else None
            res = pred.predict_preprocessed(data, frame, with_mask=False, coarse=coarse)
            if flips is not None and coarse is not None:
                flips.append((fold, pred.turned_over(*coarse, res.coarse_outputs)))
            gt = {int(lm["label"]): np.asarray(lm["position_mm"], float) for lm in props["landmarks"]}
            if labelled is not None:
                labelled.append((fold, case, res.labelled, gt))
            records.append(case_record(fold, case, res.labelled, gt, pred.plans.distance_mm))
    return records


def case_record(fold: int, case: str, labelled, gt: dict, distance_mm: float) -> tuple:
    """``(fold, case, confidence features, outcomes, n ground truth)`` of one validation case; labels
    outside the annotated range teach nothing and are left out."""
    identified, known = judged_flags(labelled, gt)
    return fold, case, vertebra_features(labelled, distance_mm)[known], identified[known], len(gt)


def fit_ordering(model_dir, labelled: list) -> tuple[dict, list]:
    """Fit the ordering's weight of the label evidence (:func:`spinelm.ordering.fit_label_weight`) on
    validation cases (``(fold, case, labelled, annotated centres)``, from :func:`collect`) and store it
    in ``MODEL/ordering.json``; returns what was stored, and the cases ordered again with the fitted
    weight (``(fold, case, labelled, annotated centres)``)."""
    from spinelm.inference import order_labelled
    from spinelm.io.files import write_json_atomic
    from spinelm.ordering import fit_label_weight
    from spinelm.plans import ModelFolder

    plans = ModelFolder(model_dir).plans
    cases = [(lab.candidate_world_mm, [c.score for c in lab.candidates], [c.label_probs for c in lab.candidates], gt)
             for _, _, lab, gt in labelled]
    weight, by_weight = fit_label_weight(cases, 2, plans.distance_mm, plans.known_labels, plans.spine_model())
    chosen = []
    for w, entry in by_weight.items():  # what each weight does to the validation cases' labels
        spine = plans.spine_model().weighted(w)
        ordered = [(f, c, order_labelled(lab.candidates, lab.candidate_world_mm, plans, spine), gt)
                   for f, c, lab, gt in labelled]
        entry["identified"] = int(sum(int(np.sum(ok & known)) for ok, known in
                                      (judged_flags(lab, gt) for _, _, lab, gt in ordered)))
        if w == weight:
            chosen = ordered
    n_gt = int(sum(len(gt) for *_, gt in labelled))
    doc = {"format": "spinelm-ordering", "version": 1, "label_weight": weight,
           "fitted_on": {"cases": len(cases), "folds": sorted({f for f, *_ in labelled}), "annotated_vertebrae": n_gt,
                         "criterion": "mean log posterior of the annotated reading per candidate",
                         "weights": {str(w): v for w, v in by_weight.items()}}}
    write_json_atomic(Path(model_dir) / ORDERING_FILE, doc)
    return doc, chosen


def describe_ordering(doc: dict) -> str:
    """One line on the fitted weight of the label evidence (an ``ordering.json`` document)."""
    f = doc.get("fitted_on") or {}
    w = float(doc["label_weight"])
    by = {float(k): v for k, v in (f.get("weights") or {}).items()}
    n = f.get("annotated_vertebrae")

    def ident(x: float) -> str:
        got = (by.get(x) or {}).get("identified", "?")
        return f"{got}/{n}" if n else str(got)

    cases = f.get("cases", "?")
    what = (f"the network's label probabilities weighed fully (the annotated readings of {cases} validation "
            f"cases are most probable so)" if w == 1.0 else
            f"the network's label probabilities weighed {w:g} against the column's geometry (raised to the power "
            f"{w:g}; the annotated readings of {cases} validation cases are most probable so)")
    return f"ordering: {what}; validation vertebrae identified {ident(w)} with it, {ident(1.0)} weighed fully"


def load_label_weight(model_dir) -> float | None:
    """The fitted weight of the label evidence in ``MODEL/ordering.json``; None when there is none (the
    ordering then weighs the label evidence fully), or with a warning when the file is unusable."""
    from spinelm.io.files import read_model_file

    def problem(doc):
        w = doc.get("label_weight")
        if not isinstance(w, (int, float)) or not 0.0 < float(w) <= 1.0:
            return f"label_weight {w!r} is not a number in (0, 1]"
        return None

    doc = read_model_file(Path(model_dir) / ORDERING_FILE, problem, "the label evidence is weighed fully")
    return float(doc["label_weight"]) if doc is not None else None


def orientation_check(turned: list[list[dict]]) -> dict:
    """:func:`spinelm.sanity.fit_flip_check` from the turned-over comparison's rows of validation scans."""
    from spinelm.sanity import fit_flip_check, swap_ratio

    pairs = [(rows[0], flip) for rows in turned for flip in rows[1:] if flip["key"] == "flip"]
    return fit_flip_check(pairs, [swap_ratio(rows) for rows in turned])


def wrong_cases(records) -> int:
    """How many validation records (one per case) hold a wrong vertebra."""
    return sum(1 for r in records if len(r[3]) and not np.all(np.asarray(r[3], bool)))


def _stack(records) -> tuple[np.ndarray, np.ndarray]:
    x = [r[2] for r in records if len(r[2])]
    y = [r[3] for r in records if len(r[3])]
    return (np.vstack(x) if x else np.zeros((0, len(FEATURES))), np.concatenate(y) if y else np.zeros(0))


def cross_fitted(records) -> tuple[dict[int, Calibration], np.ndarray, np.ndarray]:
    """Held-out check of the calibration: for every fold, a model fitted on the other folds'
    validation vertebrae only. Returns those models by fold, and the confidence each gives its own
    fold's vertebrae with their outcomes (pooled, in record order). Needs two or more folds."""
    folds = sorted({r[0] for r in records})
    if len(folds) < 2:
        raise ValueError("a held-out calibration check needs two or more trained folds")
    models, prob, outcome = {}, [], []
    for fold in folds:
        others = [r for r in records if r[0] != fold]
        x, y = _stack(others)
        models[fold] = Calibration.fit(x, y, wrong_cases=wrong_cases(others), folds=[f for f in folds if f != fold])
        for r in records:
            if r[0] == fold and len(r[2]):
                prob.append(models[fold](r[2]))
                outcome.append(np.asarray(r[3], float))
    return (models, np.concatenate(prob) if prob else np.zeros(0),
            np.concatenate(outcome) if outcome else np.zeros(0))


def calibrate(model_dir, folds: list[int] | None = None, device: str = "cpu", progress: bool = True) -> Calibration:
    """Fit and store, from the validation cases of the trained folds: the ordering's weight of the label
    evidence (``ordering.json``, :func:`fit_ordering`), then with it ``calibration.json``; and the flip
    check of the header check (``orientation.json``, :func:`spinelm.sanity.fit_flip_check`; the header
    check orders at weight 1 always, so it does not depend on the fit). With two or more folds the
    calibration also records the held-out figure (``fitted_on.held_out_ece``): each fold's vertebrae
    scored by a model fitted on the other folds (:func:`cross_fitted`), the error to expect on new scans
    (the label weight itself is fitted on all folds' validation cases, so it is not held out).
    ``ordering.json`` keeps, for every weight tried, its log-likelihood and how many annotated
    validation vertebrae it identifies."""
    from spinelm.io.files import write_json_atomic
    from spinelm.plans import ModelFolder
    from spinelm.sanity import FLIP_CHECK_FILE

    flips: list = []
    labelled: list = []
    records = collect(model_dir, folds, device, progress, flips, labelled)
    if flips:  # what the coarse stage can tell of a scan turned over (the header check)
        write_json_atomic(Path(model_dir) / FLIP_CHECK_FILE, orientation_check([rows for _, rows in flips]))
    info = {}
    if labelled:  # the confidence is fitted on the labels the fitted ordering gives
        ordering, ordered = fit_ordering(model_dir, labelled)
        distance_mm = ModelFolder(model_dir).plans.distance_mm
        records = [case_record(f, c, lab, gt, distance_mm) for f, c, lab, gt in ordered]
        info["label_weight"] = ordering["label_weight"]
    x, y = _stack(records)
    if len({r[0] for r in records}) >= 2 and len(y):
        _, p, o = cross_fitted(records)
        floor = ece_noise_floor(p)
        info.update({"held_out_ece": expected_calibration_error(p, o), "held_out_vertebrae": int(len(o)),
                     "held_out_ece_if_calibrated": floor["mean"], "held_out_ece_if_calibrated_p95": floor["p95"]})
    cal = Calibration.fit(x, y, wrong_cases=wrong_cases(records), folds=sorted({r[0] for r in records}),
                          cases=len(records), checkpoint="final", **info)
    cal.save(Path(model_dir) / CALIBRATION_FILE)
    return cal
