import numpy as np
import pytest

from spinelm import labels as L
from spinelm.ordering import assign_consecutive_labels, order_candidates, suppress_duplicates

L1, L2, L3, L4, L5 = (L.label_of(n) for n in ("L1", "L2", "L3", "L4", "L5"))


def test_duplicated_label_becomes_a_consecutive_run():
    probs = [{L1: 0.9}, {L2: 0.6, L3: 0.4}, {L2: 0.55, L3: 0.45}, {L4: 0.8}]
    assert assign_consecutive_labels(probs) == [L1, L2, L3, L4]


def test_whole_run_shifted_when_evidence_says_so():
    probs = [{L1: 0.4, L2: 0.6}, {L2: 0.3, L3: 0.7}, {L4: 0.9}]
    assert assign_consecutive_labels(probs) == [L2, L3, L4]


def test_no_candidates_and_too_many():
    assert assign_consecutive_labels([]) == []
    with pytest.raises(ValueError):
        assign_consecutive_labels([{L1: 1.0}] * 30)


def test_suppression_keeps_the_strongest_of_close_peaks():
    pos = np.array([[0, 0, 0], [0, 0, 5.0], [0, 0, 40.0]])
    assert suppress_duplicates(pos, np.array([0.5, 0.9, 0.7]), 20.0) == [1, 2]


def test_order_runs_head_to_foot_along_the_given_axis():
    # axis 0 is cranio-caudal, larger = more cranial; candidates given in random order
    pos = np.array([[0.0, 0, 0], [70.0, 0, 0], [35.0, 0, 0], [36.0, 2, 0]])
    scores = [0.9, 0.8, 0.7, 0.3]
    probs = [{L3: 0.9}, {L1: 0.8}, {L2: 0.5, L1: 0.5}, {L2: 1.0}]
    out = order_candidates(pos, scores, probs, cc_axis=0, distance_mm=35.0)
    assert out == [(1, L1), (2, L2), (0, L3)]


def test_run_stays_within_the_labels_the_model_knows():
    # the model knows L1-L5 only; five strong candidates and a weak sixth (an unannotated T12)
    probs = [{L1: 0.2}, {L1: 0.5}, {L2: 0.6}, {L3: 0.7}, {L4: 0.6}, {L5: 0.9}]
    pos = np.array([[200.0 - 35 * i, 0, 0] for i in range(6)])
    out = order_candidates(pos, [0.3, 0.9, 0.9, 0.9, 0.9, 0.9], probs, 0, 35.0, allowed=[L1, L2, L3, L4, L5])
    assert out == [(1, L1), (2, L2), (3, L3), (4, L4), (5, L5)]
