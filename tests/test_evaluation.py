import csv
import json

import numpy as np
import pytest

from spinelm import labels as L
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


def test_dice_per_label_by_hand():
    from spinelm.evaluation import dice_per_label
    gt = np.zeros((4, 4, 4), np.int16)
    pred = np.zeros_like(gt)
    gt[0, :2] = 20          # 8 voxels of L1
    pred[0, :1] = 20        # 4 of them predicted
    gt[2] = 21              # 16 voxels of L2, predicted as L3
    pred[2] = 22
    assert dice_per_label(pred, gt) == {20: 2 * 4 / (8 + 4), 21: 0.0}


def _ctd(path, items):
    from spinelm.io.landmarks import landmarks_from_arrays, write_spinelm_json
    write_spinelm_json(path, landmarks_from_arrays([k for k, _ in items], np.asarray([v for _, v in items])))


def test_evaluate_folders_and_cli_with_hand_computed_figures(tmp_path, capsys):
    from spinelm.cli import main
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    # case a: L1 3 mm off (identified), L2 predicted as L3's position: 35 mm off (not identified)
    _ctd(gt / "a.json", [(20, [0, 0, 0]), (21, [0, 0, -35]), (22, [0, 0, -70])])
    _ctd(pred / "a_ctd.json", [(20, [0, 0, 3]), (21, [0, 0, -70]), (23, [0, 0, -105])])
    # case b: two vertebrae, both identified (1 mm and 2 mm)
    _ctd(gt / "b.json", [(24, [0, 0, 0]), (26, [0, 0, -40])])
    _ctd(pred / "b_ctd.json", [(24, [1, 0, 0]), (26, [0, 2, -40])])
    # case c: ground truth only; not attempted by the batch -> not evaluated unless --all-gt
    _ctd(gt / "c.json", [(20, [0, 0, 0])])
    rc = main(["evaluate", str(pred), str(gt), "--no-progress"])
    assert rc == 0
    rep = json.loads((pred / "evaluation.json").read_text())
    o = rep["overall"]
    assert o["n_gt"] == 5 and o["n_identified"] == 3 and o["id_rate"] == 3 / 5
    assert np.isclose(o["d_mean_mm"], (3 + 35 + 1 + 2) / 4)
    assert o["n_missed"] == 1 and o["n_false_positive"] == 1  # L3 missed in a; L4 predicted in a
    assert o["n_ground_truth_cases_not_evaluated"] == 1
    rows = list(csv.DictReader(open(pred / "evaluation.csv")))
    assert [r["case"] for r in rows] == ["a", "b", "ALL"] and rows[0]["missed"] == "L3"
    out = capsys.readouterr().out
    assert "identification rate 0.600 (3/5)" in out
    main(["evaluate", str(pred), str(gt), "--all-gt", "--no-progress"])
    o = json.loads((pred / "evaluation.json").read_text())["overall"]
    assert o["n_gt"] == 6 and o["n_identified"] == 3 and o["n_cases_without_prediction"] == 1


def test_level_shift_counts_runs_labelled_off_by_the_same_number_of_levels():
    from spinelm.evaluation import level_index, level_shift, summarise

    gt = {lab: np.array([0.0, 0.0, -30.0 * i]) for i, lab in enumerate(range(18, 25))}  # T11..L5, 30 mm apart
    right = {lab: p + 2.0 for lab, p in gt.items()}
    up_one = {lab - 1: p for lab, p in gt.items()}  # every vertebra called by the level above
    down_two = {lab + 2: p for lab, p in gt.items() if lab + 2 <= 24}
    one_wrong = dict(right)
    one_wrong[22], one_wrong[23] = right[23], right[22]  # two swapped: not a shifted case
    assert level_shift(right, gt) == 0
    assert level_shift(up_one, gt) == -1
    assert level_shift(down_two, gt) == 2
    assert level_shift(one_wrong, gt) == 0
    assert level_shift({}, gt) == 0
    assert level_index(28) == level_index(20)  # T13 takes L1's slot: calling it L1 is no shift
    assert level_shift({20: gt[19] + 1.0}, {19: gt[19], 28: gt[19] - 30.0}) == 1  # one case, all one off
    r = summarise([identification(right, gt), identification(up_one, gt), identification(down_two, gt)])
    assert r["n_cases_level_shifted"] == 2 and r["level_shifted_share"] == pytest.approx(2 / 3)


def test_a_label_beyond_the_annotated_range_is_neither_right_nor_wrong():
    """Data sets annotate a fixed range (e.g. L1-L5) and leave out a T12 in view: predicting it is
    not an error, while a shifted run's extra label sits on an annotated vertebra and is one."""
    from spinelm.evaluation import beyond_annotation, case_is_right

    names = ("L1", "L2", "L3", "L4", "L5")
    gt = {L.label_of(n): np.array([0.0, 5.0 * i, -36.0 * i]) for i, n in enumerate(names)}
    t12 = L.label_of("T12")
    pred = dict(gt) | {t12: np.array([0.0, -5.0, 34.0])}
    r = identification(pred, gt)
    assert r["false_positive"] == [t12] and r["beyond_annotation"] == [t12] and case_is_right(r)

    shifted = {t12: gt[L.label_of("L1")]} | {L.label_of(a): gt[L.label_of(b)] for a, b in zip(names[:-1], names[1:])}
    r = identification(shifted, gt)
    assert r["beyond_annotation"] == [] and not case_is_right(r)
    assert beyond_annotation(pred, {t12: np.zeros(3)}) == []  # one annotated vertebra: no range to be beyond
