"""Per-vertebra classification: classesTr.csv with raters and probabilities, the plan field, the
locality guarantee, the metrics, and the outputs of predict / evaluate / predict --masks."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from spinelm import labels as L
from spinelm.classification import (ClassCropSampler, Classifier, class_metrics, dilation_structure,
                                    plan_classification, roc_auc, soft_targets, vertebra_crop)
from spinelm.dataset import discover_dataset

L1, L2, L3 = (L.label_of(n) for n in ("L1", "L2", "L3"))


# ------------------------------------------------------------------------------ classesTr.csv


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_rater_rows_and_probabilities_become_soft_targets(phantom_copy):
    case = discover_dataset(phantom_copy).cases[0].case_id
    _write(phantom_copy / "classesTr.csv", "case,label,class,rater\n"
           f"{case},L1,normal,a\n{case},L1,oedema,b\n{case},L1,oedema,c\n{case},L2,2,a\n")
    ds = discover_dataset(phantom_copy)
    assert not [p for p in ds.problems if p.severity == "error"]
    rows = ds.case(case).classes
    t = soft_targets(rows, ["normal", "oedema", "wedge_fracture"])
    np.testing.assert_allclose(t[L1], [1 / 3, 2 / 3, 0])
    # the class code 2 becomes its dataset.json name
    np.testing.assert_allclose(t[L2], [0, 0, 1])

    # a probability below 1 leaves the rest to the other classes
    t = soft_targets([(L3, "oedema", 0.7)], ["normal", "oedema", "wedge_fracture"])
    np.testing.assert_allclose(t[L3], [0.15, 0.7, 0.15])


@pytest.mark.parametrize("text, message", [
    ("case,label,class\n{c},L1,normal\n{c},L1,oedema\n", "conflicting rows"),
    ("case,label,class,rater\n{c},L1,normal,a\n{c},L1,oedema,a\n", "by rater 'a'"),
    ("case,label,class,probability\n{c},L1,normal,1.7\n", "not a number between 0 and 1"),
    ("case,label,class,grade\n{c},L1,normal,3\n", "unknown column"),
    ("case,label,class\n{c},L1,\n", "empty class"),
])
def test_bad_class_rows_are_reported_with_file_and_row(phantom_copy, text, message):
    case = discover_dataset(phantom_copy).cases[0].case_id
    _write(phantom_copy / "classesTr.csv", text.format(c=case))
    errors = [p for p in discover_dataset(phantom_copy).problems if p.severity == "error"]
    assert errors and message in errors[0].message
    assert "classesTr.csv" in errors[0].path  # with the row number where there is one


def test_fingerprint_counts_classes_per_label(phantom_dataset):
    from spinelm.fingerprint import class_statistics

    ds = discover_dataset(phantom_dataset)
    stats = class_statistics(ds, [c.case_id for c in ds.cases])
    with open(phantom_dataset / "classesTr.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert stats["names"][:3] == ["normal", "oedema", "wedge_fracture"]
    assert stats["vertebrae"] == len(rows)
    assert sum(sum(v.values()) for v in stats["per_label"].values()) == len(rows)
    assert stats["counts"]["oedema"] == sum(r["class"] == "1" for r in rows)


# ------------------------------------------------------------------------------ plan


def test_plan_sizes_the_crop_from_vertebra_extents_and_pooling():
    fp = {"classes": {"names": ["normal", "fracture"]},
          "spine": {"vertebra_extent_mm": {"L1": {"si": 40.0, "ap": 80.0, "lr": 70.0},
                                           "L5": {"si": 45.0, "ap": 90.0, "lr": 75.0}}}}
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 1], [2, 2, 2]]
    spec = plan_classification(fp, [3.0, 2.0, 2.0], strides, [0, 1, 2])
    assert spec["classes"] == ["normal", "fracture"]
    for n, s, f, ext in zip(spec["crop_size"], [3.0, 2.0, 2.0], [8, 8, 4], [45, 90, 75]):
        assert n % f == 0  # the encoder pools it evenly
        assert n * s >= 1.3 * ext + 6  # the largest vertebra and the margin fit
    # network axes follow the transpose: the crop along network axis 0 holds the L-R extent
    spec_t = plan_classification(fp, [2.0, 2.0, 2.0], [[1, 1, 1]], [2, 0, 1])
    assert spec_t["crop_size"][0] == int(np.ceil((1.3 * 75 + 6) / 2))
    assert plan_classification({**fp, "classes": {"names": ["normal"]}}, [2, 2, 2], strides, [0, 1, 2]) is None


# ------------------------------------------------------------------------------ locality


def _tiny_classifier(seed=0, in_channels=1, mirror_axes=None):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from spinelm.classification import attach_head

    torch.manual_seed(seed)
    net = PlainConvUNet(in_channels, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    spec = {"classes": ["normal", "oedema", "wedge_fracture"], "crop_size": [16, 16, 16], "margin_mm": 3.0}
    attach_head(net, spec)
    # a trained head is not needed to show locality, but its output must depend on the image: scale the weights
    with torch.no_grad():
        for p in net.class_head.parameters():
            p.mul_(5.0)
    return Classifier([net.eval()], spec, [1.5, 1.5, 1.5], mirror_axes=mirror_axes)


def _two_vertebrae(rng):
    data = rng.normal(size=(1, 40, 30, 30)).astype(np.float32)
    inst = np.zeros((40, 30, 30), np.int16)
    inst[8:16, 10:20, 10:20] = L2
    inst[22:30, 10:20, 10:20] = L3  # 6 voxels (9 mm) below L2, beyond L2's 3 mm margin
    return data, inst


def test_a_vertebra_class_depends_on_its_own_voxels_only():
    """The locality guarantee: voxels outside L2's mask dilated by the margin (here L3, the rest of the
    field of view) do not change L2's probabilities at all; L2's own voxels do."""
    clf = _tiny_classifier()
    rng = np.random.default_rng(0)
    data, inst = _two_vertebrae(rng)
    before = clf(data, inst, [L2, L3])

    outside = ~np.isin(np.arange(inst.size).reshape(inst.shape),  # voxels beyond L2's dilated mask
                       np.flatnonzero(__import__("scipy").ndimage.binary_dilation(
                           inst == L2, structure=dilation_structure(3.0, [1.5] * 3))))
    changed = data.copy()
    changed[:, outside] = rng.normal(0.0, 3.0, size=int(outside.sum()))  # everything else replaced
    changed[:, 22:26][:, inst[22:26] == L3] += 8.0  # and half of L3 turned bright (oedema)
    after = clf(changed, inst, [L2, L3])
    for name in before[L2]:
        assert after[L2][name] == pytest.approx(before[L2][name], abs=1e-6)
    # an untrained head reacts weakly (instance normalisation removes the crop's overall level), but
    # 100x more than the float tolerance above
    assert max(abs(after[L3][n] - before[L3][n]) for n in before[L3]) > 1e-4  # L3's own voxels changed

    own = data.copy()
    own[:, 8:12][:, inst[8:12] == L2] += 8.0  # the upper half of L2
    moved = clf(own, inst, [L2])
    assert max(abs(moved[L2][n] - before[L2][n]) for n in before[L2]) > 1e-4


def test_test_time_mirroring_averages_the_mirrored_crops_and_keeps_locality():
    """With the plan's mirror axes, a vertebra's probabilities are the mean over its crop mirrored along
    every combination of them (what training shows the head), still from its own voxels only."""
    plain, mirrored = _tiny_classifier(), _tiny_classifier(mirror_axes=[0, 2])
    assert len(mirrored.flips) == 4
    rng = np.random.default_rng(3)
    data, inst = _two_vertebrae(rng)
    crop = vertebra_crop(data, inst == L2, plain.crop_size, plain.structure)
    views = [crop, crop[:, ::-1], crop[:, :, :, ::-1], crop[:, ::-1, :, ::-1]]
    expected = np.mean([plain.probabilities(np.ascontiguousarray(v)[None])[0] for v in views], axis=0)
    got = mirrored(data, inst, [L2])[L2]
    np.testing.assert_allclose([got[n] for n in plain.names], expected, atol=1e-6)
    assert np.abs(expected - plain.probabilities(crop[None])[0]).max() > 1e-5  # the mirroring does something

    beyond = ~__import__("scipy").ndimage.binary_dilation(inst == L2, structure=dilation_structure(3.0, [1.5] * 3))
    changed = data.copy()
    changed[:, beyond] = rng.normal(0.0, 3.0, size=int(beyond.sum()))  # everything beyond L2's margin, in its crop too
    after = mirrored(changed, inst, [L2])[L2]
    for name in got:
        assert after[name] == pytest.approx(got[name], abs=1e-6)


def test_without_the_mask_the_same_head_sees_its_neighbours():
    """The leakage an unmasked crop would have: the same crop and head, nothing blanked."""
    clf = _tiny_classifier()
    rng = np.random.default_rng(1)
    data, inst = _two_vertebrae(rng)
    crop = vertebra_crop(data, inst == L2, clf.crop_size, None)  # no masking
    changed = data.copy()
    changed[:, 17:20, 10:20, 10:20] += 8.0  # the disc below L2, beyond its 3 mm margin but inside its crop
    crop2 = vertebra_crop(changed, inst == L2, clf.crop_size, None)
    leak = np.abs(clf.probabilities(crop[None]) - clf.probabilities(crop2[None])).max()
    assert leak > 1e-4


def test_crop_blanks_everything_outside_the_dilated_mask():
    data = np.arange(20 ** 3, dtype=np.float32).reshape(1, 20, 20, 20)
    own = np.zeros((20, 20, 20), bool)
    own[8:12, 8:12, 8:12] = True
    crop, kept = vertebra_crop(data, own, [12, 12, 12], dilation_structure(1.0, [1, 1, 1]), -7.0, return_mask=True)
    assert crop.shape == (1, 12, 12, 12)
    assert kept.sum() == 4 ** 3 + 6 * 4 ** 2  # the cube and one voxel on each face
    assert np.all(crop[0][~kept] == -7.0)
    window = data[0, 4:16, 4:16, 4:16]  # centred on the mask's centre (9.5 -> from voxel 4)
    np.testing.assert_array_equal(crop[0][kept], window[kept])
    with pytest.raises(ValueError, match="empty"):
        vertebra_crop(data, np.zeros_like(own), [12, 12, 12], dilation_structure(1.0, [1, 1, 1]))


# ------------------------------------------------------------------------------ metrics


def test_auc_and_balanced_accuracy_on_hand_computed_examples():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert np.isnan(roc_auc([0.1, 0.2], [0, 0]))
    names = ["normal", "oedema"]
    truth = ["normal"] * 8 + ["oedema"] * 2
    probs = [{"normal": 0.9, "oedema": 0.1}] * 7 + [{"normal": 0.4, "oedema": 0.6}] + \
            [{"normal": 0.3, "oedema": 0.7}, {"normal": 0.8, "oedema": 0.2}]
    m = class_metrics(truth, probs, names)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((7 / 8 + 1 / 2) / 2)
    assert m["per_class"]["oedema"]["sensitivity"] == pytest.approx(0.5)
    assert m["per_class"]["oedema"]["specificity"] == pytest.approx(7 / 8)
    assert m["confusion_matrix"]["counts"] == [[7, 1], [1, 1]]


# ------------------------------------------------------------------------------ training and outputs


@pytest.fixture(scope="module")
def class_model(phantom_dataset, tmp_path_factory):
    """A model with a classification head trained for a few steps (runs, not accurate)."""
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.pipeline import preprocess, train
    from spinelm.planning import plan, save_plans

    fp = compute_fingerprint(phantom_dataset, num_workers=0, progress=False)
    plans = plan(fp, device="cpu", time_budget_min=2, seconds_per_mvoxel=5.0)
    assert plans["classification"]["classes"][:3] == ["normal", "oedema", "wedge_fracture"]
    model = tmp_path_factory.mktemp("cls") / "model"
    model.mkdir()
    save_plans(plans, model / "plans.json")
    preprocess(phantom_dataset, model, 0, progress=False)
    train(model, 0, epochs=1, iterations_per_epoch=2, validate_every=1, progress=False, max_validation_cases=1,
          device="cpu")
    return model


def test_the_predictor_mirrors_class_crops_as_the_plan_says(class_model):
    from spinelm.inference import Predictor
    from spinelm.plans import ModelFolder

    plans = ModelFolder(class_model).plans
    assert plans.classification["test_time_mirror"] is True
    pred = Predictor.from_model_folder(class_model)
    assert sorted(map(len, pred.classifier.flips)) == sorted(bin(i).count("1") for i in range(4))
    raw = json.loads((class_model / "plans.json").read_text())
    assert all(raw["cranio_caudal_axis"] + 2 not in dims for dims in pred.classifier.flips)  # never head to foot
    raw["classification"]["test_time_mirror"] = False
    assert Predictor(raw, pred.networks).classifier.flips == [[]]


def test_class_crops_are_balanced_and_training_validates_classes(class_model):
    from spinelm.plans import ModelFolder

    model = ModelFolder(class_model)
    cases = json.loads((model.cache_dir() / "cache.json").read_text())["cases"]
    sampler = ClassCropSampler(model.cache_dir(), cases, model.plans)
    assert len(sampler) > 0
    rng = np.random.default_rng(0)
    batch = sampler.batch(rng, 60)
    assert batch["class_image"].shape == (60, 1, *model.plans.classification["crop_size"])
    seen = batch["class_target"].argmax(1).bincount(minlength=len(sampler.names)).numpy()
    present = [k for k in range(len(sampler.names)) if any(np.argmax(it[2]) == k for it in sampler.items)]
    assert all(seen[k] >= 8 for k in present)  # every class drawn about equally often
    state = torch.load(model.checkpoint(0), map_location="cpu", weights_only=True)
    assert any(k.startswith("class_head.") for k in state["network"])  # the head is saved with the network
    log = (model.fold_dir(0) / "training_log.txt").read_text()
    assert "classification:" in log
    assert "class loss" in log  # the class head's own loss is logged, so a user sees when it starts to learn
    meta = json.loads((model.fold_dir(0) / "checkpoint_latest.json").read_text())
    assert len(meta["log"]["head_loss"]["class"]) == len(meta["log"]["epoch"])
    assert 0 < meta["log"]["head_loss"]["class"][-1] < 10
    assert meta["log"]["val_class_epoch"] == meta["log"]["val_epoch"]


def test_predict_writes_classes_and_evaluate_scores_them(class_model, phantom_dataset, tmp_path, capsys):
    from spinelm.cli import main

    out = tmp_path / "pred"
    case = sorted(p.name for p in (phantom_dataset / "imagesTr").iterdir())[0]
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(phantom_dataset / "imagesTr" / case, src / case)
    cid = case.replace("_0000.nii.gz", "")
    assert main(["predict", "-i", str(src), "-o", str(out), "-m", str(class_model), "--no-progress"]) == 0
    doc = json.loads((out / f"{cid}_ctd.json").read_text())
    classified = [v for v in doc["vertebrae"] if "class" in v]
    names = ["normal", "oedema", "wedge_fracture"]
    for v in classified:
        assert set(v["class_probabilities"]) >= set(names)
        assert sum(v["class_probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert v["class"] == max(v["class_probabilities"], key=v["class_probabilities"].get)
    if classified:
        rows = list(csv.DictReader(open(out / f"{cid}_classes.csv")))
        assert [r["name"] for r in rows] == [v["name"] for v in classified]
        summary = list(csv.DictReader(open(out / "summary.csv")))[0]
        assert sum(int(x.split(":")[1]) for x in summary["classes"].split()) == len(classified)

    # grading the ground-truth masks: one class per annotated vertebra, centroids from the masks
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(phantom_dataset / "labelsTr" / f"{cid}.nii.gz", masks / f"{cid}.nii.gz")
    out2 = tmp_path / "graded"
    assert main(["predict", "-i", str(src), "-o", str(out2), "-m", str(class_model), "--masks", str(masks),
                 "--no-progress"]) == 0
    graded = json.loads((out2 / f"{cid}_ctd.json").read_text())["vertebrae"]
    gt = json.loads((phantom_dataset / "centroidsTr" / f"{cid}.json").read_text())["vertebrae"]
    assert {v["name"] for v in graded} >= {v["name"] for v in gt}
    assert all("class" in v for v in graded)
    capsys.readouterr()
    assert main(["evaluate", str(out2), str(phantom_dataset)]) == 0
    text = capsys.readouterr().out
    with open(phantom_dataset / "classesTr.csv", newline="") as fh:
        n_rows = sum(r["case"] == cid for r in csv.DictReader(fh))
    assert f"classes of {n_rows} vertebrae (0 annotated not found)" in text
    assert "balanced accuracy" in text and "confusion" in text

    # a scan without a mask fails alone, with a clear line
    empty = tmp_path / "nomasks"
    empty.mkdir()
    assert main(["predict", "-i", str(src), "-o", str(tmp_path / "x"), "-m", str(class_model), "--masks",
                 str(empty), "--no-progress"]) == 1
    assert f"no mask {cid}.nii.gz" in capsys.readouterr().err


def test_training_mask_perturbations_stay_near_the_vertebra():
    from spinelm.classification import perturb_mask

    own = np.zeros((30, 30, 30), bool)
    own[10:20, 8:22, 9:21] = True
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(40):
        m = perturb_mask(own, rng)
        assert m.any()
        grown = __import__("scipy").ndimage.binary_dilation(own)
        assert not (m & ~grown).any()  # never more than one voxel beyond the mask
        sizes.append(int(m.sum()))
    assert min(sizes) < own.sum() < max(sizes)  # both shrunk/cut and grown masks occur


def test_class_names_without_any_class_row_plan_no_head(phantom_copy):
    """dataset.json may name classes while classesTr.csv is absent: no head is planned then."""
    from spinelm.fingerprint import class_statistics

    (phantom_copy / "classesTr.csv").unlink()
    ds = discover_dataset(phantom_copy)
    assert class_statistics(ds, [c.case_id for c in ds.cases]) == {}
    fp = {"classes": {}, "spine": {"vertebra_extent_mm": {"L1": {"si": 40.0, "ap": 80.0, "lr": 70.0}}}}
    assert plan_classification(fp, [2, 2, 2], [[1, 1, 1]], [0, 1, 2]) is None


def test_class_head_learns_at_its_own_rate(class_model):
    """The head gets HEAD_LR_FACTOR of the schedule's rate (at the full rate it stayed at uniform output)."""
    from spinelm.classification import HEAD_LR_FACTOR
    from spinelm.network import build_network
    from spinelm.plans import ModelFolder
    from spinelm.training import make_optimizer, set_lr

    plans = ModelFolder(class_model).plans
    assert plans.classification["lr_factor"] == HEAD_LR_FACTOR < 1
    net = build_network(plans)
    opt = make_optimizer(net, "adamw", 3e-3)
    head = {id(p) for p in net.class_head.parameters()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))  # none lost, none twice
    (own,) = [g for g in opt.param_groups if any(id(p) in head for p in g["params"])]
    assert {id(p) for p in own["params"]} == head
    rest = [g for g in opt.param_groups if g is not own]
    assert own["lr"] == pytest.approx(3e-3 * HEAD_LR_FACTOR) and all(g["lr"] == pytest.approx(3e-3) for g in rest)
    set_lr(opt, 1e-3)  # the schedule scales both alike
    assert own["lr"] == pytest.approx(1e-3 * HEAD_LR_FACTOR) and all(g["lr"] == pytest.approx(1e-3) for g in rest)
