"""Planning rules on hand-written fingerprints, and the whole planner on them."""
from __future__ import annotations

import numpy as np
import pytest

from spinelm import planning as P


def _fingerprint(spacings, shapes, labels_per_case=None, seg_labels=(20, 21, 22, 23, 24), distance=38.0,
                 channel="MR"):
    n = len(spacings)
    labels_per_case = labels_per_case or {f"c{i}": list(seg_labels) for i in range(n)}
    return {
        "format": "spinelm-fingerprint", "version": 1, "dataset": "/hand/written",
        "channel_names": {"0": channel}, "cases": [f"c{i}" for i in range(n)],
        "spacings": spacings, "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 100.0, "median": 100.0, "std": 20.0, "min": 0.0, "max": 300.0,
            "percentile_99_5": 250.0, "percentile_00_5": 10.0}},
        "median_relative_size_after_cropping": 1.0,
        "spine": {"segmentation_labels": list(seg_labels), "labels_per_case": labels_per_case,
                  "median_consecutive_distance_mm": distance, "consecutive_pairs": {}},
    }


# --- rules -------------------------------------------------------------------------------------


def test_choose_preset_by_device():
    assert P.choose_preset("cpu") == "cpu"
    assert P.choose_preset("cuda:1") == "gpu"
    with pytest.raises(ValueError, match="unknown device"):
        P.choose_preset("tpu")


def test_memory_target_follows_small_cards_only():
    assert P.memory_target_gb(8, None) == 8
    assert P.memory_target_gb(8, 80) == 8  # big cards keep nnU-Net's 8 GB
    assert P.memory_target_gb(8, 6) == pytest.approx(6 - P.GPU_OVERHEAD_GB)
    with pytest.raises(ValueError, match="too small"):
        P.memory_target_gb(8, 1.0)


def test_patch_voxel_budget_scales_with_time_and_has_a_floor():
    assert P.patch_voxel_budget(None, 2, 1.7, 600) is None
    assert P.patch_voxel_budget(15, 2, None, 600) is None
    b15, b30 = P.patch_voxel_budget(15, 2, 1.7, 600), P.patch_voxel_budget(30, 2, 1.7, 600)
    assert b30 == pytest.approx(2 * b15, rel=1e-6)
    # 15 min, 80 % training time, 600 steps of batch 2 at 1.7 s/Mvoxel -> ~353k voxels (~70^3)
    assert b15 == pytest.approx(15 * 60 * 0.8 / (600 * 1.7 * 2) * 1e6, rel=1e-6)
    assert P.patch_voxel_budget(0.01, 2, 1.7, 600) == 32 ** 3


def test_spacing_floor_never_refines_thick_slices():
    assert P.apply_spacing_floor([4.0, 0.7, 1.2], 2.0) == [4.0, 2.0, 2.0]


def test_heatmap_sigma_tracks_vertebra_distance_but_stays_resolvable():
    assert P.heatmap_sigma_mm(38.0, [1.0, 1.0, 1.0]) == pytest.approx(3.8)
    assert P.heatmap_sigma_mm(20.0, [3.0, 2.0, 2.0]) == pytest.approx(3.0)  # 1.5 voxels of 2 mm


def test_heads_single_heatmap_with_masks_per_label_heatmaps_without():
    with_masks = P.choose_heads(_fingerprint([[1, 1, 1]], [[10, 10, 10]]))
    assert with_masks["segmentation"]["channels"] == 6 and with_masks["heatmap"]["channels"] == 1
    only_ctd = P.choose_heads(_fingerprint([[1, 1, 1]], [[10, 10, 10]], {"c0": [8, 9, 10]}, seg_labels=()))
    assert "segmentation" not in only_ctd
    assert only_ctd["heatmap"] == {"channels": 3, "per_label": True, "labels": [8, 9, 10]}
    assert P.output_channels(with_masks) == 7


def test_cranio_caudal_axis_follows_transpose_and_is_never_mirrored():
    assert P.cranio_caudal_axis_after_transpose([2, 0, 1]) == 1
    assert P.mirror_axes(1) == [0, 2]


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'gpu'"):
        P.load_preset("gpux")
    assert {"cpu", "gpu", "gpu-resenc-m"} <= set(P.available_presets())


# --- the planner on hand-written fingerprints --------------------------------------------------


