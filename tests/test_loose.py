"""Boxes and scribbles, the loosest voxel annotations: file formats, what training learns from each,
and the checks of ``spinelm validate``."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from spinelm import labels as L
from spinelm.io.boxes import Box, boxes_from_mask, rasterize_boxes, read_boxes, write_boxes_json
from spinelm.synthetic import IGNORE_VALUE, PhantomConfig, make_phantom, scribbles_from_mask, synthesize_dataset


@pytest.fixture(scope="module")
def boxes_and_scribbles(tmp_path_factory):
    """Four phantoms with classes: two annotated by boxes only, two by scribbles only."""
    out = tmp_path_factory.mktemp("loose") / "ds"
    synthesize_dataset(out, 4, seed=5, config=PhantomConfig(modality="MR", max_vertebrae=7, max_voxels=400_000,
                                                            p_class=0.2), progress=False, loose=1.0,
                       loose_kinds=("boxes", "scribbles"))
    return out


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path


def test_every_box_format_reads_as_the_same_box(tmp_path):
    rot = np.array([[np.cos(0.3), np.sin(0.3), 0], [-np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])  # rows: edges
    centre, size = np.array([10.0, -20.0, 35.0]), np.array([40.0, 30.0, 25.0])
    ref = Box(20, centre, rot, size)
    inside = centre + np.array([[0, 0, 0], [15, 0, 0], [0, 0, 12]]) @ rot
    outside = centre + np.array([[21, 0, 0], [0, 16, 0], [0, 0, 13]]) @ rot
    flip = np.array([-1, -1, 1])
    docs = {
        "lps.json": {"boxes": [{"label": "L1", "center_mm": centre.tolist(), "size_mm": size.tolist(),
                                "axes": rot.tolist()}]},
        "ras.json": {"coordinate_system": "RAS", "boxes": [{"label": 20, "center_mm": (centre * flip).tolist(),
                                                           "size_mm": size.tolist(), "axes": (rot * flip).tolist()}]},
        "roi.mrk.json": {"markups": [{"type": "ROI", "name": "L1", "coordinateSystem": "LPS", "center": centre.tolist(),
                                      "orientation": rot.T.ravel().tolist(), "size": size.tolist()}]},
        "roi_ras.mrk.json": {"markups": [{"type": "ROI", "name": "L1", "coordinateSystem": "RAS",
                                          "controlPoints": [{"position": (centre * flip).tolist()}],
                                          "orientation": (rot * flip).T.ravel().tolist(), "size": size.tolist()}]},
    }
    for name, doc in docs.items():
        (box,) = read_boxes(_write(tmp_path / name, doc))
        assert box.label == 20, name
        assert box.contains(inside).all() and not box.contains(outside).any(), name
    # a world-aligned box by its corners, and the writer's round trip
    (aligned,) = read_boxes(_write(tmp_path / "minmax.json", {"boxes": [{"label": 21, "min_mm": [0, 0, 0],
                                                                         "max_mm": [10, 20, 30]}]}))
    np.testing.assert_allclose(aligned.center_mm, [5, 10, 15])
    np.testing.assert_allclose(aligned.size_mm, [10, 20, 30])
    (back,) = read_boxes(write_boxes_json(tmp_path / "out.json", [ref]))
    np.testing.assert_allclose(back.corners(), ref.corners(), atol=1e-3)


@pytest.mark.parametrize("item, words", [
    ({"label": "X9", "center_mm": [0, 0, 0], "size_mm": [1, 1, 1]}, "unknown vertebra 'X9'"),
    ({"label": "L1", "center_mm": [0, 0], "size_mm": [1, 1, 1]}, "center_mm as three numbers"),
    ({"label": "L1", "center_mm": [0, 0, 0], "size_mm": [1, 0, 1]}, "size must be positive"),
    ({"label": "L1", "center_mm": [0, 0, 0], "size_mm": [1, 1, 1], "axes": [[1, 0, 0], [1, 0, 0], [0, 0, 1]]},
     "not three perpendicular directions"),
])
def test_a_bad_box_is_named_with_its_file_and_problem(tmp_path, item, words):
    path = _write(tmp_path / "case.json", {"boxes": [item]})
    with pytest.raises(ValueError, match=words) as info:
        read_boxes(path)
    assert str(path) in str(info.value)
    twice = _write(tmp_path / "twice.json", {"boxes": [{"label": "L1", "center_mm": [0, 0, 0], "size_mm": [1, 1, 1]}] * 2})
    with pytest.raises(ValueError, match="L1 has two boxes"):
        read_boxes(twice)


def test_phantom_boxes_hold_their_vertebra_and_teach_background_only_between_them():
    from spinelm.io.image import Geometry
    import SimpleITK as sitk

    ph = make_phantom(11, 3, PhantomConfig(modality="MR", max_vertebrae=6, max_voxels=400_000))
    mask = sitk.GetArrayFromImage(ph.mask).astype(np.int16)
    geom = Geometry.from_sitk(ph.mask)
    boxes = boxes_from_mask(mask, geom)
    assert [b.label for b in boxes] == sorted(set(np.unique(mask).tolist()) & set(L.VALID_LABELS),
                                              key=L.cranio_caudal_rank)
    for b in boxes:
        voxels = geom.array_index_to_world(np.argwhere(mask == b.label))
        assert b.contains(voxels).all()  # every voxel of the vertebra is in its box
    target = rasterize_boxes(boxes, geom, IGNORE_VALUE)
    assert set(np.unique(target).tolist()) == {0, IGNORE_VALUE}
    assert np.all(target[mask > 0] == IGNORE_VALUE)  # no vertebra voxel is ever called background
    assert np.count_nonzero(target == 0) > 0.2 * target.size  # but the background around them is taught
    heights = geom.array_index_to_world(np.argwhere(target == 0))[:, 2]
    span = np.concatenate([b.corners()[:, 2] for b in boxes])
    assert heights.min() >= span.min() - 1e-6 and heights.max() <= span.max() + 1e-6


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def test_a_boxed_vertebra_is_masked_by_a_vertebra_shape_not_by_its_box():
    """The class head sees a boxed vertebra through the mean shape of masked vertebrae stretched onto
    its box: much closer to the vertebra's own mask than the box, whatever order its axes come in."""
    import SimpleITK as sitk

    from spinelm.classification import shape_template, template_in_box
    from spinelm.io.boxes import parallelepiped_mask
    from spinelm.io.image import Geometry, to_canonical

    cfg = PhantomConfig(modality="MR", max_vertebrae=6, max_voxels=400_000)
    masks = [sitk.GetArrayFromImage(to_canonical(make_phantom(seed, 3, cfg).mask)) for seed in (15, 16)]
    template = shape_template([m == v for m in masks for v in np.unique(m) if v in L.VALID_LABELS])
    image = to_canonical(make_phantom(17, 4, cfg).mask)  # another phantom: its vertebrae by their boxes
    mask, geom = sitk.GetArrayFromImage(image), Geometry.from_sitk(image)
    whole = 0
    for b in boxes_from_mask(mask, geom):
        own = mask == b.label
        center, half = b.in_index_space(geom.world_to_array_index)
        shaped = template_in_box(mask.shape, center, half, template)
        boxed = parallelepiped_mask(mask.shape, center, half)
        assert 0 < shaped.sum() < boxed.sum() and not (shaped & ~boxed).any()
        idx = np.argwhere(own)
        if (idx.min(0) > 0).all() and (idx.max(0) < np.asarray(mask.shape) - 1).all():  # not cut by the border
            whole += 1
            assert _dice(shaped, own) > 0.45 and _dice(shaped, own) > _dice(boxed, own) + 0.15, b.label
        # the same box given with its half-axes reordered and reversed gives the same mask
        turned = template_in_box(mask.shape, center, -np.asarray(half)[[2, 0, 1]], template)
        assert np.array_equal(turned, shaped)
    assert whole >= 4
    # no masked vertebra to learn from: an ellipsoid that touches the box's faces
    ellipsoid = shape_template([])
    assert ellipsoid[12, 12, 12] == 1 and ellipsoid[0, 0, 0] == 0 and ellipsoid[12, 12, 0] == 1


