"""Heatmap decoding: peaks, sub-voxel refinement, label probabilities, cut vertebrae at the border."""
from __future__ import annotations

import numpy as np
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
