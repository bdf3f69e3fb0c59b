"""The ordering model on hand-made candidate sets (no network involved)."""
import numpy as np

from spinelm import labels as L
from itertools import product

from spinelm.ordering import (SpineModel, _lattice, _logsumexp, label_marginals, order_candidates, suppress_duplicates,
                              variant_prior_from_counts, viterbi_labels)

N = {name: L.label_of(name) for name in ("T4", "T5", "T6", "T7", "T8", "T10", "T11", "T12", "T13",
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


def _brute_force_marginals(pos, scores, probs, m, allowed):
    """Every labelling enumerated: each candidate dropped or kept, kept labels strictly caudal."""
    labels, emit, cum_drop, start, last, trans = _lattice(pos, scores, probs, m, allowed, 2, over_paths=_logsumexp)
    n, k = emit.shape
    drop = np.diff(cum_drop)
    weights, configs = [], []
    for cfg in product(range(-1, k), repeat=n):  # -1: dropped
        kept = [(i, j) for i, j in enumerate(cfg) if j >= 0]
        if any(b[1] <= a[1] for a, b in zip(kept, kept[1:])):
            continue
        w = sum(drop[i] for i, j in enumerate(cfg) if j < 0) + sum(emit[i, j] for i, j in kept)
        if kept:
            w += start[kept[0][1]] + last[kept[-1][1]]
            w += sum(trans[a][b][ja, jb] for (a, ja), (b, jb) in zip(kept, kept[1:]))
        weights.append(w)
        configs.append(cfg)
    weights = np.exp(np.asarray(weights) - _logsumexp(np.asarray(weights)))
    out = np.zeros((n, k))
    for w, cfg in zip(weights, configs):
        for i, j in enumerate(cfg):
            if j >= 0:
                out[i, j] += w
    return labels, out


def test_the_posterior_of_each_label_sums_every_labelling_of_the_run():
    allowed = [N[x] for x in ("L3", "L4", "L5", "S1")]  # L3, L4, L5, L6, S1
    pos = np.array([[0, 0, 0.0], [0, 2, -33.0], [0, 0, -71.0]])
    probs = [onehot(N["L4"], 0.5, N["L3"], 0.3), onehot(N["L5"], 0.6, N["L6"], 0.3), onehot(N["S1"], 0.9)]
    labels, got = label_marginals(pos, [0.9, 0.4, 0.8], probs, model(), allowed)
    ref_labels, ref = _brute_force_marginals(pos, [0.9, 0.4, 0.8], probs, model(), allowed)
    assert labels == ref_labels
    np.testing.assert_allclose(got, ref, atol=1e-9)
    assert np.all(got.sum(1) <= 1 + 1e-9)


def test_a_run_with_no_junction_in_view_is_no_surer_than_the_variant_prior():
    # four lumbar-looking vertebrae above S1: L2-L5 without an L6, or L3-L6 with one; the image cannot tell,
    # so the vertebra above S1 is L5 as surely as the prior says there is no L6
    lumbar = {N[x]: 1 / 6 for x in ("L1", "L2", "L3", "L4", "L5", "L6")}
    allowed = [N[x] for x in ("L1", "L2", "L3", "L4", "L5", "S1")]
    for prior in (0.05, 0.15, 0.3):
        m = model()
        m.variant_prior = prior
        out, post = order_candidates(column(5), [0.9] * 5, [lumbar] * 4 + [onehot(N["S1"], 0.95)], cc_axis=2,
                                     distance_mm=35.0, model=m, allowed=allowed, with_posterior=True)
        assert [lab for _, lab in out] == [N[x] for x in ("L2", "L3", "L4", "L5", "S1")]
        assert (1 - prior) - 0.05 < post[3] < 1 - 0.5 * prior
        assert post[4] > 0.9  # S1 stays sure
    # evidence that anchors the count (the top one reads L2, not L3) makes the run sure again
    probs = [onehot(N["L2"], 0.9, N["L3"], 0.02)] + [lumbar] * 3 + [onehot(N["S1"], 0.95)]
    _, post = order_candidates(column(5), [0.9] * 5, probs, cc_axis=2, distance_mm=35.0, model=m, allowed=allowed,
                               with_posterior=True)
    assert post[3] > 1 - 0.5 * 0.3


def test_variant_priors_come_from_the_training_counts_and_never_fall_below_the_default():
    assert np.isclose(variant_prior_from_counts(4, 40), (4 + 10 * 0.05) / (40 + 10))  # 0.09
    assert variant_prior_from_counts(0, 32) == 0.05  # a protocol that never labels L6 keeps the default
    assert variant_prior_from_counts(1, 30) == 0.05
    assert variant_prior_from_counts(0, 0) == 0.05
    assert variant_prior_from_counts(30, 30) == 0.5
    m = SpineModel.from_stats({"variant_counts": {"L6": {"seen": 4, "visible": 40}, "T13": {"seen": 0, "visible": 9}}})
    assert np.isclose(m.prior_of(N["L6"]), 0.09) and m.prior_of(N["T13"]) == 0.05
    # a higher L6 prior makes the reading L1-L6 (rather than T12-L5) of a long lumbar run more probable
    names6 = ["L1", "L2", "L3", "L4", "L5", "L6", "S1"]
    flat = [{N[x]: 0.5 for x in ("T12", "L1")}] + [{N[x]: 0.2 for x in names6[1:-1] + ["L1"]}] * 5 + [onehot(N["S1"])]
    allowed = [N[x] for x in ("T12", "L1", "L5", "S1")]
    low = SpineModel.from_stats({"variant_counts": {"L6": {"seen": 0, "visible": 40}}}, default_distance_mm=35.0)
    high = SpineModel.from_stats({"variant_counts": {"L6": {"seen": 20, "visible": 40}}}, default_distance_mm=35.0)
    for m in (low, high):
        m.step_mean = {k: 35.0 for k in m.step_mean}
        m.step_std = {k: 2.0 for k in m.step_std}
        m.skip_mean = {k: 35.0 for k in m.skip_mean}
        m.skip_std = {k: 2.0 for k in m.skip_std}
    assert viterbi_labels(column(7), [0.9] * 7, flat, low, allowed)[0] == N["T12"]
    p_l1 = []
    for m in (low, high):
        labels, marg = label_marginals(column(7), [0.9] * 7, flat, m, allowed)
        p_l1.append(marg[0, labels.index(N["L1"])])
    assert p_l1[0] < 0.1 < 0.3 < p_l1[1] < 0.5


def _profile_stats(n_cases=10, tilt_deg=None):
    """Fingerprint statistics of a column whose steps are all 22 mm long but tilt backwards or
    forwards by level (a sagittal profile: ``tilt_deg[name]``, default 20 degrees * cos over the column)."""
    seq = [lab for lab in (v.label for v in L.VERTEBRAE) if not L.vertebra(lab).transitional
           and L.name_of(lab) != "Cocc"]
    pairs = {}
    for i, (a, b) in enumerate(zip(seq[:-1], seq[1:])):
        t = np.deg2rad(tilt_deg[L.name_of(a)] if tilt_deg else 20.0 * np.cos(np.pi * i / (len(seq) - 2)))
        off = [0.0, 22.0 * np.sin(t), -22.0 * np.cos(t)]
        pairs[f"{L.name_of(a)}-{L.name_of(b)}"] = {"from": a, "to": b, "n": n_cases, "distance_mm_mean": 22.0,
                                                   "distance_mm_std": 1.0, "offset_mm_mean": off,
                                                   "offset_mm_std": [1.0, 0.5, 0.5]}
    return {"consecutive_pairs": pairs}, seq


def _run(spine, seq, first, n):
    """Candidates placed by the statistics' mean steps, from ``first`` on, ``n`` of them."""
    i0 = seq.index(L.label_of(first))
    pos = [np.zeros(3)]
    for a, b in zip(seq[i0:i0 + n - 1], seq[i0 + 1:i0 + n]):
        pos.append(pos[-1] + np.asarray(spine["consecutive_pairs"][f"{L.name_of(a)}-{L.name_of(b)}"]["offset_mm_mean"]))
    return np.asarray(pos) + 100.0, [L.name_of(lab) for lab in seq[i0:i0 + n]]


def test_step_directions_place_a_run_with_neither_end_in_view():
    # equal distances and flat label evidence: only the tilt of the steps (the sagittal profile
    # measured in training) tells a mid-thoracic run where it lies
    spine, seq = _profile_stats()
    flat = {lab: 1.0 / len(seq) for lab in seq}
    m = SpineModel.from_stats(spine)
    assert len(m.pair_offsets) == len(seq) - 1
    for first in ("T3", "T7", "C4", "L1"):
        pos, truth = _run(spine, seq, first, 6)
        out = [L.name_of(lab) for _, lab in order_candidates(pos, [0.9] * 6, [flat] * 6, cc_axis=2, distance_mm=22.0,
                                                             model=m)]
        assert out == truth, (first, out)
    # without the offsets (a fingerprint from before they were stored) the run cannot be placed
    blind = {"consecutive_pairs": {k: {x: v[x] for x in ("from", "to", "n", "distance_mm_mean", "distance_mm_std")}
                                   for k, v in spine["consecutive_pairs"].items()}}
    m0 = SpineModel.from_stats(blind)
    assert not m0.pair_offsets
    misplaced = 0
    for first in ("T3", "T7", "C4", "L1"):
        pos, truth = _run(spine, seq, first, 6)
        out = [L.name_of(lab) for _, lab in order_candidates(pos, [0.9] * 6, [flat] * 6, cc_axis=2, distance_mm=22.0,
                                                             model=m0)]
        misplaced += out != truth
    assert misplaced >= 3


def test_direction_evidence_needs_enough_cases_and_stays_bounded():
    spine, seq = _profile_stats(n_cases=2)
    assert not SpineModel.from_stats(spine).pair_offsets  # 2 cases per pair: not used
    spine, seq = _profile_stats()
    m = SpineModel.from_stats(spine)
    mean, std, prior, tilt_mean, tilt_std = m.transition_tables(seq)
    for i in range(len(seq) - 1):  # every step between consecutive regular vertebrae has a tilt
        p = int(np.argmax(prior[:, i, i + 1]))
        assert np.all(np.isfinite(tilt_mean[p, i, i + 1])) and np.all(tilt_std[p, i, i + 1] >= 0.05)
    # paths through a T13 or L6 that training never showed have none (no evidence either way)
    assert np.isnan(tilt_mean[np.isfinite(prior)]).any()
    # a step straight forwards (anterior, nothing along the column) gives no direction evidence at all,
    # and a wildly tilted one costs at most MAX_DIRECTION_EVIDENCE
    from spinelm.ordering import MAX_DIRECTION_EVIDENCE, tilt_evidence
    assert np.all(tilt_evidence(np.array([0.0, -20.0, 0.0]), tilt_mean, tilt_std) == 0)
    ev = tilt_evidence(np.array([15.0, 15.0, -5.0]), tilt_mean, tilt_std)
    assert ev.min() >= -MAX_DIRECTION_EVIDENCE and ev.max() <= 1.0
    # centred: a step exactly as a path expects gains at most 1 nat, so an extra kept candidate is
    # not bought by directions alone
    p = int(np.argmax(prior[:, 3, 4]))
    t = tilt_mean[p, 3, 4]
    exact = np.array([22.0 * np.tan(t[1]), 22.0 * np.tan(t[0]), -22.0])
    assert np.isclose(tilt_evidence(exact, tilt_mean, tilt_std)[p, 3, 4], 1.0)


def test_direction_evidence_cannot_overrule_clear_labels():
    # a lumbar run whose steps tilt like a thoracic one (another posture) keeps its confident labels
    spine, seq = _profile_stats()
    m = SpineModel.from_stats(spine)
    pos, _ = _run(spine, seq, "T5", 5)
    probs = [onehot(lab, 0.9) for lab in LUMBAR]
    out = [lab for _, lab in order_candidates(pos, [0.9] * 5, probs, cc_axis=2, distance_mm=22.0, model=m)]
    assert out == LUMBAR


def _zigzag_stats():
    """A column whose step tilts alternate by 5 degrees from level to level: a one-level shift costs
    each step a little direction evidence (less than a confident label)."""
    regular = [lab for lab in (v.label for v in L.VERTEBRAE) if not L.vertebra(lab).transitional
               and L.name_of(lab) != "Cocc"]
    return _profile_stats(tilt_deg={L.name_of(a): 5.0 * (i % 3 - 1) for i, a in enumerate(regular)})


def _shifted_evidence(truth_names, seq, shift=1, p=0.8, q=0.15):
    """Label evidence that favours the run shifted by ``shift`` levels (``p``) over the truth (``q``):
    what a network that has not learned to count gives a run with neither end in view."""
    out = []
    for name in truth_names:
        lab = L.label_of(name)
        wrong = seq[seq.index(lab) + shift]
        out.append({wrong: p, lab: q})
    return out


def test_a_weaker_label_evidence_lets_the_column_correct_a_confidently_shifted_run():
    from dataclasses import replace

    spine, seq = _zigzag_stats()
    m = SpineModel.from_stats(spine)
    assert m.label_weight == 1.0  # the default weighs the label evidence fully
    pos, truth = _run(spine, seq, "T5", 6)
    probs = _shifted_evidence(truth, seq)
    names = lambda mm: [L.name_of(lab) for _, lab in order_candidates(pos, [0.9] * 6, probs, cc_axis=2,  # noqa: E731
                                                                      distance_mm=22.0, model=mm)]
    shifted = [L.name_of(seq[seq.index(L.label_of(t)) + 1]) for t in truth]
    assert names(m) == shifted  # fully weighed, the wrong labels win over the step tilts
    assert names(replace(m, label_weight=0.25)) == truth
    # and the posterior follows: the right labels become the likely ones
    _, post = order_candidates(pos, [0.9] * 6, probs, cc_axis=2, distance_mm=22.0,
                               model=replace(m, label_weight=0.25), with_posterior=True)
    assert min(post) > 0.5


def test_candidate_truth_follows_the_identification_rule():
    from spinelm.ordering import candidate_truth

    gt = {N["L1"]: np.array([0.0, 0.0, 0.0]), N["L2"]: np.array([0.0, 0.0, -35.0])}
    cands = np.array([[0.0, 2.0, 1.0],      # on L1
                      [0.0, 9.0, 0.0],      # further from L1: a false positive
                      [0.0, 0.0, -30.0],    # on L2
                      [0.0, 0.0, -17.0],    # between them, not the closest to either: false positive
                      [0.0, 0.0, 40.0]])    # above the annotated run (e.g. an unannotated T12): not judged
    assert candidate_truth(cands, gt, radius_mm=20.0, margin_mm=17.5) == [N["L1"], None, N["L2"], None, False]


def test_the_fitted_label_weight_trusts_right_labels_and_tempers_confidently_wrong_ones():
    from spinelm.ordering import LABEL_WEIGHTS, fit_label_weight

    spine, seq = _zigzag_stats()
    m = SpineModel.from_stats(spine)
    right, wrong = [], []
    for first in ("T2", "T5", "T8", "C5", "L1"):
        pos, truth = _run(spine, seq, first, 5)
        gt = {L.label_of(t): p for t, p in zip(truth, pos)}
        right.append((pos, [0.9] * 5, [onehot(L.label_of(x), 0.8) for x in truth], gt))
        wrong.append((pos, [0.9] * 5, _shifted_evidence(truth, seq), gt))
    w, by_weight = fit_label_weight(right, 2, 22.0, model=m)
    assert w == 1.0
    assert set(by_weight) == set(LABEL_WEIGHTS)
    w, _ = fit_label_weight(wrong, 2, 22.0, model=m)
    assert w < 1.0
    # the weighted ordering then labels those runs right
    wm = SpineModel.from_stats(spine)
    wm.label_weight = w
    for pos, sc, probs, gt in wrong:
        assert [lab for _, lab in order_candidates(pos, sc, probs, cc_axis=2, distance_mm=22.0, model=wm)] == list(gt)


def test_the_annotated_reading_is_judged_among_the_candidates_that_survive_suppression():
    from spinelm.ordering import truth_log_likelihood

    # a weak peak right on L1 and a strong one 8 mm off it: suppression keeps the strong one, which is
    # then the L1 of the annotated reading (not a false positive to drop)
    gt = {N["L1"]: np.array([0.0, 0.0, 0.0]), N["L2"]: np.array([0.0, 0.0, -35.0])}
    pos = np.array([[0.0, 1.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, -35.0]])
    probs = [onehot(N["L1"], 0.9), onehot(N["L1"], 0.9), onehot(N["L2"], 0.9)]
    total, judged = truth_log_likelihood(pos, [0.3, 0.9, 0.9], probs, gt, cc_axis=2, distance_mm=35.0,
                                         allowed=LUMBAR, model=model())
    assert judged == 2 and total > np.log(0.5)  # both survivors judged, and both read as annotated


def test_a_reweighted_model_keeps_the_original_and_its_tables():
    from spinelm.ordering import SpineModel, label_range

    model = SpineModel.from_stats(None, default_distance_mm=30.0)
    tables = model.transition_tables(label_range([20, 21, 22, 23, 24]))
    light = model.weighted(0.25)
    assert light.label_weight == 0.25 and model.label_weight == 1.0 and model.weighted(1.0) is model
    assert light.transition_tables(label_range([20, 21, 22, 23, 24])) is tables  # not built again