def test_a_scribbled_vertebra_is_graded_through_the_box_its_strokes_span():
    """Strokes through the centroid cross the vertebral body: their box sits on the vertebra, holds its
    centroid, and is mostly the vertebra's own voxels."""
    import SimpleITK as sitk

    from spinelm.classification import stroke_boxes
    from spinelm.io.boxes import parallelepiped_mask
    from spinelm.io.image import Geometry

    ph = make_phantom(11, 3, PhantomConfig(modality="MR", max_vertebrae=6, max_voxels=400_000))
    mask = sitk.GetArrayFromImage(ph.mask).astype(np.int16)
    geom = Geometry.from_sitk(ph.mask)
    labels = [int(v) for v in np.unique(mask) if v in L.VALID_LABELS]
    centres = {lm.label: np.asarray(geom.world_to_array_index(np.asarray([lm.position_mm]))[0]) for lm in ph.landmarks}
    labels = [v for v in labels if v in centres]  # a vertebra cut by the border has no centroid
    strokes = scribbles_from_mask(mask, np.asarray([centres[v] for v in labels]), geom.array_spacing, IGNORE_VALUE)
    boxes = stroke_boxes(strokes, {v: v for v in labels}, (3, 3, 3))
    assert len(labels) >= 4 and set(boxes) == set(labels)
    for lab, box in boxes.items():
        inside = parallelepiped_mask(mask.shape, box["center"], box["half_axes"])
        assert inside[tuple(np.rint(centres[lab]).astype(int))], lab
        assert np.mean(mask[inside] == lab) > 0.5, lab


