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


# --- bad and unusual NIfTI files: plain-words errors, NIfTI-2 and gzip named .nii ---------------------------

import gzip  # noqa: E402
import struct  # noqa: E402

import nibabel as nib  # noqa: E402

from spinelm.io import read_geometry  # noqa: E402
from spinelm.io.image import _NIFTI_LAYOUT, nifti_integrity  # noqa: E402

_ITK_LEAKS = (".cxx", ".hxx", ".h:", "SimpleITK-build", "Exception thrown", "itk::", "sitk::")


def _nifti1_bytes(dims, datatype=16, bitpix=32, pixdim=(1.0, 1.0, 1.0), srow=None, sform_code=1, qform_code=0,
                  quatern=(0.0,) * 6, data=None):
    """A single-file NIfTI-1 image packed by hand (little-endian, voxel data at byte 352)."""
    head = bytearray(348)
    struct.pack_into("<i", head, 0, 348)
    struct.pack_into("<8h", head, 40, len(dims), *dims, *[1] * (7 - len(dims)))
    struct.pack_into("<2h", head, 70, datatype, bitpix)
    struct.pack_into("<8f", head, 76, 1.0, *pixdim, *[1.0] * (7 - len(pixdim)))
    struct.pack_into("<2f", head, 108, 352.0, 1.0)  # vox_offset, scl_slope
    struct.pack_into("<2h", head, 252, qform_code, sform_code)
    struct.pack_into("<6f", head, 256, *quatern)
    if srow is None:
        srow = np.hstack([np.diag((list(pixdim) + [1.0, 1.0])[:3]), np.zeros((3, 1))])
    struct.pack_into("<12f", head, 280, *np.asarray(srow, float).ravel())
    head[344:348] = b"n+1\0"
    if data is None:
        data = bytes(int(np.prod([max(d, 1) for d in dims])) * bitpix // 8)
    return bytes(head) + bytes(4) + data


def _assert_plain(message, path, *phrases):
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message
    for leak in _ITK_LEAKS:
        assert leak not in message, message


def test_nifti_header_offsets_match_nibabel():
    for version, header_class in ((1, nib.Nifti1Header), (2, nib.Nifti2Header)):
        layout, fields = _NIFTI_LAYOUT[version], header_class.template_dtype.fields
        assert layout["size"] == header_class.template_dtype.itemsize
        for key, field in (("dim", "dim"), ("datatype", "datatype"), ("pixdim", "pixdim"),
                           ("vox_offset", "vox_offset"), ("codes", "qform_code"), ("quatern", "quatern_b"),
                           ("srow", "srow_x")):
            assert layout[key][0] == fields[field][1], (version, key)
        assert fields["bitpix"][1] == layout["datatype"][0] + 2
        assert fields["sform_code"][1] == layout["codes"][0] + struct.calcsize("<" + layout["codes"][1]) // 2
        assert fields["srow_z"][1] + fields["srow_z"][0].itemsize == layout["srow"][0] + struct.calcsize(
            "<" + layout["srow"][1])


_BAD_HEADERS = {
    "2-D": (lambda: _nifti1_bytes((8, 9), pixdim=(1.0, 1.0)),
            ("expected a 3-D image", "2-D image of size (8, 9)")),
    "negative size": (lambda: _nifti1_bytes((8, -9, 10)),
                      ("unreadable image", "dimension sizes (8, -9, 10) in the header must be positive")),
    "zero size": (lambda: _nifti1_bytes((8, 9, 0)),
                  ("unreadable image", "dimension sizes (8, 9, 0) in the header must be positive")),
    "NaN in srow": (lambda: _nifti1_bytes((8, 9, 10), srow=[[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]),
                    ("unreadable image", "the orientation (sform/qform affine) in the header holds NaN or Inf")),
    "Inf in qform": (lambda: _nifti1_bytes((8, 9, 10), sform_code=0, qform_code=1,
                                           quatern=(0, 0, 0, np.inf, 0, 0)),
                     ("unreadable image", "the orientation (sform/qform affine) in the header holds NaN or Inf")),
    "complex64": (lambda: _nifti1_bytes((8, 9, 10), datatype=32, bitpix=64),
                  ("complex-valued voxels (complex64); expected real intensities",)),
}


@pytest.mark.parametrize("case", list(_BAD_HEADERS))
@pytest.mark.parametrize("reader", [read_image, read_geometry])
def test_bad_nifti_headers_are_refused_in_plain_words(tmp_path, case, reader):
    make, phrases = _BAD_HEADERS[case]
    path = tmp_path / "bad.nii"
    path.write_bytes(make())
    with pytest.raises(ImageReadError) as exc:
        reader(path)
    _assert_plain(str(exc.value), path, *phrases)


def test_complex_images_are_refused_whatever_the_format(tmp_path):
    arr = (np.arange(720).reshape(8, 9, 10) * (1 + 1j)).astype(np.complex64)
    nii = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), nii)
    nrrd = tmp_path / "complex.nrrd"  # read by ITK (MHA has no complex type: it stores two channels)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nrrd))
    for path in (nii, nrrd):
        for reader in (read_image, read_geometry):
            with pytest.raises(ImageReadError) as exc:
                reader(path)
            _assert_plain(str(exc.value), path, "complex-valued voxels (complex64); expected real intensities")


