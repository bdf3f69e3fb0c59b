"""The ordering model on hand-made candidate sets (no network involved)."""
import numpy as np

from spinelm import labels as L
from spinelm.ordering import SpineModel, order_candidates, suppress_duplicates, viterbi_labels

N = {name: L.label_of(name) for name in ("T4", "T5", "T6", "T7", "T8", "T11", "T12", "T13",
                                          "L1", "L2", "L3", "L4", "L5", "L6", "S1")}
LUMBAR = [N[x] for x in ("L1", "L2", "L3", "L4", "L5")]


def model(step=35.0):
    """Every step of the spine 35 mm (+-2), to make expected distances easy to reason about."""
    m = SpineModel.from_stats(None, default_distance_mm=step)
    m.step_mean = {k: step for k in m.step_mean}
    m.step_std = {k: 2.0 for k in m.step_std}
    m.skip_mean = {k: step for k in m.skip_mean}
    m.skip_std = {k: 2.0 for k in m.skip_std}
    return m


def column(n, step=35.0):
    """n candidates head to foot along z, ``step`` mm apart."""
    return np.array([[0.0, 0.0, -step * i] for i in range(n)])


def onehot(lab, p=0.8, other=None, q=0.2):
    d = {lab: p}
    if other is not None:
        d[other] = q
    return d


def test_swapped_labels_are_put_back_in_order():
    # the network calls the 2nd candidate L3 and the 3rd L2; the run must stay consecutive
    probs = [onehot(N["L1"]), onehot(N["L3"], 0.6, N["L2"], 0.4), onehot(N["L2"], 0.6, N["L3"], 0.4),
             onehot(N["L4"]), onehot(N["L5"])]
    assert viterbi_labels(column(5), [0.9] * 5, probs, model()) == LUMBAR


def test_duplicated_label_is_resolved_by_the_sequence():
    probs = [onehot(N["L1"]), onehot(N["L2"], 0.6, N["L3"], 0.4), onehot(N["L2"], 0.55, N["L3"], 0.45),
             onehot(N["L4"]), onehot(N["L5"])]
    assert viterbi_labels(column(5), [0.9] * 5, probs, model()) == LUMBAR


def test_weak_duplicate_peak_on_the_same_vertebra_is_dropped():
    # a second weak peak 12 mm below L2 (not suppressed here): it cannot be L3 at that distance
    pos = np.array([[0, 0, 0.0], [0, 0, -35.0], [0, 0, -47.0], [0, 0, -70.0]])
    probs = [onehot(N["L1"]), onehot(N["L2"]), onehot(N["L2"], 0.5, N["L3"], 0.5), onehot(N["L3"])]
    assert viterbi_labels(pos, [0.9, 0.9, 0.4, 0.9], probs, model()) == [N["L1"], N["L2"], None, N["L3"]]


def test_missing_vertebra_leaves_a_gap_of_one_label():
    # L3 was not detected: L2 and L4 are 70 mm apart, so the labels skip L3 instead of shifting
    pos = np.array([[0, 0, 0.0], [0, 0, -35.0], [0, 0, -105.0], [0, 0, -140.0]])
    probs = [onehot(N["L1"], 0.5, N["L2"], 0.5), onehot(N["L2"], 0.5, N["L3"], 0.5),
             onehot(N["L4"], 0.5, N["L3"], 0.5), onehot(N["L5"], 0.5, N["L4"], 0.5)]
    assert viterbi_labels(pos, [0.9] * 4, probs, model()) == [N["L1"], N["L2"], N["L4"], N["L5"]]


def test_t13_is_used_when_the_evidence_asks_for_it():
    names = ["T11", "T12", "T13", "L1", "L2", "L3", "L4", "L5"]
    probs = [onehot(N[x], 0.9) for x in names]
    assert viterbi_labels(column(8), [0.9] * 8, probs, model()) == [N[x] for x in names]


def test_t13_is_not_invented_from_ambiguous_evidence():
    # seven vertebrae whose 3rd looks a bit like T13 and a bit like L1: regular T11..L5 wins
    names = ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    probs = [onehot(N[x], 0.9) for x in names]
    probs[2] = onehot(N["L1"], 0.5, N["T13"], 0.5)
    assert viterbi_labels(column(7), [0.9] * 7, probs, model()) == [N[x] for x in names]


def test_l6_between_l5_and_sacrum():
    names = ["L3", "L4", "L5", "L6", "S1"]
    probs = [onehot(N[x], 0.9) for x in names]
    assert viterbi_labels(column(5), [0.9] * 5, probs, model()) == [N[x] for x in names]


def test_field_of_view_starting_mid_thoracic():
    names = ["T4", "T5", "T6", "T7", "T8"]
    probs = [onehot(N[x], 0.7, N[names[0]], 0.3) for x in names]
    probs[0] = onehot(N["T4"], 0.6, N["T5"], 0.4)
    assert viterbi_labels(column(5, 22.0), [0.8] * 5, probs, model(22.0)) == [N[x] for x in names]