def test_cpu_plan_for_sagittal_mr_is_small_and_keeps_the_thick_axis_first():
    # thick-slice sagittal MR: 4 mm left-right (canonical axis 2), 0.7 mm in plane
    fp = _fingerprint([[0.7, 0.7, 4.0]] * 6, [[520, 500, 15]] * 6)
    plans = P.plan(fp, device="cpu", time_budget_min=15, seconds_per_mvoxel=1.7)
    fine = plans["configurations"]["fine"]
    assert plans["transpose_forward"][0] == 2  # lowest resolution first, as nnU-Net does
    assert plans["cranio_caudal_axis"] == 1
    assert plans["cranio_caudal_axis"] not in plans["mirror_axes"]
    assert fine["spacing"][0] == pytest.approx(4.0) and min(fine["spacing"]) >= 2.0
    assert np.prod(fine["patch_size"]) <= plans["budget"]["max_patch_voxels"]
    assert fine["architecture"]["arch_kwargs"]["features_per_stage"][0] == 8
    assert plans["heads"]["heatmap"]["sigma_mm"] >= 3.0
    # the capped fine patch sees part of the 364 mm column: a coarse stage holds all of it
    cc = plans["cranio_caudal_axis"]
    coarse = plans["configurations"]["coarse"]
    assert fine["patch_size"][cc] * fine["spacing"][cc] < 364 * P.WHOLE_VIEW_SHARE
    assert coarse["patch_size"][cc] * coarse["spacing"][cc] >= 364 * P.WHOLE_VIEW_SHARE
    assert all(c >= f for c, f in zip(coarse["spacing"], fine["spacing"]))
    assert coarse["heatmap_sigma_mm"] >= P.SIGMA_MIN_VOXELS * min(coarse["spacing"])
    assert list(plans["configurations"]) == ["coarse", "fine"]  # trained in this order
    assert any("coarse identification stage" in r for r in plans["rationale"])
    # the coarse network carries a level head whose crop spans several neighbours along the column
    ident = plans["identification"]
    assert ident["labels"] == plans["heads"]["segmentation"]["labels"]
    assert ident["crop_size"][cc] > ident["crop_size"][(cc + 1) % 3]
    assert all(s <= p for s, p in zip(ident["crop_size"], coarse["patch_size"]))
    assert any("level head" in r for r in plans["rationale"])


def test_the_ordering_expects_transitional_vertebrae_as_often_as_the_training_labels_show_them():
    lumbar, with_l6 = [20, 21, 22, 23, 24, 26], [20, 21, 22, 23, 24, 25, 26]  # L1-L5 + S1, and with L6
    per_case = {f"c{i}": (with_l6 if i < 10 else lumbar) for i in range(40)}
    per_case["c39"] = [20, 21, 22, 23, 24]  # no S1: the place of an L6 is not in view
    per_case["c0"] = [22, 23, 24, 25]  # an L6 with no S1 below it still shows its place
    fp = _fingerprint([[0.7, 0.7, 4.0]] * 40, [[520, 500, 15]] * 40, labels_per_case=per_case)
    plans = P.plan(fp, device="cpu", time_budget_min=15, seconds_per_mvoxel=1.7)
    assert plans["spine"]["variant_counts"]["L6"] == {"seen": 10, "visible": 39}
    assert plans["spine"]["variant_counts"]["T13"] == {"seen": 0, "visible": 0}
    from spinelm.plans import Plans

    model = Plans(plans).spine_model()
    assert model.prior_of(25) == pytest.approx((10 + 10 * 0.05) / (39 + 10))
    assert model.prior_of(28) == 0.05
    assert any("L6 in 10 of 39 cases" in r for r in plans["rationale"])
    # a protocol that never labels an L6 keeps the default prior
    fp = _fingerprint([[0.7, 0.7, 4.0]] * 6, [[520, 500, 15]] * 6, labels_per_case={f"c{i}": lumbar for i in range(6)})
    assert Plans(P.plan(fp, device="cpu", time_budget_min=15, seconds_per_mvoxel=1.7)).spine_model().prior_of(25) == 0.05


def test_no_coarse_stage_when_the_fine_patch_holds_the_whole_column():
    fp = _fingerprint([[3.0, 3.0, 3.0]] * 6, [[60, 50, 20]] * 6)
    plans = P.plan(fp, device="cpu")
    assert list(plans["configurations"]) == ["fine"]
    assert "identification" not in plans


