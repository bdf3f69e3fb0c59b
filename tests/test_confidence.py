"""Per-vertebra confidence: features from the labelled run, a calibrated logistic model, ECE."""
from __future__ import annotations

import numpy as np
import pytest

from spinelm import labels as L
from spinelm.confidence import FEATURES, Calibration, expected_calibration_error, judged_flags, vertebra_features
from spinelm.inference import Candidate, Labelled
from spinelm.sanity import confidence_reasons

LUMBAR = [L.label_of(n) for n in ("T12", "L1", "L2", "L3", "L4", "L5")]


def _labelled(evidence_offset: int = 0, sharp: float = 0.8) -> Labelled:
    """Five candidates 35 mm apart labelled L1..L5; their label evidence points ``evidence_offset``
    levels lower (1: each looks like the next vertebra down)."""
    cands, labels = [], LUMBAR[1:]
    for i, lab in enumerate(labels):
        own = LUMBAR[min(LUMBAR.index(lab) + evidence_offset, len(LUMBAR) - 1)]
        probs = {x: (sharp if x == own else (1 - sharp) / (len(LUMBAR) - 1)) for x in LUMBAR}
        cands.append(Candidate(np.zeros(3), 0.9, probs))
    world = np.stack([np.zeros(5), np.zeros(5), -35.0 * np.arange(5)], 1)
    return Labelled(cands, world, list(range(5)), labels, [0.95 if evidence_offset == 0 else 0.3] * 5)


def test_a_run_whose_evidence_points_one_level_lower_has_a_negative_shift_margin():
    right = vertebra_features(_labelled(0), 35.0)
    shifted = vertebra_features(_labelled(1), 35.0)
    assert right.shape == (5, len(FEATURES)) == (5, 6)
    assert right[0, 2] > 1.0 and shifted[0, 2] < 0  # shift_margin, per vertebra of the run
    assert right[0, 1] == pytest.approx(0.8) and shifted[0, 1] < 0.1  # own label's probability
    assert np.allclose(right[:, 3], 0.0)  # neighbours exactly one distance apart
    # the run's mean label probability: one value for the whole case, low when the run is shifted
    assert np.allclose(right[:, 4], right[:, 1].mean()) and np.allclose(shifted[:, 4], shifted[:, 1].mean())
    assert shifted[0, 4] < 0.3 < right[0, 4]
    assert np.allclose(right[:, 5], 0.95) and np.allclose(shifted[:, 5], 0.3)  # the ordering's posterior, as given


def test_identified_flags_follow_the_verse_rule():
    lab = _labelled(0)
    gt = {l: lab.candidate_world_mm[i] + np.array([0, 0, 3.0]) for i, l in enumerate(lab.labels)}
    assert judged_flags(lab, gt)[0].all()
    gt_shifted = {L.label_of("L2"): lab.candidate_world_mm[0]}  # the top candidate sits on L2, called L1
    assert not judged_flags(lab, gt_shifted)[0].any()


def test_calibration_is_learned_from_the_features_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (600, len(FEATURES)))
    p_true = 1 / (1 + np.exp(-(6 * x[:, 1] - 3)))  # identification depends on the label probability
    y = rng.random(600) < p_true
    cal = Calibration.fit(x, y, folds=[0])
    p = cal(x)
    assert expected_calibration_error(p, y) < 0.06
    assert np.corrcoef(p, p_true)[0, 1] > 0.95
    cal.save(tmp_path / "calibration.json")
    again = Calibration.load(tmp_path / "calibration.json")
    assert np.allclose(again(x), p)
    assert Calibration.load(tmp_path / "missing.json") is None
    with pytest.raises(ValueError, match="no validation vertebra"):
        Calibration.fit(np.zeros((0, len(FEATURES))), np.zeros(0))


def test_ece_of_a_perfectly_calibrated_and_of_an_overconfident_model():
    p = np.full(1000, 0.7)
    y = np.arange(1000) < 700
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(np.full(1000, 0.99), y) == pytest.approx(0.29, abs=1e-6)


def test_a_low_confidence_vertebra_is_a_reason_to_review():
    from spinelm.io.landmarks import Landmark

    lms = [Landmark(20, (0, 0, 0), 0.9, 0.95), Landmark(21, (0, 0, -35), 0.9, 0.3)]
    assert confidence_reasons(lms) == ["low confidence: L2 0.30"]
    assert confidence_reasons([Landmark(20, (0, 0, 0), 0.9)]) == []  # no calibration, no confidence


