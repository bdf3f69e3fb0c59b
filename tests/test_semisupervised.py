"""Learning from unlabelled scans: withheld labels, pseudo-label acceptance, self-training, pretraining."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spinelm import labels as L
from spinelm.io.landmarks import Landmark


def test_withhold_labels_keeps_the_folds_validation_and_n_labelled(phantom_dataset, tmp_path):
    from spinelm.dataset import discover_dataset
    from spinelm.semisupervised import withhold_labels

    rec = withhold_labels(phantom_dataset, tmp_path / "a", n_labelled=1, fold=0, n_folds=2, seed=3)
    again = withhold_labels(phantom_dataset, tmp_path / "b", n_labelled=1, fold=0, n_folds=2, seed=3)
    assert rec["labelled"] == again["labelled"]  # deterministic by seed
    ds = discover_dataset(tmp_path / "a")
    assert not [p for p in ds.problems if p.severity == "error"]
    assert sorted(c.case_id for c in ds.cases) == sorted(rec["labelled"] + rec["validation"])
    assert len(rec["labelled"]) == 1 and len(rec["validation"]) == 2
    # the withheld training case and the dataset's own unlabelled scan have no labels any more
    assert sorted(c.case_id for c in ds.unlabelled) == sorted(rec["withheld"] + rec["unlabelled_before"])
    assert len(rec["withheld"]) == 1
    assert not any((tmp_path / "a" / "labelsTr" / f"{c}.nii.gz").exists() for c in rec["withheld"])
    assert [dict(f) for f in ds.splits] == [{"train": rec["labelled"], "val": rec["validation"]}]
    with pytest.raises(FileExistsError):
        withhold_labels(phantom_dataset, tmp_path / "a", n_labelled=1, n_folds=2)
    with pytest.raises(ValueError, match="between 1 and"):
        withhold_labels(phantom_dataset, tmp_path / "c", n_labelled=5, n_folds=2)
    diverse = withhold_labels(phantom_dataset, tmp_path / "d", n_labelled=1, fold=0, n_folds=2, choose="diverse")
    assert diverse["choose"] == "diverse" and len(diverse["labelled"]) == 1
    with pytest.raises(ValueError, match="unknown choice"):
        withhold_labels(phantom_dataset, tmp_path / "e", n_labelled=1, n_folds=2, choose="best")


def test_a_datasets_splits_become_the_models_folds(phantom_copy, tmp_path):
    from spinelm.pipeline import plan_dataset
    from spinelm.validation import validate_dataset

    (phantom_copy / "splits.json").write_text(json.dumps([{"train": ["phantom_000"], "val": ["phantom_001"]}]))
    plans = plan_dataset(phantom_copy, tmp_path / "m", device="cpu", progress=False)
    assert plans.training["num_folds"] == 1
    assert json.loads((tmp_path / "m" / "splits.json").read_text()) == [{"train": ["phantom_000"],
                                                                          "val": ["phantom_001"]}]
    (phantom_copy / "splits.json").write_text(json.dumps([{"train": ["nope"], "val": ["phantom_001"]}]))
    report = validate_dataset(phantom_copy, progress=False)
    assert not report.ok and any("splits.json" in line and "nope" in line for line in report.lines())


def _result(labels, spacing_mm=25.0, probs=None, mask=True):
    """A fake prediction: vertebrae ``labels`` along z, ``spacing_mm`` apart (a list for uneven gaps)."""
    steps = spacing_mm if isinstance(spacing_mm, list) else [spacing_mm] * (len(labels) - 1)
    z = np.concatenate([[0.0], -np.cumsum(steps)])
    probs = probs or [0.95] * len(labels)
    cands = [SimpleNamespace(label_probs={lab: p}) for lab, p in zip(labels, probs)]
    lms = [Landmark(lab, (0.0, 0.0, float(zz))) for lab, zz in zip(labels, z)]
    inst = np.zeros((4, 4, len(labels) * 10), np.int16)
    for i, lab in enumerate(labels):
        if mask:
            inst[..., i * 10:(i + 1) * 10] = lab
    return SimpleNamespace(labelled=SimpleNamespace(candidates=cands, kept=list(range(len(labels))), labels=labels),
                           landmarks=lms, instance_mask=inst)


def test_only_anatomically_valid_confident_runs_are_accepted():
    from spinelm.semisupervised import accept

    run = [L.label_of(n) for n in ("L1", "L2", "L3", "L4", "L5")]
    assert accept(_result(run)).accepted
    assert "skip" in accept(_result([run[0], run[1], run[3], run[4]])).reasons[0]
    low = accept(_result(run, probs=[0.95, 0.95, 0.4, 0.95, 0.95]))
    assert not low.accepted and "L3" in low.reasons[0]
    gap = accept(_result(run, spacing_mm=[25.0, 25.0, 55.0, 25.0]))  # a vertebra missed between L3 and L4
    assert not gap.accepted and "spacing" in gap.reasons[0]
    assert not accept(_result(run[:2])).accepted  # too short to trust
    # with the ordering's posteriors, they decide: a peak that looks like its neighbours is fine when the
    # ordering is sure of its place, and a run the ordering doubts is not accepted
    unsure_peak = _result(run, probs=[0.95, 0.95, 0.2, 0.95, 0.95])
    unsure_peak.labelled.posterior = [0.99, 0.98, 0.9, 0.98, 0.99]
    assert accept(unsure_peak).accepted
    doubted = _result(run)
    doubted.labelled.posterior = [0.99, 0.6, 0.6, 0.99, 0.99]
    assert not accept(doubted).accepted and "posterior 0.60" in accept(doubted).reasons[0]
    assert not accept(_result(run, mask=False)).accepted


def test_rounds_cut_short_take_the_unseen_scans_first():
    from spinelm.semisupervised import round_order

    cases = [f"s{i}" for i in range(10)]
    first = round_order(cases, [], 0)
    assert sorted(first) == cases and round_order(cases, [], 0) == first  # every scan, deterministic
    second = round_order(cases, first[:4], 1)
    assert set(second[:6]) == set(first[4:]) and set(second[6:]) == set(first[:4])


def test_the_coarse_refresh_takes_its_time_from_the_coarse_stage_and_gives_it_back_without_self_training():
    """By default the coarse stage labels the scans itself and its refresh comes out of its own share
    (the fine stage keeps its time); with the fine stage's pseudo-labels it comes out of the fine
    share. Either way a plan without self-training gives it back to the stage it came from."""
    from spinelm.semisupervised import add_self_training, without_coarse_refresh

    raw = {"configurations": {"coarse": {}, "fine": {}}, "training": {}, "rationale": [],
           "budget": {"stage_shares": {"coarse": 0.3, "fine": 0.7}, "affordable_steps": 3000}}
    st = add_self_training(raw, 210, 30)
    shares = raw["budget"]["stage_shares"]
    assert st["coarse_source"] == "own" and shares == {"coarse": 0.2, "fine": 0.7, "coarse_refresh": 0.1}
    assert "labels the unlabelled scans itself" in raw["rationale"][-1] and "fine stage keeps" in raw["rationale"][-1]
    add_self_training(raw, 210, 30)  # planned again (e.g. adopted from this plan): not taken twice
    assert raw["budget"]["stage_shares"] == shares
    without_coarse_refresh(raw)  # --no-unlabelled with an adopted self-training plan
    assert raw["budget"]["stage_shares"] == {"coarse": 0.3, "fine": 0.7}

    add_self_training(raw, 210, 30, coarse_source="fine")
    shares = raw["budget"]["stage_shares"]
    assert shares == {"coarse": 0.3, "fine": 0.55, "coarse_refresh": 0.15} and sum(shares.values()) == 1.0
    assert "about 2357 steps" in raw["rationale"][-1]  # 3000 x 0.55 / 0.7, said in the plan's why
    add_self_training(raw, 210, 30)  # re-planned with the default: the fine stage gets its share back first
    assert raw["budget"]["stage_shares"] == {"coarse": 0.2, "fine": 0.7, "coarse_refresh": 0.1}
    add_self_training(raw, 210, 30, coarse_source="fine")
    without_coarse_refresh(raw)
    assert raw["budget"]["stage_shares"] == {"coarse": 0.3, "fine": 0.7}
    with pytest.raises(ValueError, match="'own' or 'fine'"):
        add_self_training(raw, 210, 30, coarse_source="teacher")
    single = {"configurations": {"fine": {}}, "training": {}, "budget": {"stage_shares": {"fine": 1.0}}}
    assert "coarse_refresh" not in add_self_training(single, 5, 5)  # no coarse stage, no refresh
    assert single["budget"]["stage_shares"] == {"fine": 1.0}


@pytest.mark.parametrize("source", ["own", "fine"])
def test_each_stage_trains_for_its_share_and_gets_the_refresh_back_when_self_training_does_not_run(
        phantom_dataset, tmp_path, monkeypatch, source):
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.planning import plan, save_plans
    from spinelm.plans import ModelFolder
    from spinelm.semisupervised import add_self_training
    from spinelm.training import TrainSettings, stage_budget_share

    raw = plan(compute_fingerprint(phantom_dataset, num_workers=0, progress=False), device="cpu", time_budget_min=2,
               seconds_per_mvoxel=50.0)  # slow step: a coarse stage
    raw["budget"]["stage_shares"] = {"coarse": 0.3, "fine": 0.7}
    add_self_training(raw, 10, 5, coarse_source=source)
    save_plans(raw, tmp_path / "plans.json")
    model = ModelFolder(tmp_path)
    on, off = TrainSettings(), TrainSettings(unlabelled=False)
    refresh = raw["budget"]["stage_shares"]["coarse_refresh"]
    assert stage_budget_share(model, on, "coarse", [], refresh=True) == refresh
    if source == "own":  # the coarse stage labels the scans itself once they are preprocessed for it
        unl = model.unlabelled_cache_dir("coarse")
        assert stage_budget_share(model, on, "coarse", []) == pytest.approx(0.3)  # nothing to label: all of it
        unl.mkdir(parents=True)
        (unl / "cache.json").write_text(json.dumps({"cases": ["u"]}))
        assert stage_budget_share(model, on, "coarse", []) == pytest.approx(0.2)
        assert stage_budget_share(model, off, "coarse", []) == pytest.approx(0.3)  # --no-unlabelled
        monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: no self-training
        assert stage_budget_share(model, on, "coarse", []) == pytest.approx(0.3)
        assert stage_budget_share(model, on, "fine", []) == pytest.approx(0.7)
    else:  # taken from the fine stage: back to it when it runs no round
        assert stage_budget_share(model, on, "coarse", []) == pytest.approx(0.3)
        assert stage_budget_share(model, on, "fine", [0.5]) == pytest.approx(0.55)
        assert stage_budget_share(model, on, "fine", []) == pytest.approx(0.7)


def test_an_adopted_plan_gives_its_coarse_refresh_back_to_the_stage_it_came_from(tmp_path):
    from spinelm.pipeline import adopt_plan
    from spinelm.semisupervised import add_self_training

    for source, back in (("own", {"coarse": 0.3, "fine": 0.7}), ("fine", {"coarse": 0.3, "fine": 0.7})):
        theirs = {"configurations": {"coarse": {"patch_size": [8, 8, 8]}, "fine": {"patch_size": [16, 16, 16]}},
                  "training": {}, "rationale": ["why 1"], "budget": {"stage_shares": {"coarse": 0.3, "fine": 0.7}}}
        add_self_training(theirs, 10, 5, coarse_source=source)
        (tmp_path / "plans.json").write_text(json.dumps(theirs))
        raw = {"configurations": {"fine": {}}, "training": {}, "rationale": []}
        adopt_plan(raw, tmp_path)
        assert raw["budget"]["stage_shares"] == back  # a run without unlabelled scans trains the stages as planned
        assert raw["rationale"][1:] == ["why 1"]  # not the earlier plan's self-training


def test_a_round_runs_only_when_enough_time_is_left_to_train_on_its_labels():
    from spinelm.training import TIME_BUDGET_RESERVE, round_leaves_time

    budget, cap = 840.0, 126.0  # 14 minutes, rounds capped at 15 %
    usable = budget * (1 - TIME_BUDGET_RESERVE)
    assert round_leaves_time(420.0, budget, cap)  # half-way: plenty left
    assert not round_leaves_time(630.0, budget, cap)  # at 75 % after a first round: its labels would go unused
    assert round_leaves_time(usable - 2 * cap, budget, cap) and not round_leaves_time(usable - 2 * cap + 1, budget, cap)
    assert round_leaves_time(10_000.0, None, cap) and round_leaves_time(10_000.0, budget, 0.0)  # epochs / no cap


def test_labelled_cases_keep_half_the_patches():
    from spinelm.training import training_cases

    cases = training_cases(["a", "b"], [f"p{i}" for i in range(7)])
    assert sum(c in ("a", "b") for c in cases) >= len(cases) / 2
    assert set(cases) == {"a", "b"} | {f"p{i}" for i in range(7)}
    assert training_cases(["a"], []) == ["a"]


@pytest.fixture(scope="module")
def semi_model(phantom_dataset, tmp_path_factory):
    """A planned, preprocessed model folder of the phantoms (4 labelled + 1 unlabelled), with self-training."""
    from spinelm.pipeline import plan_dataset, preprocess

    model = tmp_path_factory.mktemp("semi") / "model"
    plans = plan_dataset(phantom_dataset, model, device="cpu", progress=False)
    assert plans.training["self_training"]["scans"] == 1
    assert any("self-training" in r for r in plans.raw["rationale"])
    preprocess(phantom_dataset, model, 0, progress=False)
    return model


def test_pseudo_labels_from_an_accepted_prediction_join_the_cache(semi_model, monkeypatch):
    """The accepted scan is written as a training case whose targets are the prediction's, on its grid."""
    from spinelm.data import PatchSampler
    from spinelm.plans import ModelFolder
    from spinelm.semisupervised import pseudo_label, pseudo_cases

    model = ModelFolder(semi_model)
    unl = model.unlabelled_cache_dir("fine")
    case = json.loads((unl / "cache.json").read_text())["cases"][0]
    shape = np.load(unl / f"{case}_data.npy").shape[1:]
    labels = model.plans.known_labels[:4]
    assert all(b in L.successors(a) for a, b in zip(labels, labels[1:]))

    class Fake:
        uses_coarse = False

        def predict_preprocessed(self, data, frame, coarse=None):
            res = _result(labels)
            inst = np.zeros(shape, np.int16)
            for i, lab in enumerate(labels):
                inst[:, :, i * shape[2] // 4:(i + 1) * shape[2] // 4] = lab
            res.instance_mask = inst
            return res

    out = pseudo_label(Fake(), unl, model.cache_dir("fine"), model.plans, prefix="pseudo__t__")
    assert out["accepted"] == [f"pseudo__t__{case}"] and out["scans"] == 1
    assert pseudo_cases(model.cache_dir("fine"), "pseudo__t__") == out["accepted"]
    props = json.loads((model.cache_dir("fine") / f"pseudo__t__{case}.json").read_text())
    assert [lm["label"] for lm in props["landmarks"]] == labels and props["pseudo_label"]
    seg = np.load(model.cache_dir("fine") / f"pseudo__t__{case}_seg.npy")
    assert seg.shape[1:] == shape and set(np.unique(seg[0])) - {-1, 0} == set(range(1, 5))  # label i -> channel i
    item = PatchSampler(model.cache_dir("fine"), out["accepted"], model.plans).sample(np.random.default_rng(0))
    assert item["seg"].max() > 0  # the sampler trains on the pseudo-label
    # a round that does not reach the scan (its time cap) keeps the earlier pseudo-label
    again = pseudo_label(Fake(), unl, model.cache_dir("fine"), model.plans, prefix="pseudo__t__", order=[])
    assert again["examined"] == [] and again["accepted"] == out["accepted"] and again["new"] == []
    # a rejected prediction removes the earlier pseudo-label of that prefix
    monkeypatch.setattr(Fake, "predict_preprocessed", lambda self, d, f, coarse=None: _result(labels[:2]))
    assert pseudo_label(Fake(), unl, model.cache_dir("fine"), model.plans, prefix="pseudo__t__")["accepted"] == []
    assert pseudo_cases(model.cache_dir("fine"), "pseudo__t__") == []


def test_training_runs_its_self_training_rounds_and_reports_them(semi_model):
    from spinelm.pipeline import train

    res = train(semi_model, 0, epochs=4, iterations_per_epoch=1, validate_every=5, progress=False,
                max_validation_cases=1, device="cpu")[0]
    rounds = res["self_training"]["rounds"]
    assert [r["epoch"] for r in rounds] == [1, 2]  # after 50 % and 75 % of 4 epochs
    assert all(r["scans"] == 1 and r["accepted"] + len(r["rejected"]) == 1 for r in rounds)
    off = train(semi_model, 0, epochs=1, iterations_per_epoch=1, progress=False, max_validation_cases=1,
                device="cpu", unlabelled=False)[0]
    assert "self_training" not in off


def test_pretraining_weights_load_into_the_fine_tuning_network(semi_model, tmp_path):
    from spinelm.network import build_network
    from spinelm.plans import ModelFolder
    from spinelm.pretraining import block_mask, load_pretrained, pretrain

    mask = block_mask((64, 64, 32), np.random.default_rng(0))
    assert 0.45 < mask.mean() < 0.75
    info = pretrain(semi_model, time_budget_min=None, steps=2, progress=False, batch_size=1)
    assert info["steps"] == 2 and info["images"] == 5  # 4 labelled + 1 unlabelled images, labels unused
    assert np.isfinite(info["final_loss"])
    plans = ModelFolder(semi_model).plans
    net = build_network(plans)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = load_pretrained(net, semi_model)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert got["loaded"] >= len(changed) > 0
    assert all(k.startswith(("encoder.", "decoder.")) for k in changed)
    assert any("seg_layers" in k for k in got["skipped"])  # the output layers are the task's own
    other = dict(plans.raw)
    other["configurations"] = json.loads(json.dumps(plans.raw["configurations"]))
    arch = other["configurations"]["fine"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [f * 2 for f in arch["features_per_stage"]]
    with pytest.raises(ValueError, match="another network"):
        load_pretrained(build_network(other), semi_model)
    with pytest.raises(FileNotFoundError, match="spinelm pretrain"):
        load_pretrained(net, tmp_path)


def test_pretrain_then_fine_tune_from_the_command_line(phantom_dataset, tmp_path, capsys):
    from spinelm.cli import main

    pre = tmp_path / "pre"
    assert main(["pretrain", str(phantom_dataset), "-o", str(pre), "--steps", "1", "--device", "cpu",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pretrained on 5 images: 1 steps" in out and f"--init {pre}" in out
    assert (pre / "pretrained.pt").is_file() and (pre / "pretrain_curve.png").is_file()
    model = tmp_path / "m"
    assert main(["plan-and-train", str(phantom_dataset), "-o", str(model), "--device", "cpu", "--epochs", "1",
                 "--iterations", "1", "--init", str(pre), "--no-unlabelled", "--no-progress"]) == 0
    log = (model / "fold_0" / "training_log.txt").read_text()
    assert f"initialised from {pre}" in log
    assert "not used (--no-unlabelled)" in capsys.readouterr().out
    assert main(["plan-and-train", str(phantom_dataset), "-o", str(tmp_path / "m2"), "--device", "cpu", "--epochs",
                 "1", "--init", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "not a pretrained folder" in capsys.readouterr().err


def test_diverse_choice_covers_every_protocol_and_is_deterministic():
    from spinelm.semisupervised import diverse_choice

    rng = np.random.default_rng(0)
    common = rng.normal([0.0, 5.0, 1.0], 0.05, (20, 3))  # 20 scans of one protocol
    rare = rng.normal([0.7, 6.0, 2.0], 0.05, (5, 3))  # 5 of another (larger field of view, brighter)
    x = np.vstack([common, rare])
    picked = diverse_choice(x, 2)
    assert len(set(picked)) == 2 and {p >= 20 for p in picked} == {True, False}  # one of each
    assert diverse_choice(x, 4) == diverse_choice(x, 4)
    assert len(set(diverse_choice(x, 25))) == 25  # asking for all gives all
    assert sorted(diverse_choice(np.vstack([x[:3], x[:3]]), 6)) == list(range(6))  # identical scans: each once
    # a random draw of 2 from these scans misses the rare protocol in 63 % of draws
    draws = [set(np.random.default_rng(s).choice(25, 2, replace=False)) for s in range(200)]
    assert np.mean([all(d < 20 for d in draw) for draw in draws]) > 0.5


def _self_training_model(phantom_dataset, root, source: str, rounds):
    """A planned, preprocessed model folder with a coarse stage and self-training from ``source``
    (fine-stage ``rounds``), trained in epochs (the refresh gets its share of them)."""
    import spinelm.semisupervised as semi
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.pipeline import preprocess
    from spinelm.planning import plan, save_plans
    from spinelm.plans import ModelFolder

    raw = plan(compute_fingerprint(phantom_dataset, num_workers=0, progress=False), device="cpu", time_budget_min=2,
               seconds_per_mvoxel=50.0)  # slow step: a coarse stage
    assert list(raw["configurations"]) == ["coarse", "fine"]
    raw.setdefault("budget", {})["stage_shares"] = {"coarse": 0.3, "fine": 0.7}
    raw["training"].pop("time_budget_min", None)
    st = semi.add_self_training(raw, 1, 4, coarse_source=source)
    st["rounds"] = list(rounds)
    root.mkdir()
    save_plans(raw, root / "plans.json")
    preprocess(phantom_dataset, root, 0, progress=False)
    model = ModelFolder(root)
    return model, [int(x) for x in model.plans.identification["labels"]][5:9], int(model.plans.cc_axis)


def test_the_coarse_stage_labels_the_unlabelled_scans_itself_before_the_fine_stage(phantom_dataset, tmp_path,
                                                                                   monkeypatch):
    """The default: right after its training the coarse stage labels the unlabelled scans alone (its
    own network, no mask), its accepted runs teach its level head (not its heatmap) for its refresh
    share, the refreshed weights replace its final ones, and then the fine stage trains and validates
    with them, with its whole share; ``--resume`` does not label again."""
    import spinelm.semisupervised as semi
    from spinelm.identification import LevelCropSampler
    from spinelm.pipeline import train
    from spinelm.training import LABELLED_ONLY_CHECKPOINT, REFRESH_DIR, TrainSettings, coarse_refresh_due

    root = tmp_path / "model"
    model, labels, cc = _self_training_model(phantom_dataset, root, "own", [])  # no fine-stage rounds here
    assert model.plans.training["self_training"]["coarse_source"] == "own"
    assert model.plans.raw["budget"]["stage_shares"] == {"coarse": 0.2, "fine": 0.7, "coarse_refresh": 0.1}
    calls = []

    class Fake:  # the coarse stage alone: accepts every unlabelled scan, four vertebrae along the column
        uses_coarse = False

        def predict_preprocessed(self, data, frame, with_mask=True, coarse=None):
            calls.append((data.shape, with_mask, coarse))
            shape = data.shape[1:]
            vox = np.tile(np.asarray(shape, float) / 2, (4, 1))
            vox[:, cc] = np.linspace(0.2, 0.8, 4) * shape[cc]
            res = _result(labels)
            res.labelled.posterior = [0.9] * 4
            res.landmarks = [Landmark(lab, tuple(p)) for lab, p in zip(labels, frame.to_world(vox))]
            res.instance_mask = None
            return res

    real = semi.pseudo_label
    monkeypatch.setattr(semi, "pseudo_label", lambda predictor, *a, **k: real(Fake(), *a, **k))
    import spinelm.training as training

    order = []
    real_train_fold = training.train_fold
    monkeypatch.setattr(training, "train_fold", lambda root_, s, configuration="fine", **k: order.append(
        (configuration, "refresh" in k and k["refresh"] is not None)) or real_train_fold(root_, s, configuration, **k))
    # train() and refresh_coarse() look train_fold up in spinelm.training when they run
    res = train(root, 0, epochs=4, iterations_per_epoch=1, validate_every=5, progress=False, max_validation_cases=1,
                device="cpu")[0]
    assert order == [("coarse", False), ("coarse", True), ("fine", False)]  # the refresh before the fine stage
    coarse_shape = np.load(next(model.unlabelled_cache_dir("coarse").glob("*_data.npy"))).shape
    assert [(c[0], c[1], c[2]) for c in calls] == [(coarse_shape, False, None)]  # the coarse array, no mask
    refresh = res["coarse_refresh"]
    assert refresh["round"]["accepted"] == 1 and refresh["pseudo_labelled_runs"] == 1
    assert refresh["epochs_run"] == 2  # 0.1 / 0.2 of the 4 epochs
    saved = json.loads((model.fold_dir(0) / "validation_summary.json").read_text())
    assert saved["coarse_refresh"]["round"]["accepted"] == 1 and saved["coarse_refresh"]["pseudo_labelled_runs"] == 1
    name = semi.pseudo_cases(model.cache_dir("coarse"))[0]
    props = json.loads((model.cache_dir("coarse") / f"{name}.json").read_text())
    assert not props["has_mask"] and not props["landmarks_known"]  # the heatmap does not learn its own peaks
    assert [lm["label"] for lm in props["landmarks"]] == labels
    assert len(LevelCropSampler(model.cache_dir("coarse"), [name], model.plans)) == 4  # the level head does
    folder = model.fold_dir(0, "coarse")
    final, refreshed, kept = (torch.load(p, map_location="cpu", weights_only=True)["network"] for p in
                              (folder / "checkpoint_final.pt", folder / REFRESH_DIR / "checkpoint_final.pt",
                               folder / LABELLED_ONLY_CHECKPOINT))
    assert all(torch.equal(final[k], refreshed[k]) for k in final)
    assert not all(torch.equal(final[k], kept[k]) for k in final)
    assert not coarse_refresh_due(model, 0, TrainSettings())
    order.clear()
    train(root, 0, epochs=4, iterations_per_epoch=1, validate_every=5, progress=False, max_validation_cases=1,
          device="cpu", resume=True)
    assert order == [("fine", False)] and len(calls) == 1  # resumed: the coarse stage and its refresh are done


@pytest.mark.parametrize("rounds", [pytest.param((0.5, 0.75), marks=pytest.mark.slow),
                                    pytest.param((1.0,), marks=pytest.mark.slow)],
                         ids=["during", "after"])  # the earlier layout (coarse_source "fine"): the default is above
def test_the_coarse_stage_trains_on_accepted_pseudo_labels_after_the_fine_stage(phantom_dataset, tmp_path,
                                                                                 monkeypatch, rounds):
    """With a coarse identification stage, the fine stage's accepted pseudo-labels reach the coarse
    cache at the same world points, the coarse stage (and its level head) trains on them for the
    plan's refresh share, and the refreshed weights replace its final checkpoint (the labelled-only
    ones kept); a new coarse training forgets the refresh."""
    import spinelm.semisupervised as semi
    from spinelm.identification import LevelCropSampler
    from spinelm.io.image import Frame, Geometry
    from spinelm.pipeline import train
    from spinelm.training import LABELLED_ONLY_CHECKPOINT, REFRESH_DIR, TrainSettings, coarse_refresh_due, train_fold

    root = tmp_path / "model"
    # (1.0,): one round after the fine stage's last epoch, for the refresh only
    model, labels, cc = _self_training_model(phantom_dataset, root, "fine", rounds)
    assert model.plans.training["self_training"]["coarse_refresh"] == 0.15
    assert model.plans.raw["budget"]["stage_shares"] == {"coarse": 0.3, "fine": 0.55, "coarse_refresh": 0.15}
    assert "coarse identification stage trains on" in model.plans.raw["rationale"][-1]
    assert all(b in L.successors(a) for a, b in zip(labels, labels[1:]))

    class Fake:  # accepts every unlabelled scan: four vertebrae stacked along the column
        uses_coarse = True

        def predict_preprocessed(self, data, frame, coarse=None):
            shape = data.shape[1:]
            vox = np.tile(np.asarray(shape, float) / 2, (4, 1))
            vox[:, cc] = np.linspace(0.2, 0.8, 4) * shape[cc]
            res = _result(labels)
            res.landmarks = [Landmark(lab, tuple(p)) for lab, p in zip(labels, frame.to_world(vox))]
            inst = np.zeros(shape, np.int16)
            for i, lab in enumerate(labels):
                sl = [slice(None)] * 3
                sl[cc] = slice(int(vox[i, cc]) - 2, int(vox[i, cc]) + 2)
                inst[tuple(sl)] = lab
            res.instance_mask = inst
            return res

    real = semi.pseudo_label
    monkeypatch.setattr(semi, "pseudo_label", lambda predictor, *a, **k: real(Fake(), *a, **k))
    res = train(root, 0, epochs=4, iterations_per_epoch=1, validate_every=5, progress=False, max_validation_cases=1,
                device="cpu")[0]
    assert [r["accepted"] for r in res["self_training"]["rounds"]] == [1] * len(rounds)
    assert [r["epoch"] for r in res["self_training"]["rounds"]] == ([1, 2] if len(rounds) == 2 else [3])
    refresh = res["coarse_refresh"]
    assert refresh["pseudo_labelled_runs"] == 1 and refresh["epochs_run"] == 2  # 0.15 / 0.3 of the 4 epochs
    # the coarse pseudo-label: the scan as preprocessed for the coarse stage, the same world points
    fine_props = json.loads(next(model.cache_dir("fine").glob("pseudo__f0__*.json")).read_text())
    name = fine_props["case"]
    coarse_props = json.loads((model.cache_dir("coarse") / f"{name}.json").read_text())
    assert not coarse_props["has_mask"] and [lm["label"] for lm in coarse_props["landmarks"]] == labels
    assert fine_props["landmarks_known"] and coarse_props["landmarks_known"]  # the heatmap learns the centres
    assert "final_before_refresh" in res and res["final"] is not res["final_before_refresh"]
    saved = json.loads((model.fold_dir(0) / "validation_summary.json").read_text())
    assert saved["final"] == res["final"] and saved["coarse_refresh"]["pseudo_labelled_runs"] == 1
    frame = Frame.from_info(Geometry.from_json(coarse_props["canonical_geometry"]), model.plans.transpose_forward,
                            coarse_props)
    np.testing.assert_allclose(frame.to_world(np.asarray([lm["index"] for lm in coarse_props["landmarks"]])),
                               [lm["position_mm"] for lm in fine_props["landmarks"]], atol=0.01)
    assert len(LevelCropSampler(model.cache_dir("coarse"), [name], model.plans)) == 4  # the level head learns them
    # the refreshed weights are the coarse stage's final ones; the labelled-only weights are kept
    folder = model.fold_dir(0, "coarse")
    final, kept, refreshed = (torch.load(p, map_location="cpu", weights_only=True)["network"] for p in
                              (folder / "checkpoint_final.pt", folder / LABELLED_ONLY_CHECKPOINT,
                               folder / REFRESH_DIR / "checkpoint_final.pt"))
    assert all(torch.equal(final[k], refreshed[k]) for k in final)
    assert not all(torch.equal(final[k], kept[k]) for k in final)
    assert not coarse_refresh_due(model, 0, TrainSettings())
    assert not coarse_refresh_due(model, 0, TrainSettings(unlabelled=False))
    # training the coarse stage anew drops the refresh that belonged to the old weights
    train_fold(root, TrainSettings(epochs=1, iterations_per_epoch=1, progress=False, max_validation_cases=1), "coarse")
    assert not (folder / LABELLED_ONLY_CHECKPOINT).exists() and not (folder / REFRESH_DIR).exists()
    assert coarse_refresh_due(model, 0, TrainSettings())