def test_gpu_plan_matches_nnunet_defaults_for_whole_spine_ct():
    # whole-spine CT, 1 x 0.8 x 0.8 mm, 700 mm long: nnU-Net's patch already spans > 3 vertebrae
    fp = _fingerprint([[1.0, 0.8, 0.8]] * 10, [[700, 380, 380]] * 10, distance=30.0, channel="CT")
    plans = P.plan(fp, device="cuda", gpu_memory_gb=80)
    fine = plans["configurations"]["fine"]
    assert fine["architecture"]["arch_kwargs"]["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert fine["normalization_schemes"] == ["CTNormalization"]
    assert fine["spacing"] == pytest.approx([1.0, 0.8, 0.8])
    assert fine["batch_size"] == 2
    assert plans["configurations"]["coarse"]["patch_size"][plans["cranio_caudal_axis"]] * \
        plans["configurations"]["coarse"]["spacing"][plans["cranio_caudal_axis"]] >= 700 * P.WHOLE_VIEW_SHARE


def test_a_patch_that_sees_too_few_vertebrae_is_flagged_in_the_rationale():
    # 0.4 mm isotropic, 600 mm long, a 6 GB card: the fine patch spans about two vertebrae
    fp = _fingerprint([[0.4, 0.4, 0.4]] * 10, [[1500, 500, 500]] * 10, distance=38.0, channel="CT")
    plans = P.plan(fp, device="cuda", gpu_memory_gb=6)
    cc = plans["cranio_caudal_axis"]
    fine = plans["configurations"]["fine"]
    assert fine["patch_size"][cc] * fine["spacing"][cc] < 3 * 38.0
    assert list(plans["configurations"]) == ["coarse", "fine"]
    assert any("fewer than 3 vertebrae" in r for r in plans["rationale"])


def test_smaller_gpu_gives_smaller_patch_and_time_budget_shrinks_cpu_patch():
    fp = _fingerprint([[1.0, 1.0, 1.0]] * 8, [[300, 300, 300]] * 8)
    big = P.plan(fp, device="cuda", gpu_memory_gb=24)["configurations"]["fine"]
    small = P.plan(fp, device="cuda", gpu_memory_gb=4)["configurations"]["fine"]
    assert np.prod(small["patch_size"]) < np.prod(big["patch_size"])
    slow = P.plan(fp, device="cpu", time_budget_min=5, seconds_per_mvoxel=1.7)["configurations"]["fine"]
    fast = P.plan(fp, device="cpu", time_budget_min=60, seconds_per_mvoxel=1.7)["configurations"]["fine"]
    assert np.prod(slow["patch_size"]) < np.prod(fast["patch_size"])


def test_extra_output_channels_count_in_the_memory_estimate():
    few = _fingerprint([[1.0, 1.0, 1.0]] * 8, [[300, 300, 300]] * 8, seg_labels=(20,))
    many = _fingerprint([[1.0, 1.0, 1.0]] * 8, [[300, 300, 300]] * 8, seg_labels=tuple(range(1, 27)))
    p_few = P.plan(few, device="cuda", gpu_memory_gb=4)["configurations"]["fine"]
    p_many = P.plan(many, device="cuda", gpu_memory_gb=4)["configurations"]["fine"]
    assert np.prod(p_many["patch_size"]) * p_many["batch_size"] <= np.prod(p_few["patch_size"]) * p_few["batch_size"]
    assert (p_many["patch_size"], p_many["batch_size"]) != (p_few["patch_size"], p_few["batch_size"])


def test_plans_file_round_trip_and_version_check(tmp_path):
    import json
    fp = _fingerprint([[1.0, 1.0, 1.0]] * 4, [[200, 150, 150]] * 4)
    plans = P.plan(fp, device="cpu")
    P.save_plans(plans, tmp_path / "plans.json")
    loaded = P.load_plans(tmp_path / "plans.json")
    assert loaded.raw == plans
    assert loaded.configuration().patch_size == tuple(plans["configurations"]["fine"]["patch_size"])
    broken = {k: v for k, v in plans.items() if k != "spine"}
    (tmp_path / "old.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="old.json: plans lack the field.s. spine"):
        P.load_plans(tmp_path / "old.json")
    newer = dict(plans, version=P.PLANS_VERSION + 1)
    (tmp_path / "new.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="newer than this spinelm supports"):
        P.load_plans(tmp_path / "new.json")


def test_the_plan_says_for_which_pairs_the_ordering_weighs_step_directions():
    fp = _fingerprint([[0.7, 0.7, 4.0]] * 10, [[520, 500, 15]] * 10)
    plans = P.plan(fp, device="cpu", time_budget_min=15, seconds_per_mvoxel=1.7)
    assert any("does not weigh the tilt" in r for r in plans["rationale"])
    pair = {"n": 8, "distance_mm_mean": 35.0, "distance_mm_std": 2.0, "offset_mm_mean": [0.0, 5.0, -34.6],
            "offset_mm_std": [1.0, 2.0, 1.0]}
    fp["spine"]["consecutive_pairs"] = {"L1-L2": {"from": 20, "to": 21, **pair}, "L2-L3": {"from": 21, "to": 22, **pair},
                                        "L4-L5": {"from": 23, "to": 24, **pair, "n": 2}}
    plans = P.plan(fp, device="cpu", time_budget_min=15, seconds_per_mvoxel=1.7)
    assert any("tilt of the steps between 2 of 3 pairs" in r and "L1-L2 to L2-L3" in r for r in plans["rationale"])
    from spinelm.plans import Plans

    assert set(Plans(plans).spine_model().pair_offsets) == {(20, 21), (21, 22)}
