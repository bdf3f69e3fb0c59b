import numpy as np

from spinelm.evaluation import identification, summarise


def test_identification_needs_label_distance_and_closest_gt():
    gt = {20: np.array([0.0, 0.0, 0.0]), 21: np.array([0.0, 0.0, -35.0]), 22: np.array([0.0, 0.0, -70.0])}
    pred = {20: np.array([0.0, 3.0, 4.0]),       # 5 mm: identified
            21: np.array([0.0, 0.0, -60.0]),     # 25 mm: too far
            22: np.array([0.0, 0.0, -50.0]),     # 20 mm but L2 (21) is closer: not identified
            23: np.array([0.0, 0.0, -105.0])}    # no ground truth: false positive
    r = identification(pred, gt)
    assert r["identified"] == [20]
    assert r["distances_mm"] == {20: 5.0, 21: 25.0, 22: 20.0}
    assert r["false_positive"] == [23] and r["missed"] == []
    s = summarise([r, identification({}, {24: np.zeros(3)})])
    assert s["id_rate"] == 1 / 4 and s["d_mean_mm"] == (5 + 25 + 20) / 3 and s["n_missed"] == 1
