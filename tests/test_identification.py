"""The level head (spinelm.identification): crops, training targets, and its weight in the ordering."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spinelm import identification as ID
from spinelm import labels as L


def test_a_crop_is_centred_on_its_voxel_and_zero_outside_the_scan():
    data = np.arange(2 * 10 * 12 * 14, dtype=np.float32).reshape(2, 10, 12, 14)
    c = ID.crop_at(data, (5, 6, 7), (4, 4, 4))
    assert c.shape == (2, 4, 4, 4)
    assert np.array_equal(c, data[:, 3:7, 4:8, 5:9])
    edge = ID.crop_at(data, (0, 0, 0), (4, 4, 4))
    assert np.array_equal(edge[:, 2:, 2:, 2:], data[:, :2, :2, :2]) and not edge[:, :2].any()
    assert not ID.crop_at(data, (100, 100, 100), (4, 4, 4)).any()


def test_the_plan_sizes_the_crop_over_neighbours_along_the_column_within_the_patch():
    cfg = {"spacing": [4.0, 4.0, 4.0], "patch_size": [64, 48, 48],
           "architecture": {"arch_kwargs": {"strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}}}
    spec = ID.plan_identification(cfg, distance_mm=20.0, cc_axis=0, labels=[1, 2, 3])
    size = spec["crop_size"]
    assert size[0] * 4.0 >= ID.CROP_DISTANCES_CC * 20.0 and size[1] * 4.0 >= ID.CROP_DISTANCES_ACROSS * 20.0
    assert size[0] > size[1] and all(s % 8 == 0 for s in size)
    assert all(s <= p for s, p in zip(size, cfg["patch_size"]))
    assert spec["labels"] == [1, 2, 3]


def test_the_sampler_crops_annotated_vertebrae_with_their_level(tmp_path):
    from spinelm.io.files import write_json_atomic

    data = np.zeros((1, 40, 20, 20), np.float32)
    data[0, 8:12] = 1.0  # a bright slab where the first vertebra is
    np.save(tmp_path / "a_data.npy", data)
    write_json_atomic(tmp_path / "a.json", {"landmarks": [{"label": 20, "index": [10, 10, 10]},
                                                          {"label": 21, "index": [30, 10, 10]}]})

    class Plans:
        identification = {"labels": [20, 21, 22], "crop_size": [8, 8, 8], "crops_per_step": 32, "centre_jitter": 0.0}
        distance_mm = 30.0
        mirror_axes = [1, 2]
        cc_axis = 0

        def configuration(self, name):
            return type("C", (), {"spacing": [3.0, 3.0, 3.0]})()

    s = ID.LevelCropSampler(tmp_path, ["a"], Plans())
    assert len(s) == 2 and np.allclose(s.weights, [0.5, 0.5])
    b = s.batch(np.random.default_rng(0))
    assert b["level_image"].shape == (32, 1, 8, 8, 8) and set(b["level_target"].tolist()) <= {0, 1}
    flat = b["level_image"].flatten(1)
    bright = (flat.max(1).values - flat.min(1).values) > 0.5  # intensity jitter scales and offsets a crop
    assert torch.equal(bright, b["level_target"] == 0)  # the first vertebra's crops hold its slab
    assert "upright_target" not in b  # a plan without the upright head

    # with the upright head: the first crops again, head over foot, for the upright head only
    Plans.identification = dict(Plans.identification, upright_crops=4, crops_per_step=8)
    b = ID.LevelCropSampler(tmp_path, ["a"], Plans()).batch(np.random.default_rng(1))
    x, t = b["level_image"].numpy(), b["level_target"].tolist()
    assert x.shape[0] == 12 and t[8:] == [ID.IGNORE] * 4 and set(t[:8]) <= {0, 1}
    assert b["upright_target"].tolist() == [1] * 8 + [0] * 4
    assert np.array_equal(x[8:], x[:4, :, ::-1])  # reversed along the column (cc axis 0)


def test_the_level_head_decides_a_run_that_the_segmentation_cannot_tell_apart():
    """Five candidates on a column whose segmentation says nothing about the level (flat): the level
    head's probabilities, chained by the ordering, give the run's labels."""
    from spinelm.ordering import order_candidates

    labels = [lab for lab in range(1, 26)]
    flat = {lab: 1 / len(labels) for lab in labels}
    truth = [L.label_of(n) for n in ("T8", "T9", "T10", "T11", "T12")]
    pos = np.array([[0.0, 0.0, -25.0 * i] for i in range(5)])
    heads = [{lab: (0.4 if lab == t else 0.6 / 24) for lab in labels} for t in truth]
    heads[2] = {lab: (0.4 if lab == L.label_of("T11") else 0.6 / 24) for lab in labels}  # one wrong vote
    fused = [ID.fuse(flat, h) for h in heads]
    got = [lab for _, lab in order_candidates(pos, [0.9] * 5, fused, 2, 25.0, allowed=labels)]
    assert got == truth
    without = [lab for _, lab in order_candidates(pos, [0.9] * 5, [flat] * 5, 2, 25.0, allowed=labels)]
    assert without != truth


def test_fusion_weights_the_level_head_and_keeps_a_distribution():
    seg, lvl = {20: 0.9, 21: 0.1}, {20: 0.1, 21: 0.9}
    fused = ID.fuse(seg, lvl)
    assert ID.LEVEL_WEIGHT > 0.5 and max(fused, key=fused.get) == 21
    assert sum(fused.values()) == pytest.approx(1.0)
    assert ID.fuse(seg, lvl, weight=0.0)[20] == pytest.approx(0.9, abs=1e-6)


def test_the_sampler_draws_rare_levels_more_often_than_their_share(tmp_path):
    """Nine T4 crops and one L5: drawn by vertebra, L5 would be 10 % of the crops; the square-root
    balance gives it 1 / (1 + 9 ** 0.5) = 25 %."""
    from spinelm.io.files import write_json_atomic

    np.save(tmp_path / "a_data.npy", np.zeros((1, 40, 20, 20), np.float32))
    lms = [{"label": 11, "index": [3 + 3 * i, 10, 10]} for i in range(9)] + [{"label": 24, "index": [35, 10, 10]}]
    write_json_atomic(tmp_path / "a.json", {"landmarks": lms})

    class Plans:
        identification = {"labels": [11, 24], "crop_size": [4, 4, 4], "crops_per_step": 4000, "centre_jitter": 0.0}
        distance_mm = 30.0
        mirror_axes = []
        cc_axis = 0

        def configuration(self, name):
            return type("C", (), {"spacing": [3.0, 3.0, 3.0]})()

    share = float((ID.LevelCropSampler(tmp_path, ["a"], Plans()).batch(np.random.default_rng(0))["level_target"]
                   == 1).float().mean())
    assert abs(share - 0.25) < 0.03
    Plans.identification = dict(Plans.identification, balance_power=0.0)
    share = float((ID.LevelCropSampler(tmp_path, ["a"], Plans()).batch(np.random.default_rng(0))["level_target"]
                   == 1).float().mean())
    assert abs(share - 0.10) < 0.03