def test_cross_fitting_scores_each_fold_with_a_fit_that_never_saw_it():
    from spinelm.confidence import cross_fitted

    rng = np.random.default_rng(1)

    def records(fold, n_cases, shift):
        out = []
        for c in range(n_cases):
            x = rng.uniform(0, 1, (6, len(FEATURES)))
            y = rng.random(6) < 1 / (1 + np.exp(-(6 * x[:, 1] - 3 + shift)))
            out.append((fold, f"f{fold}c{c}", x, y, 6))
        return out

    recs = records(0, 40, 0.0) + records(1, 40, 0.0) + records(2, 40, 0.0)
    models, p, y = cross_fitted(recs)
    assert sorted(models) == [0, 1, 2] and len(p) == len(y) == 720
    assert models[0].fitted_on["folds"] == [1, 2] and models[0].fitted_on["vertebrae"] == 480
    assert expected_calibration_error(p, y) < 0.08  # same distribution in every fold: held out is calibrated
    # a fold the others do not resemble (far fewer vertebrae identified) is badly calibrated held out,
    # although a fit on everything looks fine on its own fitting data
    shifted = records(0, 40, 0.0) + records(1, 40, 0.0) + records(2, 40, -4.0)
    _, p2, y2 = cross_fitted(shifted)
    x_all = np.vstack([r[2] for r in shifted])
    y_all = np.concatenate([r[3] for r in shifted])
    assert expected_calibration_error(p2, y2) > expected_calibration_error(Calibration.fit(x_all, y_all)(x_all), y_all) + 0.05
    with pytest.raises(ValueError, match="two or more"):
        cross_fitted(records(0, 3, 0.0))


def test_calibrate_stores_the_held_out_error_when_two_folds_are_trained(tmp_path, monkeypatch):
    import json

    import spinelm.confidence as C

    rng = np.random.default_rng(2)

    def fake_collect(model_dir, folds=None, device="cpu", progress=True, flips=None, labelled=None):
        out = []
        for fold in (0, 1):
            for c in range(30):
                x = rng.uniform(0, 1, (5, len(FEATURES)))
                out.append((fold, f"c{fold}{c}", x, rng.random(5) < x[:, 1], 5))
        return out if folds is None else [r for r in out if r[0] in folds]

    monkeypatch.setattr(C, "collect", fake_collect)
    cal = C.calibrate(tmp_path)
    stored = json.loads((tmp_path / C.CALIBRATION_FILE).read_text())["fitted_on"]
    assert stored["held_out_vertebrae"] == 300 and 0 <= stored["held_out_ece"] < 0.15
    assert 0 < stored["held_out_ece_if_calibrated"] < stored["held_out_ece_if_calibrated_p95"] < 0.15
    assert cal.fitted_on["folds"] == [0, 1] and cal.fitted_on["vertebrae"] == 300
    one = C.calibrate(tmp_path, folds=[0])  # one fold: nothing held out to measure on
    assert "held_out_ece" not in one.fitted_on


def test_ece_noise_floor_shrinks_with_the_sample_and_separates_real_miscalibration():
    from spinelm.confidence import ece_noise_floor, expected_calibration_error

    rng = np.random.default_rng(5)
    small, large = rng.uniform(0, 1, 190), rng.uniform(0, 1, 5000)
    f_small, f_large = ece_noise_floor(small, 500), ece_noise_floor(large, 200)
    # a perfect confidence still reads well above 0 on 190 vertebrae, and about 4x less on 5000
    assert 0.04 < f_small["mean"] < 0.1 and f_small["p95"] > f_small["mean"]
    assert f_large["mean"] < f_small["mean"] / 3
    # over-confidence by 0.2 on every vertebra stands out of the floor; calibrated draws do not
    over = large
    outcome = rng.random(len(over)) < np.clip(over - 0.2, 0, 1)
    assert expected_calibration_error(over, outcome) > f_large["p95"]
    assert expected_calibration_error(large, rng.random(len(large)) < large) < 2 * f_large["p95"]


