"""The phantom generator's ground truth is what tests and the demo rely on."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from spinelm import labels as L
from spinelm.io import Geometry, read_landmarks
from spinelm.synthetic import PhantomConfig, make_phantom

CFG = PhantomConfig(modality="mixed", max_voxels=800_000)


@pytest.mark.parametrize("index", range(8))
def test_centroids_lie_in_their_own_vertebra(index):
    ph = make_phantom(3, index, CFG)
    mask = sitk.GetArrayFromImage(ph.mask)
    g = ph.geometry
    assert ph.landmarks, "every phantom shows at least one vertebra centre"
    for lm in ph.landmarks:
        idx = np.round(g.world_to_array_index(lm.position_mm)).astype(int)
        lo, hi = np.maximum(idx - 1, 0), np.minimum(idx + 2, mask.shape)
        near = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        assert (near == lm.label).any(), f"{lm.name} centroid not on its vertebra (index {index})"


@pytest.mark.parametrize("index", range(8))
def test_visible_vertebrae_form_an_anatomical_run(index):
    ph = make_phantom(3, index, CFG)
    present = L.sort_cranio_caudal(set(np.unique(sitk.GetArrayFromImage(ph.mask)).tolist()) - {0})
    for a, b in zip(present, present[1:]):
        assert b in L.successors(a), f"{L.name_of(a)} followed by {L.name_of(b)}"


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, b, c = make_phantom(5, 2, CFG), make_phantom(5, 2, CFG), make_phantom(6, 2, CFG)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(b.image))
    assert a.landmarks == b.landmarks
    assert a.geometry != c.geometry


def test_phantoms_vary_orientation_spacing_contrast_and_field_of_view():
    phs = [make_phantom(11, i, CFG) for i in range(12)]
    assert len({p.geometry.axis_codes() for p in phs}) >= 4
    assert any(max(p.geometry.spacing) / min(p.geometry.spacing) > 2 for p in phs)  # thick slices
    assert any(not np.allclose(np.abs(np.asarray(p.geometry.direction)), np.round(np.abs(p.geometry.direction)))
               for p in phs)  # oblique
    assert {p.contrast for p in phs} >= {"CT", "T2"}
    firsts = {p.info["sequence"][0] for p in phs}
    assert len(firsts) >= 4  # runs start at different levels


def test_ct_phantoms_are_in_hounsfield_units():
    ph = make_phantom(1, 0, PhantomConfig(modality="CT", max_voxels=400_000))
    img = sitk.GetArrayFromImage(ph.image)
    mask = sitk.GetArrayFromImage(ph.mask)
    assert img.min() < -900  # air
    assert np.median(img[mask > 0]) > 150  # bone


def test_transitional_vertebrae_appear_when_asked():
    cfg = PhantomConfig(p_t13=1.0, p_l6=1.0, min_vertebrae=27, max_vertebrae=30, max_voxels=300_000)
    ph = make_phantom(0, 0, cfg)
    names = ph.info["sequence"]
    assert names.index("T13") == names.index("T12") + 1 and names.index("L6") == names.index("L5") + 1


def test_written_dataset_has_nnunet_layout_and_consistent_files(phantom_dataset):
    ds = phantom_dataset
    assert sorted(p.name for p in (ds / "imagesTr").iterdir())[0] == "phantom_000_0000.nii.gz"
    assert (ds / "labelsTr" / "phantom_000.nii.gz").is_file()
    assert (ds / "imagesUnlabelled" / "phantom_004_0000.nii.gz").is_file()
    rows = (ds / "classesTr.csv").read_text().splitlines()
    assert rows[0] == "case,label,class" and len(rows) > 4
    img = sitk.ReadImage(str(ds / "imagesTr" / "phantom_001_0000.nii.gz"))
    lms = read_landmarks(ds / "centroidsTr" / "phantom_001.json")
    g = Geometry.from_sitk(img)
    assert all(g.contains(lm.position_mm) for lm in lms)


def test_dixon_phantoms_show_the_whole_column_in_water_and_fat_on_one_axial_grid():
    cfg = PhantomConfig(protocol="dixon", channels=4, max_voxels=400_000)
    ph = make_phantom(3, 0, cfg)
    assert len(ph.channels) == 4 and ph.contrast == "dixon"
    geoms = {Geometry.from_sitk(c) for c in ph.channels} | {Geometry.from_sitk(ph.mask)}
    assert len(geoms) == 1  # every channel and the mask on one grid
    names = [L.name_of(lm.label) for lm in ph.landmarks]
    assert names[0] == "C1" and names[-1] == "S1" and {"T1", "T12", "L1", "L5"} <= set(names)
    g = ph.geometry
    si = int(np.argmax(np.abs(g.matrix[2])))
    assert g.spacing[si] == max(g.spacing)  # axial slices: the thick axis runs head to foot
    assert g.size[si] * g.spacing[si] > 700  # neck to thighs
    water, fat, inphase, opposed = (sitk.GetArrayFromImage(c).astype(float) for c in ph.channels)
    mask = sitk.GetArrayFromImage(ph.mask)
    assert np.allclose(inphase, water + fat, atol=0.15 * inphase.max())
    # marrow carries both signals; the body outline (subcutaneous fat) is bright in fat, dark in water
    bone = mask > 0
    assert fat[bone].mean() > 0.2 * water[bone].mean()
    rim = (fat > np.percentile(fat, 97))
    assert fat[rim].mean() > 3 * water[rim].mean()


def test_bad_protocol_settings_are_refused_in_words():
    with pytest.raises(ValueError, match="protocol"):
        PhantomConfig(protocol="dwi")
    with pytest.raises(ValueError, match="2 or 4 channel"):
        PhantomConfig(protocol="dixon", channels=3)


def test_ribs_are_bone_beside_the_thoracic_spine_falling_towards_the_feet_and_nothing_else_changes():
    cfg = PhantomConfig(modality="CT", min_vertebrae=8, max_vertebrae=8, max_voxels=800_000)
    seed, index = 7, 0
    plain = make_phantom(seed, index, cfg)
    while not any(L.region_of(L.label_of(n)) == "thoracic" for n in plain.info["sequence"][2:-2]):
        index += 1
        plain = make_phantom(seed, index, cfg)
    ribbed = make_phantom(seed, index, PhantomConfig(**{**cfg.__dict__, "ribs": True}))
    # the same column, grid and ground truth: only the image gains the ribs
    assert plain.info == ribbed.info
    assert np.array_equal(sitk.GetArrayFromImage(plain.mask), sitk.GetArrayFromImage(ribbed.mask))
    assert [lm.position_mm for lm in plain.landmarks] == [lm.position_mm for lm in ribbed.landmarks]
    a = sitk.GetArrayFromImage(ribbed.image).astype(float)
    b = sitk.GetArrayFromImage(plain.image).astype(float)
    rib = (a - b) > 100  # HU: bone over muscle, fat or lung
    assert rib.sum() > 500
    # each rib runs from the side of its vertebra out and round the chest, falling towards the feet
    from spinelm.synthetic import _build_column, _rib_paths

    column = _build_column(np.random.default_rng(0), [L.label_of(n) for n in ("T5", "T6", "T7")], cfg)
    torso = {"ra": 150.0, "rb": 110.0, "cy": -60.0, "fat": 0.1}
    for vert in column:
        for side, path in zip((-1, 1), _rib_paths(vert, torso, np.random.default_rng(1))):
            local = (path - vert.center) @ vert.frame  # (left, posterior, superior) of the vertebra
            assert np.all(np.sign(local[5:, 0]) == side)
            assert local[:, 0].__abs__().max() > 80  # out to the side of the chest
            assert local[-1, 1] < -60  # round to the front
            assert local[-1, 2] < local[0, 2] - 25  # lower at the front than at the spine


def test_posture_turns_the_whole_column_and_keeps_its_centroids_on_their_vertebrae():
    cfg = PhantomConfig(max_voxels=600_000, min_vertebrae=8, max_vertebrae=8)
    upright = make_phantom(5, 1, cfg)
    turned = make_phantom(5, 1, PhantomConfig(**{**cfg.__dict__, "posture_deg": 10.0}))
    a = {lm.label: np.asarray(lm.position_mm) for lm in upright.landmarks}
    b = {lm.label: np.asarray(lm.position_mm) for lm in turned.landmarks}
    common = sorted(set(a) & set(b), key=L.cranio_caudal_rank)
    assert len(common) >= 6
    # the same column (every distance kept), turned as a whole: the head-foot axis tilts
    for i in range(len(common)):
        for j in range(i + 1, len(common)):
            d0 = np.linalg.norm(a[common[i]] - a[common[j]])
            assert np.isclose(np.linalg.norm(b[common[i]] - b[common[j]]), d0, rtol=1e-6)
    span_a, span_b = a[common[-1]] - a[common[0]], b[common[-1]] - b[common[0]]
    angle = np.degrees(np.arccos(np.dot(span_a, span_b) / np.linalg.norm(span_a) / np.linalg.norm(span_b)))
    assert angle > 0.5
    mask = sitk.GetArrayFromImage(turned.mask)
    for lm in turned.landmarks:
        idx = np.round(turned.geometry.world_to_array_index(lm.position_mm)).astype(int)
        lo, hi = np.maximum(idx - 1, 0), np.minimum(idx + 2, mask.shape)
        assert (mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == lm.label).any()
    with pytest.raises(ValueError, match="posture"):
        PhantomConfig(posture_deg=-1)
