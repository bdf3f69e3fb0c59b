"""Auxiliary structures (discs, canal, cord) and loose annotations (partial masks, centroids only):
what the phantoms write, how validation, the fingerprint, the plan and the cache read them, and that
training runs with both."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from spinelm import labels as L
from spinelm.preprocessing import structure_target
from spinelm.synthetic import IGNORE_VALUE, PhantomConfig, loose_annotation_kinds, synthesize_dataset


@pytest.fixture(scope="module")
def structured_loose(tmp_path_factory):
    """Four phantoms whose masks carry discs, canal and cord; half of them loosely annotated."""
    out = tmp_path_factory.mktemp("aux") / "ds"
    synthesize_dataset(out, 4, seed=3, config=PhantomConfig(modality="MR", min_vertebrae=5, max_vertebrae=7,
                                                            max_voxels=500_000, structures=True),
                       progress=False, loose=0.5)
    return out


def test_structure_values_follow_the_tptbox_convention():
    assert L.structure_of(100 + L.label_of("L4")) == "disc"
    assert L.structure_of(200 + L.label_of("C5")) == "endplate"
    assert L.structure_of(61) == "canal" and L.structure_of(60) == "cord"
    assert L.structure_of(L.label_of("L4")) is None and L.structure_of(99) is None


def test_structure_target_marks_unannotated_cases_and_ignored_voxels():
    mask = np.array([[0, 20, 120, 61], [60, 21, 29, 0]])
    t = structure_target(mask, ["disc", "canal", "cord"], ignore_value=29)
    assert t.tolist() == [[0, 0, 1, 2], [3, 0, 4, 0]]
    # a case that annotates no structure: its background is not known to be background
    assert np.all(structure_target(np.array([[0, 20]]), ["disc", "canal"]) == 3)


def test_phantoms_write_discs_canal_cord_and_loose_annotations(structured_loose):
    kinds = json.loads((structured_loose / "annotations.json").read_text())
    assert sorted(kinds.values()) == ["centroids", "full", "full", "partial"]
    assert kinds == {f"phantom_{i:03d}": k for i, k in
                     ((i, loose_annotation_kinds(4, 0.5, 3).get(i, "full")) for i in range(4))}
    assert json.loads((structured_loose / "dataset.json").read_text())["labels"]["ignore"] == IGNORE_VALUE
    for case, kind in kinds.items():
        mask_path = structured_loose / "labelsTr" / f"{case}.nii.gz"
        assert mask_path.is_file() == (kind != "centroids")
        assert (structured_loose / "centroidsTr" / f"{case}.json").is_file()
        if kind == "centroids":
            continue
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))).tolist())
        assert {L.CANAL, L.CORD} & values and any(L.structure_of(v) == "disc" for v in values)
        assert (IGNORE_VALUE in values) == (kind == "partial")
        lms = json.loads((structured_loose / "centroidsTr" / f"{case}.json").read_text())["vertebrae"]
        run = [lm["label"] for lm in sorted(lms, key=lambda lm: L.cranio_caudal_rank(lm["label"]))]
        shown = {v for v in values if L.is_valid_label(v)}
        # a partial mask leaves every other vertebra of the run unannotated; centroids stay complete
        if kind == "partial":
            assert shown >= set(run[0::2]) and not shown & set(run[1::2])
        else:
            assert shown >= set(run)
        # each disc is named after a vertebra of the case
        for v in values:
            if L.structure_of(v) == "disc":
                assert L.is_valid_label(v - L.DISC_OFFSET)


def test_validation_fingerprint_plan_and_training_take_structures_and_loose_masks(structured_loose, tmp_path):
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.pipeline import preprocess, train
    from spinelm.planning import plan, save_plans
    from spinelm.validation import validate_dataset

    report = validate_dataset(structured_loose, num_workers=1, progress=False)
    assert report.ok, report.lines()
    fp = compute_fingerprint(structured_loose, num_workers=0, progress=False)
    assert set(fp["spine"]["structures"]) == {"disc", "canal", "cord"}
    # discs do not leak into the vertebra labels (a clipped 1xx would read as T13)
    assert L.label_of("T13") not in fp["spine"]["segmentation_labels"]
    import dataclasses

    from spinelm.planning import load_preset

    preset = dataclasses.replace(load_preset("cpu"), reconstruction_weight=0.5)  # both auxiliary heads
    plans = plan(fp, preset=preset, device="cpu", time_budget_min=2, seconds_per_mvoxel=5.0)
    assert plans["heads"]["structures"]["names"] == ["disc", "canal", "cord"]
    assert plans["heads"]["reconstruction"]["channels"] == 1 and plans["heads"]["reconstruction"]["loss_weight"] == 0.5
    model = tmp_path / "model"
    model.mkdir()
    save_plans(plans, model / "plans.json")
    preprocess(structured_loose, model, 0, progress=False)
    kinds = json.loads((structured_loose / "annotations.json").read_text())
    cache = model / "preprocessed" / "fine"
    n_seg = plans["heads"]["segmentation"]["channels"]
    for case, kind in kinds.items():
        props = json.loads((cache / f"{case}.json").read_text())
        assert props["has_mask"] == (kind != "centroids")
        if kind == "centroids":
            continue
        seg = np.load(cache / f"{case}_seg.npy")
        assert seg.shape[0] == 2
        assert props["partial_mask"] == (kind == "partial")
        assert (n_seg in np.unique(seg[0])) == (kind == "partial")  # unannotated vertebrae are ignored
        assert set(np.unique(seg[1])) >= {0, 1, 2}
    result = train(model, 0, epochs=1, iterations_per_epoch=2, validate_every=5, progress=False,
                   max_validation_cases=1, device="cpu")
    assert np.isfinite(result[0]["final"]["id_rate"])
    # a model with the structures and reconstruction heads labels scans as any other
    from spinelm.predict import Predictor, read_scan

    predictor = Predictor.from_model_folder(model)
    case = sorted(kinds)[0]
    image, geom, _ = read_scan([structured_loose / "imagesTr" / f"{case}_0000.nii.gz"])
    res = predictor.predict_array(image, geom)
    assert res.instance_mask is not None and res.instance_mask.shape == image.shape[1:]


def test_hidden_blocks_are_zeroed_whole_and_drawn_from_the_seed():
    from spinelm.losses import hide_blocks

    images = torch.randn(2, 2, 20, 16, 12) + 5.0
    torch.manual_seed(0)
    masked, hidden = hide_blocks(images, 0.3, 4)
    assert hidden.shape == (2, 1, 20, 16, 12) and hidden.dtype == torch.bool
    assert 0.1 < hidden.float().mean() < 0.5
    assert bool((masked[hidden.expand_as(masked)] == 0).all())  # every channel of a hidden voxel
    assert torch.equal(masked[~hidden.expand_as(masked)], images[~hidden.expand_as(images)])
    blocks = hidden[0, 0].reshape(5, 4, 4, 4, 3, 4).float()  # whole 4-voxel blocks, never parts of one
    assert bool(((blocks.mean((1, 3, 5)) == 0) | (blocks.mean((1, 3, 5)) == 1)).all())
    torch.manual_seed(0)
    assert torch.equal(hide_blocks(images, 0.3, 4)[1], hidden)


def test_reconstruction_loss_counts_only_the_hidden_voxels():
    from spinelm.losses import MultiTaskLoss, hide_blocks

    heads = {"heatmap": {"channels": 1}, "reconstruction": {"channels": 1, "loss_weight": 2.0, "mask_ratio": 0.5,
                                                           "block": 2}}
    loss_fn = MultiTaskLoss(heads, 1)
    image = torch.randn(1, 1, 8, 8, 8)
    torch.manual_seed(1)
    _, hidden = hide_blocks(image, 0.5, 2)
    hm = torch.zeros(1, 1, 8, 8, 8)
    exact = torch.cat([hm, image], 1)
    _, parts = loss_fn([exact], None, hm, None, image, hidden)
    assert parts["reconstruction"] == 0.0
    wrong_outside = exact.clone()
    wrong_outside[:, 1:][~hidden] += 3.0  # errors where the input was visible do not count
    assert loss_fn([wrong_outside], None, hm, None, image, hidden)[1]["reconstruction"] == 0.0
    wrong_inside = exact.clone()
    wrong_inside[:, 1:][hidden] += 3.0
    total, parts = loss_fn([wrong_inside], None, hm, None, image, hidden)
    assert parts["reconstruction"] == pytest.approx(9.0)
    assert float(total) == pytest.approx(2.0 * 9.0 + parts["heatmap"], rel=1e-5)


def test_the_coarse_stage_trains_no_auxiliary_head():
    from spinelm.losses import AUXILIARY_CONFIGURATIONS, MultiTaskLoss

    heads = {"heatmap": {"channels": 1}, "structures": {"channels": 2, "names": ["disc"]},
             "reconstruction": {"channels": 1, "loss_weight": 1.0}}
    assert "coarse" not in AUXILIARY_CONFIGURATIONS and "fine" in AUXILIARY_CONFIGURATIONS
    image, hm = torch.randn(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8)
    out = torch.cat([hm, torch.randn(1, 2, 8, 8, 8), image + 3.0], 1)  # structures and reconstruction wrong
    structures = torch.ones(1, 1, 8, 8, 8, dtype=torch.long)
    hidden = torch.ones(1, 1, 8, 8, 8, dtype=torch.bool)
    _, fine = MultiTaskLoss(heads, 1)([out], None, hm, structures, image, hidden)
    coarse_fn = MultiTaskLoss(heads, 1, auxiliary=False)
    _, coarse = coarse_fn([out], None, hm, structures, image, hidden)
    assert fine["structures"] > 0 and fine["reconstruction"] > 0
    assert coarse["structures"] == 0.0 and coarse["reconstruction"] == 0.0 and coarse["heatmap"] == fine["heatmap"]
    assert not coarse_fn.has_reconstruction  # so the coarse step hides no block of its input
