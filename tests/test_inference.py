"""Heatmap decoding: peaks, sub-voxel refinement, label probabilities, cut vertebrae at the border."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spinelm.augmentation import render_heatmap
from spinelm.inference import decode_candidates

HEADS = {"segmentation": {"labels": [20, 21], "channels": 3}, "heatmap": {"channels": 1, "sigma_mm": 4.5}}


def _pred(shape, peaks, label_of_x):
    """A heatmap with unit Gaussians at ``peaks`` and a segmentation whose label depends on x."""
    hm = render_heatmap(shape, np.asarray(peaks, dtype=float), (1.5, 1.5, 1.5))[None]
    seg = torch.zeros((3, *shape))
    for x in range(shape[0]):
        seg[label_of_x(x), x] = 1.0
    return {"heatmap": hm, "segmentation": seg}


def test_peaks_are_refined_below_a_voxel_and_labelled_from_the_segmentation():
    shape = (40, 20, 20)
    pred = _pred(shape, [(10.3, 9.6, 10.0), (27.0, 10.2, 9.7)], lambda x: 1 if x < 19 else 2)
    cands = sorted(decode_candidates(pred, HEADS, (3.0, 3.0, 3.0), 36.0), key=lambda c: c.position[0])
    assert len(cands) == 2
    assert np.allclose(cands[0].position, (10.3, 9.6, 10.0), atol=0.15)
    assert np.allclose(cands[1].position, (27.0, 10.2, 9.7), atol=0.15)
    assert [c.label for c in cands] == [20, 21]
    assert cands[0].label_probs[20] > 0.99


def test_a_vertebra_cut_by_the_field_of_view_is_not_a_candidate():
    # the second Gaussian's centre lies outside the array: its maximum inside is on the last layer
    shape = (40, 20, 20)
    pred = _pred(shape, [(12.0, 10.0, 10.0), (40.5, 10.0, 10.0)], lambda x: 1)
    kept = decode_candidates(pred, HEADS, (3.0, 3.0, 3.0), 36.0)
    assert [round(float(c.position[0])) for c in kept] == [12]
    everything = decode_candidates(pred, HEADS, (3.0, 3.0, 3.0), 36.0, drop_border=False)
    assert sorted(round(float(c.position[0])) for c in everything) == [12, 39]


def test_a_two_humped_response_is_placed_in_its_middle():
    # a wide sacrum or a body blurred along thick slices: two equal humps 3 voxels apart left-right,
    # the saddle between them above half their height (one response)
    shape = (30, 30, 30)
    pred = _pred(shape, [(15.0, 13.5, 15.0), (15.0, 16.5, 15.0)], lambda x: 1)
    cands = decode_candidates(pred, HEADS, (3.0, 3.0, 3.0), 36.0)
    assert len(cands) == 1
    assert np.allclose(cands[0].position, (15.0, 15.0, 15.0), atol=0.2)
    top = decode_candidates(pred, HEADS, (3.0, 3.0, 3.0), 36.0, refine="parabola")
    assert abs(top[0].position[1] - 15.0) > 1.0  # the maximum itself sits on one hump


def test_a_wide_plateau_across_the_spine_is_centred_and_other_responses_do_not_pull_it():
    # a sacrum cut by the field of view: a flat response 30 voxels (90 mm) wide left-right, its
    # maximum near one edge; a separate response lies beside it along z
    shape = (30, 60, 40)
    hm = torch.zeros((1, *shape))
    hm[0, 9:12, 15:45, 18:23] = 0.6
    hm[0, 10, 41, 20] = 0.62  # the maximum, 11 voxels right of the plateau's middle (29.5)
    hm[0, 9:12, 20:30, 30:34] = 0.5  # another structure, not connected above half the peak
    seg = torch.zeros((3, *shape))
    seg[1] = 1.0
    pred = {"heatmap": hm, "segmentation": seg}
    across = decode_candidates(pred, HEADS, (3.0, 3.0, 3.0), 36.0, cc_axis=0)
    best = max(across, key=lambda c: c.score)
    assert abs(best.position[1] - 29.5) < 1.5 and abs(best.position[2] - 20.0) < 0.5
    narrow = max(decode_candidates(pred, HEADS, (3.0, 3.0, 3.0), 36.0), key=lambda c: c.score)
    assert narrow.position[1] > 35  # without the cranio-caudal axis the window stays near the maximum


def _coarse_frame():
    """A 1 mm canonical scan of 200 x 40 x 40 voxels (z, y, x), preprocessed to 2 mm (100 x 20 x 20)."""
    from spinelm.io.image import Frame, Geometry

    g = Geometry((40, 40, 200), (1.0, 1.0, 1.0), (10.0, -5.0, 100.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return g, Frame.from_info(g, [0, 1, 2], {"bbox": [[0, 200], [0, 40], [0, 40]], "shape_after_cropping": [200, 40, 40],
                                             "shape": [100, 20, 20]})


def test_coarse_labels_are_read_at_the_world_position_of_each_fine_peak():
    from spinelm.inference import coarse_label_probs

    g, frame = _coarse_frame()
    labels = [20, 21, 22]
    seg = torch.zeros((4, 100, 20, 20))
    seg[0] = 1.0
    for k, (lo, hi) in enumerate([(10, 30), (40, 60), (70, 90)]):  # three vertebrae along the column
        seg[0, lo:hi, 5:15, 5:15] = 0.0
        seg[k + 1, lo:hi, 5:15, 5:15] = 1.0
    # world points at the centres of the 2nd and 3rd vertebra (canonical voxel = 2 x coarse voxel + 0.5)
    pts = g.array_index_to_world(np.array([[2 * 50 + 0.5, 2 * 10 + 0.5, 2 * 10 + 0.5],
                                           [2 * 80 + 0.5, 2 * 10 + 0.5, 2 * 10 + 0.5]]))
    probs = coarse_label_probs(pts, {"segmentation": seg}, frame, (2.0, 2.0, 2.0), labels, distance_mm=30.0)
    assert max(probs[0], key=probs[0].get) == 21 and probs[0][21] > 0.99
    assert max(probs[1], key=probs[1].get) == 22 and probs[1][22] > 0.99


def test_the_coarse_stage_outweighs_a_fine_label_that_saw_part_of_the_column():
    from spinelm.inference import COARSE_LABEL_WEIGHT, fuse_label_probs

    fine = {21: 0.9, 22: 0.1}  # a fine patch without the sacrum in view: one level off
    coarse = {21: 0.05, 22: 0.95}  # the coarse stage counted from the sacrum
    assert COARSE_LABEL_WEIGHT > 0.5
    fused = fuse_label_probs(fine, coarse)
    assert max(fused, key=fused.get) == 22 and abs(sum(fused.values()) - 1) < 1e-9
    assert max(fuse_label_probs(fine, coarse, weight=0.0), key=fine.get) == 21
    # agreeing stages stay confident
    assert fuse_label_probs({21: 0.9, 22: 0.1}, {21: 0.9, 22: 0.1})[21] == pytest.approx(0.9, abs=1e-6)



def test_a_noisy_heatmap_gives_at_most_max_candidates_strongest_first():
    from spinelm.inference import MAX_CANDIDATES

    rng = np.random.default_rng(0)
    shape = (60, 60, 60)
    hm = torch.as_tensor(rng.uniform(0.16, 0.2, shape), dtype=torch.float32)[None]  # an untrained model's noise
    hm[0, 30, 30, 30] = 0.9
    seg = torch.full((3, *shape), 1 / 3)
    cands = decode_candidates({"heatmap": hm, "segmentation": seg}, HEADS, (1.0, 1.0, 1.0), 10.0)
    assert MAX_CANDIDATES // 2 < len(cands) <= MAX_CANDIDATES  # humps sharing a centre merge
    assert max(c.score for c in cands) == pytest.approx(0.9)
