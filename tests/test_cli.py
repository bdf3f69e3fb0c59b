"""The spinelm command as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import SimpleITK as sitk

from spinelm.cli import main
from spinelm.io import read_landmarks
from spinelm.synthetic import PhantomConfig, make_phantom
from tests.conftest import real_data


@pytest.mark.parametrize("cmd", ["synth", "validate", "convert-verse", "fingerprint", "plan", "preprocess", "demo",
                                 "pretrain", "train", "plan-and-train"])
def test_every_command_explains_itself(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: spinelm " + cmd in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "spinelm", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("spinelm ")


def test_plan_writes_a_self_contained_model_folder(phantom_dataset, tmp_path, capsys):
    model = tmp_path / "model"
    rc = main(["plan", str(phantom_dataset), "-o", str(model), "--device", "cpu", "--time-budget", "10",
               "--workers", "0", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "why:" in out and "fine" in out
    plans = json.loads((model / "plans.json").read_text())
    assert plans["format"] == "spinelm-plans" and plans["preset"] == "cpu"
    assert plans["budget"]["time_budget_min"] == 10
    assert json.loads((model / "fingerprint.json").read_text())["format"] == "spinelm-fingerprint"
    assert json.loads((model / "dataset.json").read_text())["num_training"] == 4
    assert main(["preprocess", str(phantom_dataset), "-m", str(model), "--workers", "0", "--no-progress"]) == 0
    assert "4 preprocessed, 0 reused" in capsys.readouterr().out
    assert main(["preprocess", str(phantom_dataset), "-m", str(model), "--workers", "0", "--no-progress"]) == 0
    assert "0 preprocessed, 4 reused" in capsys.readouterr().out


def test_plans_from_holds_an_earlier_plan_fixed(phantom_dataset, tmp_path, capsys):
    """--plans-from adopts an earlier plan's grids, networks and budget split (no step is timed), so
    two runs on other annotations compare at one plan; a plan for other channels is refused."""
    first = tmp_path / "first"
    assert main(["plan", str(phantom_dataset), "-o", str(first), "--device", "cpu", "--no-progress"]) == 0
    earlier = json.loads((first / "plans.json").read_text())
    fine = earlier["configurations"]["fine"]
    fine["patch_size"] = [max(8, p // 2 // 4 * 4) for p in fine["patch_size"]]  # as a smaller budget would
    fine["batch_size"] = 3
    earlier["budget"]["stage_shares"] = {name: 1.0 / len(earlier["configurations"])
                                         for name in earlier["configurations"]}
    (first / "plans.json").write_text(json.dumps(earlier))
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["plan", str(phantom_dataset), "-o", str(again), "--device", "cpu", "--time-budget", "10",
                 "--plans-from", str(first), "--no-progress"]) == 0
    assert "adopted from" in capsys.readouterr().out
    plans = json.loads((again / "plans.json").read_text())
    assert sorted(plans["configurations"]) == sorted(earlier["configurations"])  # its stages too
    for name, cfg in plans["configurations"].items():
        for key in ("spacing", "patch_size", "batch_size", "architecture"):
            assert cfg[key] == earlier["configurations"][name][key], (name, key)
    # its split, with this dataset's own self-training (one unlabelled scan) planned on top of it
    from spinelm.semisupervised import without_coarse_refresh

    assert without_coarse_refresh(json.loads(json.dumps(plans))) == earlier["budget"]["stage_shares"]
    assert plans["budget"].get("measured_step") == earlier["budget"].get("measured_step")  # its timing, not a new one
    assert any("no training step timed" in line for line in plans["rationale"])
    assert plans["budget"]["time_budget_min"] == 10  # the command's own budget
    assert plans["foreground_intensity_properties_per_channel"]  # still this dataset's own

    earlier["channel_names"] = {"0": "water", "1": "fat"}
    (first / "plans.json").write_text(json.dumps(earlier))
    assert main(["plan", str(phantom_dataset), "-o", str(tmp_path / "x"), "--device", "cpu",
                 "--plans-from", str(first / "plans.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "plans.json" in err and "channels" in err and err.count("\n") == 1
    assert main(["plan", str(phantom_dataset), "-o", str(tmp_path / "y"), "--device", "cpu",
                 "--plans-from", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "nowhere: no plans.json there" in capsys.readouterr().err


def test_bad_input_gives_one_line_not_a_traceback(phantom_dataset, tmp_path, capsys):
    rc = main(["plan", str(tmp_path / "missing"), "-o", str(tmp_path / "m"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and err.count("\n") == 1 and "missing" in err
    assert main(["plan", str(phantom_dataset), "-o", str(tmp_path / "m"), "--preset", "nope", "--device", "cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "Available: cpu, gpu" in err and err.count("\n") == 1


def test_convert_verse_layout(tmp_path, capsys):
    src = tmp_path / "verse"
    ph = make_phantom(2, 0, PhantomConfig(modality="CT", max_voxels=300_000))
    raw, der = src / "01_training" / "rawdata" / "sub-verse900", src / "01_training" / "derivatives" / "sub-verse900"
    raw.mkdir(parents=True)
    der.mkdir(parents=True)
    sitk.WriteImage(ph.image, str(raw / "sub-verse900_ct.nii.gz"))
    mask = sitk.Cast(ph.mask, sitk.sitkFloat64)  # VerSe masks are sometimes float64
    sitk.WriteImage(mask, str(der / "sub-verse900_seg-vert_msk.nii.gz"))
    from spinelm.io import write_verse_json
    write_verse_json(der / "sub-verse900_seg-subreg_ctd.json", ph.landmarks, ph.geometry, "PIR")
    dst = tmp_path / "converted"
    assert main(["convert-verse", str(src), str(dst), "--no-progress"]) == 0
    assert sitk.ReadImage(str(dst / "labelsTr" / "sub-verse900.nii.gz")).GetPixelID() == sitk.sitkUInt8
    back = read_landmarks(dst / "centroidsTr" / "sub-verse900.json")
    assert [lm.label for lm in back] == [lm.label for lm in ph.landmarks]
    for a, b in zip(back, ph.landmarks):
        assert max(abs(x - y) for x, y in zip(a.position_mm, b.position_mm)) < 0.01
    assert main(["validate", str(dst), "--no-progress"]) == 0


def test_plan_on_real_lumbar_mr(tmp_path, capsys):
    data = real_data("lumbar-mr")
    assert main(["plan", str(data), "-o", str(tmp_path / "m"), "--device", "cpu", "--no-progress"]) == 0
    plans = json.loads((tmp_path / "m" / "plans.json").read_text())
    fine = plans["configurations"]["fine"]
    assert fine["spacing"] == [3.0, 3.0, 3.0]
    assert plans["training"]["optimizer"] == "adamw"
    assert plans["heads"]["segmentation"]["labels"] == list(range(18, 25))


def test_plan_and_train_reports_each_step_and_trains(phantom_dataset, tmp_path, capsys):
    rc = main(["plan-and-train", str(phantom_dataset), "-o", str(tmp_path / "m"), "--device", "cpu", "--epochs", "1",
               "--iterations", "1", "--time-budget", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    # validation, then the plan and its reasons, then the fold's figures, in that order
    assert out.index("0 error(s)") < out.index("spinelm plan (preset cpu") < out.index("fold_0: 1 epochs")
    assert "level-shifted" in out and (tmp_path / "m" / "fold_0" / "checkpoint_final.pt").is_file()


def test_two_channel_dixon_phantoms_plan_train_and_predict_end_to_end(tmp_path, capsys):
    """Water and fat on one grid: the plan normalises each channel, training and prediction take both."""
    import csv

    ds, m, out = tmp_path / "dixon", tmp_path / "m", tmp_path / "p"
    assert main(["synth", str(ds), "--n", "4", "--seed", "5", "--protocol", "dixon", "--max-voxels", "300000",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (ds / "imagesTr").glob("phantom_000_*")) == ["phantom_000_0000.nii.gz",
                                                                            "phantom_000_0001.nii.gz"]
    assert main(["plan-and-train", str(ds), "-o", str(m), "--device", "cpu", "--epochs", "1", "--iterations", "1",
                 "--no-progress"]) == 0
    plans = json.loads((m / "plans.json").read_text())
    assert plans["channel_names"] == {"0": "water", "1": "fat"}
    assert len(plans["configurations"]["fine"]["normalization_schemes"]) == 2
    assert main(["predict", "-i", str(ds / "imagesTr"), "-o", str(out), "-m", str(m), "--no-progress"]) == 0
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(r["status"] == "done" and r["qc"] in ("ok", "review") for r in rows)


def test_synth_posture_turns_each_column_and_keeps_its_shape(tmp_path):
    import numpy as np

    upright, turned = tmp_path / "up", tmp_path / "turned"
    for out, extra in ((upright, []), (turned, ["--posture", "8"])):
        assert main(["synth", str(out), "--n", "2", "--seed", "3", "--max-voxels", "200000", "--no-progress",
                     *extra]) == 0
    for case in ("phantom_000", "phantom_001"):
        a = {lm.label: np.asarray(lm.position_mm) for lm in read_landmarks(upright / "centroidsTr" / f"{case}.json")}
        b = {lm.label: np.asarray(lm.position_mm) for lm in read_landmarks(turned / "centroidsTr" / f"{case}.json")}
        common = sorted(set(a) & set(b))
        assert len(common) >= 3
        steps_a = [np.linalg.norm(a[x] - a[y]) for x, y in zip(common[:-1], common[1:])]
        steps_b = [np.linalg.norm(b[x] - b[y]) for x, y in zip(common[:-1], common[1:])]
        assert np.allclose(steps_a, steps_b, atol=0.01)  # centroid files keep 3 decimals
        assert not np.allclose([a[x] for x in common], [b[x] for x in common], atol=0.5)
    assert main(["synth", str(tmp_path / "bad"), "--n", "1", "--posture", "90", "--no-progress"]) != 0