def test_scribbles_carry_only_true_values_away_from_boundaries():
    mask = np.zeros((30, 30, 30), np.int16)
    mask[5:14, 8:22, 8:22] = 20
    mask[16:25, 8:22, 8:22] = 21
    strokes = scribbles_from_mask(mask, np.array([[9, 15, 15], [20, 15, 15]]), (1.0, 1.0, 1.0), IGNORE_VALUE)
    marked = strokes != IGNORE_VALUE
    assert np.all(strokes[marked] == mask[marked])
    assert {0, 20, 21} <= set(np.unique(strokes[marked]).tolist())  # both vertebrae and the disc between them
    for lab in (20, 21):  # strokes, not a mask
        assert 0 < np.count_nonzero(strokes == lab) < 0.5 * np.count_nonzero(mask == lab)
    boundary = np.zeros_like(marked)
    boundary[[4, 5, 13, 14, 15, 16, 24, 25], :, :] = True
    assert not (marked & boundary).any()


def test_validate_checks_boxes_and_scribbles(boxes_and_scribbles, tmp_path):
    from spinelm.validation import validate_dataset

    report = validate_dataset(boxes_and_scribbles, num_workers=1, progress=False)
    assert report.ok, report.lines()
    ds = tmp_path / "ds"
    shutil.copytree(boxes_and_scribbles, ds)
    kinds = json.loads((ds / "annotations.json").read_text())
    box_case = next(c for c, k in kinds.items() if k == "boxes")
    scribble_case = next(c for c, k in kinds.items() if k == "scribbles")
    doc = json.loads((ds / "boxesTr" / f"{box_case}.json").read_text())
    doc["boxes"][0]["center_mm"] = [5000.0, 0.0, 0.0]
    (ds / "boxesTr" / f"{box_case}.json").write_text(json.dumps(doc))
    shutil.copy(ds / "scribblesTr" / f"{scribble_case}.nii.gz", ds / "labelsTr" / f"{scribble_case}.nii.gz")
    djson = json.loads((ds / "dataset.json").read_text())
    del djson["labels"]["ignore"]
    (ds / "dataset.json").write_text(json.dumps(djson))
    text = "\n".join(validate_dataset(ds, num_workers=1, progress=False).lines())
    assert f"boxesTr/{box_case}.json" in text and "outside the image" in text
    assert f"case {scribble_case!r} has both a mask (labelsTr) and scribbles" in text
    assert "scribblesTr/ needs an 'ignore' label in dataset.json" in text