def test_too_few_wrong_vertebrae_to_fit_give_the_ordering_posterior(tmp_path):
    # a validation fold with no wrong vertebra: a logistic fit could only say "always right"
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (40, len(FEATURES)))
    cal = Calibration.fit(x, np.ones(40, bool), folds=[0])
    assert cal.method == "posterior" and "0 wrong" in cal.fitted_on["why"]
    assert np.allclose(cal(x), x[:, FEATURES.index("posterior")])
    no_posterior = x.copy()
    no_posterior[:, FEATURES.index("posterior")] = np.nan  # a run ordered without posteriors
    assert np.allclose(cal(no_posterior), x[:, FEATURES.index("label_prob")])
    cal.save(tmp_path / "calibration.json")
    again = Calibration.load(tmp_path / "calibration.json")
    assert again.method == "posterior" and np.allclose(again(x), cal(x))
    # with enough of both outcomes the logistic model is fitted, on the first five features only
    y = rng.random(400) < np.linspace(0.05, 0.95, 400)
    x = np.column_stack([rng.uniform(0, 1, (400, 5)), np.full(400, 0.5)])
    x[:, 1] = np.linspace(0, 1, 400)
    fitted = Calibration.fit(x, y)
    assert fitted.method == "logistic" and fitted.features == tuple(FEATURES[:5])
    changed = x.copy()
    changed[:, 5] = 0.99  # the posterior does not enter the logistic model
    assert np.allclose(fitted(changed), fitted(x))


def test_a_calibration_file_of_the_five_feature_format_still_loads(tmp_path):
    import json

    doc = {"format": "spinelm-calibration", "version": 1,
           "features": ["heatmap", "label_prob", "shift_margin", "spacing", "run_label_prob"],
           "mean": [0.5] * 5, "std": [0.2] * 5, "weights": [0.0, 2.0, 0.0, 0.0, 0.0], "bias": 0.0, "fitted_on": {}}
    (tmp_path / "calibration.json").write_text(json.dumps(doc))
    cal = Calibration.load(tmp_path / "calibration.json")
    x = np.zeros((2, len(FEATURES)))
    x[:, 1] = [0.5, 0.9]
    assert cal.method == "logistic" and np.allclose(cal(x), [0.5, 1 / (1 + np.exp(-4.0))])
    doc["features"] = ["heatmap", "not_a_feature"]
    (tmp_path / "calibration.json").write_text(json.dumps(doc))
    assert Calibration.load(tmp_path / "calibration.json") is None  # with a warning naming the file


def test_errors_of_too_few_cases_give_the_ordering_posterior():
    # 40 wrong vertebrae are plenty, but when they all come from two scans (a level shift makes every
    # label of a scan wrong) they are two examples: the posterior is kept, with the reason
    from spinelm.confidence import wrong_cases

    rng = np.random.default_rng(5)
    records = []
    for case in range(20):
        x = rng.uniform(0, 1, (6, len(FEATURES)))
        y = np.zeros(6, bool) if case < 2 else np.ones(6, bool)
        records.append((case % 5, f"c{case}", x, y))
    assert wrong_cases(records) == 2
    x = np.vstack([r[2] for r in records])
    y = np.concatenate([r[3] for r in records])
    # enough vertebrae of both outcomes for the vertebra count (12 wrong, 108 right)
    assert Calibration.fit(x, y).method == "logistic"
    cal = Calibration.fit(x, y, wrong_cases=wrong_cases(records))
    assert cal.method == "posterior" and "from 2 case(s)" in cal.fitted_on["why"]
    # the errors of three scans are enough
    records[2] = (records[2][0], "c2", records[2][2], np.zeros(6, bool))
    x = np.vstack([r[2] for r in records])
    y = np.concatenate([r[3] for r in records])
    assert Calibration.fit(x, y, wrong_cases=wrong_cases(records)).method == "logistic"


def test_an_unusable_ordering_file_is_named_and_the_label_evidence_weighed_fully(tmp_path, caplog):
    import json

    from spinelm.confidence import ORDERING_FILE, load_label_weight

    assert load_label_weight(tmp_path) is None  # no file: nothing fitted
    (tmp_path / ORDERING_FILE).write_text(json.dumps({"format": "spinelm-ordering", "label_weight": 0.35}))
    assert load_label_weight(tmp_path) == 0.35
    for bad in ('{"label_weight": 3}', '{"label_weight": "half"}', "{not json"):
        (tmp_path / ORDERING_FILE).write_text(bad)
        caplog.clear()
        assert load_label_weight(tmp_path) is None
        assert ORDERING_FILE in caplog.text and "weighed fully" in caplog.text
