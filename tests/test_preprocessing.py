"""Preprocessing cache: nnunetv2's preprocessor, landmarks carried along, idempotent."""
from __future__ import annotations

import numpy as np
import pytest

from spinelm.fingerprint import compute_fingerprint
from spinelm.planning import plan
from spinelm.io.image import Frame
from spinelm.preprocessing import load_preprocessed, preprocess_dataset
from spinelm.io import Geometry


@pytest.fixture(scope="module")
def planned(phantom_dataset, tmp_path_factory):
    fp = compute_fingerprint(phantom_dataset, num_workers=0, progress=False)
    plans = plan(fp, device="cpu")
    model = tmp_path_factory.mktemp("model")
    status = preprocess_dataset(phantom_dataset, model, plans, num_workers=0, progress=False)
    return plans, model, status


def test_every_landmark_sits_on_its_vertebra_after_preprocessing(planned):
    plans, model, status = planned
    assert set(status.values()) == {"done"} and len(status) == 4
    seg_labels = plans["heads"]["segmentation"]["labels"]
    n = 0
    for case in status:
        data, seg, props = load_preprocessed(model, "fine", case)
        assert data.dtype == np.float32 and data.shape[1:] == seg.shape[1:] == tuple(props["shape"])
        assert abs(float(np.mean(data))) < 0.1 and abs(float(np.std(data)) - 1) < 0.1  # z-score (MR)
        for lm in props["landmarks"]:
            idx = np.round(lm["index"]).astype(int)
            lo, hi = np.maximum(idx - 1, 0), np.minimum(idx + 2, seg.shape[1:])
            block = seg[0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            assert (block == seg_labels.index(lm["label"]) + 1).any(), (case, lm)
            n += 1
    assert n >= 20


def test_second_run_reuses_the_cache_and_changes_invalidate_it(planned, phantom_dataset):
    plans, model, _ = planned
    assert set(preprocess_dataset(phantom_dataset, model, plans, num_workers=0, progress=False).values()) == {"cached"}
    changed = dict(plans, foreground_intensity_properties_per_channel={
        "0": dict(plans["foreground_intensity_properties_per_channel"]["0"], mean=123.0)})
    assert set(preprocess_dataset(phantom_dataset, model, changed, num_workers=0, progress=False).values()) == {"done"}


def test_world_to_preprocessed_map_follows_transpose_crop_and_resampling():
    g = Geometry((10, 20, 30), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    # canonical array index (z, y, x) = (5, 4, 3) is world (3*2, 4, 5) mm
    world = g.array_index_to_world([5.0, 4.0, 3.0])
    frame = Frame.from_info(g, [2, 0, 1], {"bbox": [[1, 9], [2, 30], [0, 20]], "shape_after_cropping": [8, 28, 20],
                                            "shape": [16, 28, 40]})
    out = frame.from_world(world)
    # transpose -> (3, 5, 4); crop -> (2, 3, 4); x2 on axes 0 and 2 around voxel centres
    np.testing.assert_allclose(out[0], [(2 + 0.5) * 2 - 0.5, 3.0, (4 + 0.5) * 2 - 0.5])
    np.testing.assert_allclose(frame.to_world(out), world.reshape(1, 3))  # and back, as prediction maps peaks