def test_training_learns_from_boxes_and_scribbles_what_they_say(boxes_and_scribbles, tmp_path):
    from spinelm.classification import ClassCropSampler
    from spinelm.data import PatchSampler
    from spinelm.dataset import discover_dataset
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.losses import MultiTaskLoss
    from spinelm.pipeline import preprocess, train
    from spinelm.planning import plan, save_plans
    from spinelm.plans import as_plans

    ds = discover_dataset(boxes_and_scribbles)
    kinds = json.loads((boxes_and_scribbles / "annotations.json").read_text())
    assert {c.case_id: c.annotation for c in ds.cases} == kinds
    fp = compute_fingerprint(boxes_and_scribbles, num_workers=0, progress=False)
    plans = plan(fp, device="cpu", time_budget_min=2, seconds_per_mvoxel=5.0)
    assert plans.get("classification"), "the classes of box cases plan a classification head"
    model = tmp_path / "model"
    model.mkdir()
    save_plans(plans, model / "plans.json")
    preprocess(boxes_and_scribbles, model, 0, progress=False)
    cache = model / "preprocessed" / "fine"
    ignore = plans["heads"]["segmentation"]["channels"]
    for case, kind in kinds.items():
        props = json.loads((cache / f"{case}.json").read_text())
        seg = np.load(cache / f"{case}_seg.npy")[0]
        assert props["annotation"] == kind and props["has_mask"]
        inside = seg[seg >= 0]
        assert not props["landmarks_known"] and props["landmarks"] == []  # neither says where the centroids are
        if kind == "boxes":  # vertebrae unknown, background between them
            assert len(props["boxes"]) > 0 and set(np.unique(inside).tolist()) == {0, ignore}
        else:  # labels only on the strokes
            assert props["boxes"] == []
            assert np.mean(inside == ignore) > 0.95 and len(set(np.unique(inside).tolist()) - {0, ignore}) >= 2
    sampler = PatchSampler(cache, sorted(kinds), plans)
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(12):
        item = sampler.sample(rng)
        seen[kinds[item["case"]]] = bool(item["heatmap_known"])
    assert seen == {"boxes": False, "scribbles": False}
    # where a case does not say where its centroids are, the heatmap learns only from known background
    p = as_plans(plans)
    loss_fn = MultiTaskLoss(p.head_dict, 1)
    batch = sampler.batch(rng, 2)
    outputs = [torch.randn(2, p.n_outputs, *batch["image"].shape[2:])]
    unknown = torch.full_like(batch["seg"], ignore)
    _, parts = loss_fn(outputs, unknown, batch["heatmap"], heatmap_known=torch.tensor([False, False]))
    assert parts["heatmap"] == 0.0
    background = torch.zeros_like(batch["seg"])
    _, parts = loss_fn(outputs, background, torch.zeros_like(batch["heatmap"]), heatmap_known=torch.tensor([False, False]))
    from spinelm.network import split_heads
    expected = float((split_heads(outputs[0], p.head_dict)["heatmap"] ** 2).mean())  # every voxel known background
    assert parts["heatmap"] == pytest.approx(expected, rel=1e-5)
    _, known = loss_fn(outputs, unknown, batch["heatmap"], heatmap_known=torch.tensor([True, False]))
    assert known["heatmap"] > 0.0
    # the class head grades box cases from a vertebra shape inside each box, scribbled ones from their strokes' box
    classes = ClassCropSampler(cache, sorted(kinds), plans)
    rows = {c: len(json.loads((cache / f"{c}.json").read_text())["classes"]) for c in kinds}
    assert len(classes) + classes.not_in_mask == sum(rows.values()) and len(classes) >= 0.8 * sum(rows.values())
    assert {it[0] for it in classes.items} == set(kinds)
    assert {bool(it[1].get("from_strokes")) for it in classes.items if kinds[it[0]] == "scribbles"} == {True}
    assert set(classes.templates) == {None}  # no masked vertebra to average: boxes are masked by an ellipsoid
    crop, _ = classes.sample(rng)
    assert np.any(crop != classes.outside) and np.any(crop == classes.outside)
    result = train(model, 0, epochs=1, iterations_per_epoch=2, validate_every=5, progress=False,
                   max_validation_cases=1, device="cpu")
    # it trains end to end; no case has centroids, so there is nothing to score identification against
    assert (model / "fold_0" / "checkpoint_final.pt").is_file()
    assert result[0]["final"]["n_gt"] == 0


