"""Fingerprint on phantom and real data: canonical spacings and spine statistics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spinelm import labels as L
from spinelm.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint
from tests.conftest import real_data


@pytest.fixture(scope="module")
def phantom_fp(phantom_dataset):
    return compute_fingerprint(phantom_dataset, num_workers=0, progress=False)


def test_fingerprint_has_nnunet_keys_in_canonical_axis_order(phantom_fp, phantom_dataset):
    fp = phantom_fp
    assert len(fp["spacings"]) == len(fp["shapes_after_crop"]) == len(fp["cases"]) == 4
    assert set(fp["foreground_intensity_properties_per_channel"]["0"]) >= {"mean", "std", "percentile_00_5",
                                                                            "percentile_99_5"}
    # phantoms are stored in random orientations; the canonical fingerprint puts the head-foot
    # extent (the longest, as the phantoms are long runs) on axis 0 for every case
    from spinelm.dataset import discover_dataset, load_case
    for case in discover_dataset(phantom_dataset).cases:
        lc = load_case(case)
        zs = [lc.geometry.world_to_array_index(lm.position_mm)[0] for lm in lc.landmarks]
        assert np.all(np.diff(zs) < 0), "cranio-caudal order must run along canonical axis 0 (S up)"


def test_spine_statistics_of_phantoms(phantom_fp):
    spine = phantom_fp["spine"]
    assert spine["cases_with_mask"] == 4
    for pair in spine["consecutive_pairs"].values():
        assert L.vertebra(pair["to"]).label in L.successors(pair["from"])
        assert 10 < pair["distance_mm_mean"] < 60
        assert len(pair["offset_mm_mean"]) == 3
    assert 15 < spine["median_consecutive_distance_mm"] < 45
    assert spine["segmentation_labels"]


def test_fingerprint_round_trips_through_json(phantom_fp, tmp_path):
    save_fingerprint(phantom_fp, tmp_path / "fp.json")
    assert load_fingerprint(tmp_path / "fp.json") == json.loads(json.dumps(phantom_fp))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a spinelm-fingerprint file"):
        load_fingerprint(tmp_path / "bad.json")


def test_cases_with_centroids_only_contribute(phantom_copy):
    (phantom_copy / "labelsTr" / "phantom_000.nii.gz").unlink()
    fp = compute_fingerprint(phantom_copy, num_workers=0, progress=False)
    assert fp["spine"]["cases_with_centroids_only"] == 1
    assert "phantom_000" in fp["spine"]["labels_per_case"]


def test_real_lumbar_mr_statistics_are_anatomical():
    fp = compute_fingerprint(real_data("lumbar-mr"), num_workers=2, progress=False)
    pairs = fp["spine"]["consecutive_pairs"]
    assert pairs["L4-L5"]["n"] == 32 and pairs["T11-T12"]["n"] == 8
    # lumbar body centre to centre distances are ~35-42 mm in adults
    for name in ("L1-L2", "L2-L3", "L3-L4", "L4-L5"):
        assert 30 < pairs[name]["distance_mm_mean"] < 45
        # mostly along the head-foot axis (LPS z decreases caudally)
        off = np.asarray(pairs[name]["offset_mm_mean"])
        assert off[2] < 0 and abs(off[2]) > np.linalg.norm(off[:2])
    assert fp["spacings"][0] == [1.0, 1.0, 1.0]
    # the column-shape check's limits (spinelm.sanity.column_reasons) come from the annotations:
    # real lumbar columns bend at most about 25 degrees at a vertebra
    shape = fp["spine"]["column_shape"]
    assert 10 < shape["bend_deg_max"] < 35 and shape["bends"] == 8 * 5 + 24 * 3
    assert shape["max_bend_deg"] == pytest.approx(1.5 * shape["bend_deg_max"])
    lo, hi = shape["relative_distance"]
    assert 0.8 < lo < 1.0 < hi < 1.2
    assert shape["distance_limits"][0] < lo and shape["distance_limits"][1] > hi