def test_vector_images_stay_refused(tmp_path):
    path = tmp_path / "rgb.nii.gz"
    sitk.WriteImage(sitk.Image([8, 9, 10], sitk.sitkVectorFloat32, 3), str(path))
    for reader in (read_image, read_geometry):
        with pytest.raises(ImageReadError, match="found 3 components"):
            reader(path)


def test_unreadable_files_never_leak_itk_internals(tmp_path):
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(_image_with_spot(np.eye(3), spot_index=(1, 2, 3), size=(8, 9, 10)), str(good))
    mha = tmp_path / "good.mha"
    sitk.WriteImage(_image_with_spot(np.eye(3), spot_index=(1, 2, 3), size=(8, 9, 10)), str(mha))
    files = {
        "junk.nii": (b"\x07" * 600, "not a NIfTI file"),
        "junk.nii.gz": (gzip.compress(b"\x07" * 600), "not a NIfTI file"),
        "short.nii.gz": (good.read_bytes()[:30], "corrupt or truncated"),
        "empty.nii": (b"", "the file is empty"),
        "short.nii": (_nifti1_bytes((8, 9, 10))[:200], "file too short for a NIfTI header (200 bytes)"),
        "cut.nii": (_nifti1_bytes((8, 9, 10))[:1000], "truncated file"),
        "junk.mha": (b"hello\n", "not in a recognised image format"),
        "cut.mha": (mha.read_bytes()[:-500], "could not be read"),
        "junk.nrrd": (b"NRRD0004\ntype: banana\n\n", 'invalid NRRD header: couldn\'t parse type "banana"'),
    }
    for name, (content, phrase) in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        readers = (read_image,) if name.startswith("cut") else (read_image, read_geometry)
        for reader in readers:
            with pytest.raises(ImageReadError) as exc:
                reader(path)
            _assert_plain(str(exc.value), path, "unreadable image", phrase)


def _oblique_affine():
    affine = np.eye(4)
    affine[:3, :3] = _rot([1, 2, 0.5], 23) @ np.diag([0.8, 1.3, 3.0])
    affine[:3, 3] = (-12.0, 40.5, 100.25)
    return affine