def test_a_vertebra_known_by_its_centroid_alone_is_graded_through_its_levels_mean_shape(tmp_path):
    """A centroid-only case's graded vertebrae join the class head's training: each through the mean
    box of its level (from the masked vertebrae) placed at its centroid, masked by the vertebra shape;
    that region lies mostly on the vertebra itself (checked against the mask the case was made with)."""
    from spinelm.classification import ClassCropSampler, template_in_box
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.pipeline import preprocess
    from spinelm.planning import plan, save_plans

    full = tmp_path / "full"
    synthesize_dataset(full, 6, seed=5, config=PhantomConfig(modality="MR", max_vertebrae=7, max_voxels=400_000,
                                                             p_class=0.2), progress=False)
    loose = tmp_path / "loose"
    shutil.copytree(full, loose)
    centroid_only = ["phantom_000", "phantom_001"]
    for case in centroid_only:
        (loose / "labelsTr" / f"{case}.nii.gz").unlink()
    fp = compute_fingerprint(loose, num_workers=0, progress=False)
    plans = plan(fp, device="cpu", time_budget_min=2, seconds_per_mvoxel=5.0)
    assert plans.get("classification")
    caches = {}
    for name, ds in (("loose", loose), ("full", full)):
        model = tmp_path / f"model_{name}"
        model.mkdir()
        save_plans(plans, model / "plans.json")
        preprocess(ds, model, 0, progress=False)
        caches[name] = model / "preprocessed" / "fine"
    cases = sorted(p.name[: -len(".json")] for p in caches["loose"].glob("phantom_*.json"))
    sampler = ClassCropSampler(caches["loose"], cases, plans)
    graded = [it for it in sampler.items if isinstance(it[1], dict) and it[1].get("from_centroid")]
    n_rows = sum(len(json.loads((caches["loose"] / f"{c}.json").read_text())["classes"]) for c in centroid_only)
    assert {it[0] for it in graded} == set(centroid_only) and len(graded) >= 0.8 * n_rows
    channel_of = {lab: i for i, lab in enumerate(plans["heads"]["segmentation"]["labels"], start=1)}
    on_vertebra = []
    for case, box, _ in graded:
        if box["label"] not in channel_of:  # a level no mask shows: no truth to compare on this plan's grid
            continue
        truth = np.load(caches["full"] / f"{case}_seg.npy")[0] == channel_of[box["label"]]
        template = sampler.templates.get(box["label"], sampler.templates[None])
        region = template_in_box(truth.shape, box["center"], box["half_axes"], template)
        on_vertebra.append(np.count_nonzero(region & truth) / max(np.count_nonzero(region), 1))
    assert len(on_vertebra) >= 5 and np.median(on_vertebra) > 0.5, np.round(on_vertebra, 2)
