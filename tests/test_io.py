"""World/voxel conversions, reorientation and the three centroid formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from spinelm.io import (Geometry, ImageReadError, Landmark, centroids_from_mask, load_volume, read_image,
                        read_landmarks, write_slicer_markups, write_spinelm_json, write_verse_json)
from spinelm.io.image import reoriented_to_original_index, original_to_reoriented_index
from tests.conftest import real_data


def _rot(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


# Six axis-aligned storage orientations and two oblique ones (direction matrices, columns = axes).
ORIENTATIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "PIR": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),
    "ASL": np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float),
    "IRP": np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], float),
    "SLA": np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], float),
    "oblique": _rot([1, 2, 0.5], 23) @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),
    "oblique2": _rot([0.3, -1, 1], 40),
}


def _image_with_spot(direction, spot_index=(7, 11, 5), size=(20, 24, 16), spacing=(0.8, 1.3, 3.0),
                     origin=(-12.0, 40.5, 100.25)):
    arr = np.zeros(size[::-1], np.float32)
    arr[spot_index[::-1]] = 100.0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return img


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_world_index_round_trip_matches_itk(name, tmp_path):
    img = _image_with_spot(ORIENTATIONS[name])
    g = Geometry.from_sitk(img)
    rng = np.random.default_rng(0)
    idx = rng.uniform(-2, 20, size=(50, 3))
    world = g.index_to_world(idx)
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])
    np.testing.assert_allclose(world, expected, atol=1e-9)
    np.testing.assert_allclose(g.world_to_index(world), idx, atol=1e-9)
    np.testing.assert_allclose(g.world_to_array_index(world), idx[:, ::-1], atol=1e-9)


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_canonical_reorientation_keeps_world_positions(name, tmp_path):
    img = _image_with_spot(ORIENTATIONS[name])
    path = tmp_path / f"{name}.nii.gz"
    sitk.WriteImage(img, str(path))
    spot_world = np.array(img.TransformIndexToPhysicalPoint((7, 11, 5)))
    arr, g = load_volume(path, canonical=True)
    assert g.axis_codes() == "LPS"
    found = g.array_index_to_world(np.argwhere(arr == arr.max())[0])
    np.testing.assert_allclose(found, spot_world, atol=1e-3)
    # axis 0 of canonical arrays runs along the head-foot axis
    assert g.cranio_caudal_array_axis() == 0


def test_axis_codes_of_oblique_image_use_each_world_axis_once():
    assert Geometry.from_sitk(_image_with_spot(ORIENTATIONS["PIR"])).axis_codes() == "PIR"
    codes = Geometry.from_sitk(_image_with_spot(ORIENTATIONS["oblique"])).axis_codes()
    assert sorted(c.replace("R", "L").replace("A", "P").replace("I", "S") for c in codes) == ["L", "P", "S"]


@pytest.mark.parametrize("name", list(ORIENTATIONS))
@pytest.mark.parametrize("axcodes", ["PIR", "LPS", "RAS", "IPL"])
def test_verse_voxel_convention_round_trip(name, axcodes, tmp_path):
    g = Geometry.from_sitk(_image_with_spot(ORIENTATIONS[name]))
    lms = [Landmark(20, tuple(g.index_to_world([3.2, 4.5, 6.1]))), Landmark(21, tuple(g.index_to_world([9, 15.5, 2])))]
    write_verse_json(tmp_path / "x_ctd.json", lms, g, axcodes)
    doc = json.loads((tmp_path / "x_ctd.json").read_text())
    assert doc[0] == {"direction": list(axcodes)}
    back = read_landmarks(tmp_path / "x_ctd.json", g)
    for a, b in zip(lms, back):
        assert a.label == b.label
        np.testing.assert_allclose(a.position_mm, b.position_mm, atol=2e-3)
    idx = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(reoriented_to_original_index(g, original_to_reoriented_index(g, idx, axcodes),
                                                            axcodes), idx)


def test_verse_reoriented_axes_point_where_the_codes_say():
    g = Geometry((10, 20, 30), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))  # LPS
    # in a PIR-reoriented image, moving +1 along X goes posterior, +1 along Y inferior, +1 along Z right
    base = g.index_to_world(reoriented_to_original_index(g, np.array([0.0, 0.0, 0.0]), "PIR"))
    for axis, world_delta in ((0, [0, 1, 0]), (1, [0, 0, -1]), (2, [-1, 0, 0])):
        step = np.zeros(3)
        step[axis] = 1
        moved = g.index_to_world(reoriented_to_original_index(g, step, "PIR"))
        np.testing.assert_allclose(moved - base, world_delta)


def test_spinelm_and_slicer_formats_round_trip(tmp_path):
    lms = [Landmark(19, (1.5, -20.25, 300.0), 0.9), Landmark(28, (2.0, -18.0, 270.5)), Landmark(20, (0.0, -15.0, 240.0))]
    write_spinelm_json(tmp_path / "c.json", lms)
    write_slicer_markups(tmp_path / "c.mrk.json", lms)
    for f in ("c.json", "c.mrk.json"):
        back = read_landmarks(tmp_path / f)
        assert [lm.name for lm in back] == ["T12", "T13", "L1"]  # cranio-caudal order, T13 in place
        got = {lm.label: lm.position_mm for lm in back}
        for lm in lms:
            np.testing.assert_allclose(got[lm.label], lm.position_mm, atol=1e-6)
    assert read_landmarks(tmp_path / "c.json")[0].score == pytest.approx(0.9)


def test_ras_coordinates_are_converted_to_lps(tmp_path):
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                        "controlPoints": [{"label": "L2", "position": [10.0, 20.0, 30.0]}]}]}
    (tmp_path / "r.mrk.json").write_text(json.dumps(doc))
    (lm,) = read_landmarks(tmp_path / "r.mrk.json")
    assert lm.label == 21 and lm.position_mm == (-10.0, -20.0, 30.0)


@pytest.mark.parametrize("content, match", [
    ("{not json", "invalid JSON"),
    ('{"vertebrae": [{"label": 99, "position_mm": [0, 0, 0]}]}', "unknown vertebra 99"),
    ('{"vertebrae": [{"label": "L1", "position_mm": [0, 0]}]}', "expected a position"),
    ('{"something": 1}', "unknown centroid format"),
])
def test_bad_centroid_files_name_file_and_problem(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as exc:
        read_landmarks(path)
    assert str(path) in str(exc.value)


def test_verse_file_needs_geometry(tmp_path):
    (tmp_path / "v_ctd.json").write_text('[{"direction": ["P","I","R"]}, {"label": 20, "X": 1, "Y": 2, "Z": 3}]')
    with pytest.raises(ValueError, match="geometry is needed"):
        read_landmarks(tmp_path / "v_ctd.json")


def test_unreadable_and_wrong_dimension_images_raise_clear_errors(tmp_path):
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(_image_with_spot(np.eye(3)), str(good))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageReadError, match="trunc.nii.gz: unreadable image"):
        read_image(truncated)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(10, 10, sitk.sitkFloat32), str(flat))
    with pytest.raises(ImageReadError, match="expected a 3-D image, found 2-D"):
        read_image(flat)
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(four))
    with pytest.raises(ImageReadError, match="found 4-D"):
        read_image(four)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        read_image(tmp_path / "missing.nii.gz")


def test_official_verse_sample_centroids_sit_in_their_vertebrae():
    folder = real_data("verse-ct", "verse-format")
    mask, g = load_volume(folder / "sub-verse004_seg-vert_msk.nii.gz", dtype=None)
    lms = read_landmarks(folder / "sub-verse004_seg-subreg_ctd.json", g)
    assert [lm.name for lm in lms] == ["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    for lm in lms:
        voxels = g.array_index_to_world(np.argwhere(np.rint(mask) == lm.label))
        dist = np.min(np.linalg.norm(voxels - np.asarray(lm.position_mm), axis=1))
        assert dist <= 2.0, f"{lm.name} is {dist:.1f} mm from its vertebra"


def test_centroids_from_mask_are_world_centres_of_mass():
    g = Geometry((10, 12, 14), (2.0, 1.0, 0.5), (5.0, -3.0, 7.0), tuple(ORIENTATIONS["PIR"].ravel()))
    mask = np.zeros(g.shape, np.uint8)
    mask[2:4, 5:7, 1:3] = 20  # (z, y, x)
    (lm,) = centroids_from_mask(mask, g)
    np.testing.assert_allclose(lm.position_mm, g.array_index_to_world([2.5, 5.5, 1.5]))