def test_no_candidates():
    assert viterbi_labels(np.zeros((0, 3)), [], [], model()) == []
    assert order_candidates(np.zeros((0, 3)), [], [], cc_axis=2, distance_mm=35.0) == []


def test_two_peaks_too_close_to_be_two_vertebrae_keep_one_label():
    probs = [{lab: 1 / 5 for lab in LUMBAR}] * 2
    out = viterbi_labels(np.array([[0, 0, 0.0], [0, 0, -9.0]]), [0.3, 0.3], probs, model(), allowed=LUMBAR)
    assert sum(lab is not None for lab in out) == 1


def test_labels_stay_within_the_span_the_model_knows():
    # six candidates, the model knows L1-L5 only: the weakest extra one is dropped, not called T12
    probs = [onehot(N["L1"], 0.2), onehot(N["L1"]), onehot(N["L2"]), onehot(N["L3"]), onehot(N["L4"]), onehot(N["L5"])]
    out = viterbi_labels(column(6), [0.3, 0.9, 0.9, 0.9, 0.9, 0.9], probs, model(), allowed=LUMBAR)
    assert out == [None] + LUMBAR


def test_distance_statistics_move_a_run_with_weak_label_evidence():
    # label evidence is flat; the measured distances (short thoracic steps, long lumbar ones)
    # place three candidates 38 mm apart in the lumbar spine rather than the thoracic one
    spine = {"consecutive_pairs": {
        "T4-T5": {"from": N["T4"], "to": N["T5"], "distance_mm_mean": 20.0, "distance_mm_std": 1.0},
        "L2-L3": {"from": N["L2"], "to": N["L3"], "distance_mm_mean": 38.0, "distance_mm_std": 1.0},
        "L3-L4": {"from": N["L3"], "to": N["L4"], "distance_mm_mean": 38.0, "distance_mm_std": 1.0}}}
    m = SpineModel.from_stats(spine)
    flat = {lab: 0.5 for lab in (N["T4"], N["T5"], N["T6"], N["L2"], N["L3"], N["L4"])}
    out = viterbi_labels(column(3, 38.0), [0.9] * 3, [flat] * 3, m)
    assert out == [N["L2"], N["L3"], N["L4"]]


def test_statistics_from_the_fingerprint_and_scaled_fallback():
    spine = {"consecutive_pairs": {"L1-L2": {"from": N["L1"], "to": N["L2"], "distance_mm_mean": 40.0,
                                             "distance_mm_std": 1.0}}}
    m = SpineModel.from_stats(spine)
    assert m.step_mean[N["L1"]] == 40.0
    assert m.step_std[N["L1"]] >= 0.12 * 40.0  # spread floored
    # unseen pairs follow the typical profile scaled by 40/32 (typical L1-L2: 32 mm)
    assert np.isclose(m.step_mean[N["L3"]], 34.5 * 40.0 / 32.0)
    # T12 -> L1 directly (no T13) has its own statistic; going through T13 costs its prior
    (direct,) = [p for p in m.paths(N["T12"], N["L1"]) if p[2] > np.log(0.5)]
    assert np.isclose(direct[0], m.skip_mean[N["T12"]])


def test_suppression_keeps_the_strongest_of_close_peaks():
    pos = np.array([[0, 0, 0], [0, 0, 5.0], [0, 0, 40.0]])
    assert suppress_duplicates(pos, np.array([0.5, 0.9, 0.7]), 20.0) == [1, 2]


def test_order_runs_head_to_foot_along_the_given_axis():
    # axis 0 is cranio-caudal, larger = more cranial; candidates given in random order
    pos = np.array([[0.0, 0, 0], [70.0, 0, 0], [35.0, 0, 0], [36.0, 2, 0]])
    scores = [0.9, 0.8, 0.7, 0.3]
    probs = [{N["L3"]: 0.9}, {N["L1"]: 0.8}, {N["L2"]: 0.5, N["L1"]: 0.5}, {N["L2"]: 1.0}]
    out = order_candidates(pos, scores, probs, cc_axis=0, distance_mm=35.0)
    assert out == [(1, N["L1"]), (2, N["L2"]), (0, N["L3"])]


def test_two_peaks_side_by_side_are_not_consecutive_vertebrae():
    # L1 and a second peak 30 mm to its left at the same level (about one step away, but sideways)
    pos = np.array([[0, 0, 0.0], [30.0, 0, -3.0], [0, 0, -35.0], [0, 0, -70.0]])
    probs = [onehot(N["L1"], 0.6, N["L2"], 0.4), onehot(N["L2"], 0.6, N["L1"], 0.4), onehot(N["L2"]), onehot(N["L3"])]
    assert viterbi_labels(pos, [0.6, 0.5, 0.6, 0.6], probs, model()) == [N["L1"], None, N["L2"], N["L3"]]