@pytest.mark.parametrize("variant", ["nifti2.nii", "nifti2.nii.gz", "gzip-named.nii", "nifti2-gzip-named.nii"])
def test_nifti2_and_gzip_named_nii_read_like_the_regular_file(tmp_path, variant):
    arr = np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10)  # nibabel order (i, j, k)
    regular = tmp_path / "regular.nii.gz"
    nib.save(nib.Nifti1Image(arr, _oblique_affine()), regular)
    klass = nib.Nifti2Image if variant.startswith("nifti2") else nib.Nifti1Image
    path = tmp_path / variant
    if "gzip-named" in variant:
        nib.save(klass(arr, _oblique_affine()), tmp_path / "tmp.nii")
        path.write_bytes(gzip.compress((tmp_path / "tmp.nii").read_bytes()))
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    else:
        nib.save(klass(arr, _oblique_affine()), path)
    if variant.startswith("nifti2"):
        data = gzip.decompress(path.read_bytes()) if path.read_bytes()[:2] == b"\x1f\x8b" else path.read_bytes()
        assert struct.unpack("<i", data[:4])[0] == 540

    expected = sitk.ReadImage(str(regular))
    got = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), arr.transpose(2, 1, 0))
    want = Geometry.from_sitk(expected)
    for geom in (Geometry.from_sitk(got), read_geometry(path)):
        assert geom.size == want.size
        np.testing.assert_allclose(geom.spacing, want.spacing, atol=1e-5)
        np.testing.assert_allclose(geom.origin, want.origin, atol=1e-4)
        np.testing.assert_allclose(geom.direction, want.direction, atol=1e-5)
    canon, g = load_volume(path, canonical=True)
    canon_want, g_want = load_volume(regular, canonical=True)
    np.testing.assert_array_equal(canon, canon_want)
    assert g.axis_codes() == g_want.axis_codes() == "LPS"
    assert nifti_integrity(path) == (None, 0, None)


def _nifti2_bytes(arr, path):
    nib.save(nib.Nifti2Image(arr, np.diag([0.8, 1.3, 3.0, 1.0])), path)
    return bytearray(path.read_bytes())


def test_nifti_integrity_checks_nifti2_and_gzip_named_nii(tmp_path):
    arr = np.zeros((8, 9, 10), np.float32)
    arr[1, 2, 3], arr[4, 5, 6] = np.nan, -np.inf
    path = tmp_path / "n2.nii"
    data = _nifti2_bytes(arr, path)
    assert nifti_integrity(path) == (None, 2, None)
    # the same bytes gzip-compressed under a plain .nii name
    zipped = tmp_path / "zipped.nii"
    zipped.write_bytes(gzip.compress(bytes(data)))
    assert nifti_integrity(zipped) == (None, 2, None)
    zipped.write_bytes(gzip.compress(bytes(data))[:-40])
    problem, _, _ = nifti_integrity(zipped)
    assert problem and "corrupt or truncated" in problem
    # truncated NIfTI-2
    cut = tmp_path / "cut.nii"
    cut.write_bytes(bytes(data[:-100]))
    problem, _, _ = nifti_integrity(cut)
    assert problem and problem.startswith("truncated file")
    with pytest.raises(ImageReadError) as exc:
        read_image(cut)
    _assert_plain(str(exc.value), cut, "unreadable image", "truncated file")
    # zero voxel size in the NIfTI-2 header (pixdim float64 at byte 104)
    struct.pack_into("<d", data, 104 + 8 * 2, 0.0)
    flat = tmp_path / "pixdim.nii"
    flat.write_bytes(bytes(data))
    problem, n_bad, header = nifti_integrity(flat)
    assert problem is None and n_bad == 2
    assert header and "voxel size (pixdim) (0.8, 0.0, 3.0)" in header


def test_nifti_integrity_counts_only_truly_non_finite_float64(tmp_path):
    arr = np.zeros((8, 9, 10), np.float64)
    arr[0, 0, 0], arr[1, 1, 1] = 1e300, -1e300  # finite, though beyond float32's range
    path = tmp_path / "big.nii"
    path.write_bytes(_nifti1_bytes((8, 9, 10), datatype=64, bitpix=64, data=arr.tobytes(order="F")))
    assert nifti_integrity(path) == (None, 0, None)
    arr[2, 2, 2] = np.nan
    path.write_bytes(_nifti1_bytes((8, 9, 10), datatype=64, bitpix=64, data=arr.tobytes(order="F")))
    assert nifti_integrity(path) == (None, 1, None)
    n2 = tmp_path / "big2.nii"
    nib.save(nib.Nifti2Image(arr, np.eye(4)), n2)
    assert nifti_integrity(n2) == (None, 1, None)
