"""``spinelm predict``: inputs, bad files in a batch, outputs, orientation invariance, --continue, sharding."""
from __future__ import annotations

import csv
import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from spinelm.cli import main
from spinelm.io.image import Geometry
from spinelm.io.landmarks import read_landmarks
from spinelm.io.outputs import STAGES
from spinelm.predict import Predictor, ScanError, collect_inputs, predict_directory, read_scan


@pytest.fixture(scope="module")
def trained_model(phantom_dataset, tmp_path_factory):
    """A model folder trained for a few steps (enough to run; not to be accurate). A slow measured
    step caps the fine patch below the phantoms' column, so the plan has a coarse identification
    stage and every prediction test runs through both stages."""
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.pipeline import preprocess, train
    from spinelm.planning import plan, save_plans

    fp = compute_fingerprint(phantom_dataset, num_workers=0, progress=False)
    plans = plan(fp, device="cpu", time_budget_min=2, seconds_per_mvoxel=50.0)
    assert list(plans["configurations"]) == ["coarse", "fine"]
    model = tmp_path_factory.mktemp("pred") / "model"
    model.mkdir()
    save_plans(plans, model / "plans.json")
    preprocess(phantom_dataset, model, 0, progress=False)
    train(model, 0, epochs=1, iterations_per_epoch=2, validate_every=5, progress=False, max_validation_cases=1,
          device="cpu")
    return model


def _fake_outputs(predictor):
    """Network outputs computed from the image alone (smoothed intensity as heatmap): deterministic
    and with peaks, so that geometry handling can be checked independently of training."""
    from scipy.ndimage import gaussian_filter

    n_seg = predictor.plans.heads["segmentation"].channels

    def run(data, configuration=None):
        img = gaussian_filter(data[0].numpy(), 2.0)
        hm = (img - img.min()) / (img.max() - img.min())
        seg = torch.zeros((n_seg, *hm.shape))
        seg[0] = 0.2
        seg[1:] = torch.from_numpy(hm)[None] / (n_seg - 1)
        return {"segmentation": seg, "heatmap": torch.from_numpy(hm)[None].float()}
    return run


def test_inputs_are_grouped_by_case_and_channel(tmp_path):
    for name in ("a_0000.nii.gz", "b.nii.gz", "c_0000.mha", "c_0001.mha", "notes.txt", "sub/d.nrrd"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    one = collect_inputs(tmp_path, 1)
    assert [(s.case_id, len(s.paths)) for s in one] == [("a", 1), ("b", 1), ("c", 2)]
    assert one[2].error and "unexpected channel(s) 0001" in one[2].error  # a 1-channel model given two channels
    two = {s.case_id: s for s in collect_inputs(tmp_path, 2, recursive=True)}
    assert two["c"].error is None and two["a"].error and "sub__d" in two
    assert [s.case_id for s in collect_inputs(tmp_path, 1, pattern="a_*")] == ["a"]


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array)
    if img.GetDimension() == 3:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("kind, text", [
    ("truncated", "truncated"), ("2d", "3-D"), ("4d", "3-D"), ("nan", "NaN"), ("zero_spacing", "pixdim"),
    ("tiny", "too small"), ("constant", "empty"), ("missing", "not found")])
def test_bad_scans_get_one_clear_error_naming_the_file(tmp_path, kind, text):
    rng = np.random.default_rng(0)
    vol = rng.random((40, 40, 40)).astype(np.float32)
    p = tmp_path / f"{kind}.nii.gz"
    if kind == "truncated":
        _write(p, vol)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif kind == "2d":
        _write(p, vol[0])
    elif kind == "4d":
        sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(vol)] * 2), str(p))
    elif kind == "nan":
        vol[3, 3, 3] = np.nan
        _write(p, vol)
    elif kind == "zero_spacing":
        _write(p, vol)
        raw = bytearray(gzip.decompress(p.read_bytes()))
        raw[80:84] = struct.pack("<f", 0.0)
        p.write_bytes(gzip.compress(bytes(raw)))
    elif kind == "tiny":
        _write(p, vol[:3])
    elif kind == "constant":
        _write(p, np.zeros_like(vol))
    with pytest.raises(ScanError) as exc:
        read_scan([p])
    assert str(p) in str(exc.value) and text in str(exc.value)


def test_batch_with_broken_files_labels_the_good_ones_and_lists_the_bad(trained_model, phantom_dataset, tmp_path,
                                                                       capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    good = sorted((phantom_dataset / "imagesTr").glob("*_0000.nii.gz"))[:2]
    for g in good:
        (inp / g.name).write_bytes(g.read_bytes())
    (inp / "trunc_0000.nii.gz").write_bytes(good[0].read_bytes()[:5000])
    _write(inp / "flat_0000.nii.gz", np.ones((30, 30, 30), np.float32))
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(inp), "-o", str(out), "-m", str(trained_model), "--no-progress"])
    assert rc == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "trunc_0000.nii.gz" in err and "flat_0000.nii.gz" in err
    rows = {r["case"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert {rows[c]["status"] for c in ("trunc", "flat")} == {"failed"}
    assert "truncated" in rows["trunc"]["error"] and "empty" in rows["flat"]["error"]
    for g in good:
        case = g.name[: -len("_0000.nii.gz")]
        assert rows[case]["status"] == "done"
        for suffix in ("_ctd.json", "_verse_ctd.json", ".mrk.json", "_seg.nii.gz", "_qc.png"):
            assert (out / f"{case}{suffix}").is_file(), suffix
        seg = sitk.ReadImage(str(out / f"{case}_seg.nii.gz"))
        assert Geometry.from_sitk(seg).same_as(Geometry.from_sitk(sitk.ReadImage(str(g))))
        doc = json.loads((out / f"{case}_ctd.json").read_text())
        assert doc["coordinate_system"] == "LPS" and doc["model"]["folds"] == [0]
        assert int(rows[case]["n_vertebrae"]) == len(doc["vertebrae"])
    assert not list(out.glob(".tmp-*"))  # nothing half-written left behind
    run = json.loads((out / "predict.json").read_text())
    assert run["arguments"]["model"] == str(trained_model)
    # where the time went: every stage of a labelled scan timed, together nearly all of its seconds
    # (what a throughput estimate for a large batch is built from)
    for g in good:
        row = rows[g.name[: -len("_0000.nii.gz")]]
        stages = {k: float(row[f"seconds_{k}"]) for k in STAGES if row[f"seconds_{k}"] != ""}
        assert set(stages) == set(STAGES)
        assert stages["network"] > 0 and 0.8 * float(row["seconds"]) <= sum(stages.values()) <= float(row["seconds"]) + 0.05
    assert rows["trunc"]["seconds_network"] == ""
    assert run["labelled"] == 2 and run["failed"] == 2 and set(run["stage_seconds"]) >= {"read", "network", "write"}
    assert run["peak_memory_gb"] > 0
    assert re.search(r"\d s per scan \(.*network \d+ %.*\); peak memory", captured.out), captured.out
    # the throughput script reads the same files
    import subprocess
    import sys

    thr = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "throughput.py"),
                          str(out), "--scans", "1000", "--workers", "10"], capture_output=True, text=True)
    assert thr.returncode == 0 and "2 labelled scans" in thr.stdout and "network" in thr.stdout, thr.stderr
    assert "1000 such scans" in thr.stdout and "peak memory" in thr.stdout
    # --continue: only the failed ones are tried again
    before = (out / f"{good[0].name[:-12]}_ctd.json").stat().st_mtime_ns
    rc = main(["predict", "-i", str(inp), "-o", str(out), "-m", str(trained_model), "--no-progress", "--continue"])
    assert rc == 1 and (out / f"{good[0].name[:-12]}_ctd.json").stat().st_mtime_ns == before
    assert "0 labelled, 2 already done, 2 failed" in capsys.readouterr().out


def test_sharding_splits_the_batch_without_overlap(trained_model, phantom_dataset, tmp_path):
    predictor = Predictor.from_model_folder(trained_model)
    parts = []
    for k in range(2):
        predict_directory(phantom_dataset / "imagesTr", tmp_path, predictor, num_parts=2, part_id=k, qc=False,
                          progress=False)
        parts.append({r["case"] for r in csv.DictReader(open(tmp_path / f"summary_part{k}of2.csv"))})
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert len(parts[0] | parts[1]) == len(list((phantom_dataset / "imagesTr").glob("*.nii.gz")))
    with pytest.raises(ValueError, match="part-id"):
        predict_directory(phantom_dataset / "imagesTr", tmp_path, predictor, num_parts=2, part_id=2)


def _reorient(image, perm, flips):
    arr = sitk.GetArrayFromImage(image)  # (z, y, x)
    g = Geometry.from_sitk(image)
    # permute and flip the ITK axes (i, j, k) of the grid, keeping every voxel at its world position
    size = np.asarray(g.size)
    new_size = size[list(perm)]
    d = np.asarray(g.direction).reshape(3, 3)
    sp = np.asarray(g.spacing)
    new_d, new_sp = d[:, list(perm)].copy(), sp[list(perm)]
    origin = np.asarray(g.origin, dtype=np.float64)
    for a, f in enumerate(flips):
        if f:
            origin = origin + new_d[:, a] * new_sp[a] * (new_size[a] - 1)
            new_d[:, a] *= -1
    itk_arr = arr.transpose(2, 1, 0).transpose(perm)  # (i, j, k) order, permuted
    for a, f in enumerate(flips):
        if f:
            itk_arr = np.flip(itk_arr, a)
    out = sitk.GetImageFromArray(np.ascontiguousarray(itk_arr.transpose(2, 1, 0)))
    out.SetSpacing(tuple(float(x) for x in new_sp))
    out.SetOrigin(tuple(float(x) for x in origin))
    out.SetDirection(tuple(float(x) for x in new_d.ravel()))
    return out


def test_same_scan_in_four_orientations_gives_the_same_labels_and_world_centroids(trained_model, phantom_dataset,
                                                                                   tmp_path, monkeypatch):
    src = sorted((phantom_dataset / "imagesTr").glob("*_0000.nii.gz"))[0]
    image = sitk.ReadImage(str(src))
    inp = tmp_path / "in"
    inp.mkdir()
    variants = {"asis": ((0, 1, 2), (0, 0, 0)), "perm": ((2, 0, 1), (0, 0, 0)),
                "flip": ((0, 1, 2), (1, 0, 1)), "both": ((1, 2, 0), (0, 1, 1))}
    for name, (perm, flips) in variants.items():
        img = _reorient(image, perm, flips)
        # the same voxel sits at the same world position in every variant
        probe = np.asarray(image.TransformIndexToPhysicalPoint((3, 5, 7)))
        idx = img.TransformPhysicalPointToIndex(tuple(probe))
        assert image[3, 5, 7] == img[idx]
        sitk.WriteImage(img, str(inp / f"{name}_0000.nii.gz"))
    predictor = Predictor.from_model_folder(trained_model)
    monkeypatch.setattr(predictor, "network_outputs", _fake_outputs(predictor))
    out = tmp_path / "out"
    report = predict_directory(inp, out, predictor, qc=False, progress=False)
    assert report.ok
    results = {n: read_landmarks(out / f"{n}_ctd.json") for n in variants}
    ref = results["asis"]
    assert len(ref) >= 2, "the check needs several labelled centroids"
    voxel = max(image.GetSpacing())
    for name, lms in results.items():
        assert [lm.label for lm in lms] == [lm.label for lm in ref], name
        d = np.linalg.norm(np.asarray([lm.position_mm for lm in lms]) - np.asarray([lm.position_mm for lm in ref]), axis=1)
        assert d.max() <= voxel, (name, d)
        # the instance mask of every variant puts the same labels at the same world positions
        seg = sitk.ReadImage(str(out / f"{name}_seg.nii.gz"))
        for lm in ref:
            assert seg[seg.TransformPhysicalPointToIndex(lm.position_mm)] == \
                sitk.ReadImage(str(out / "asis_seg.nii.gz"))[
                    sitk.ReadImage(str(out / "asis_seg.nii.gz")).TransformPhysicalPointToIndex(lm.position_mm)]


def test_model_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="plans.json"):
        Predictor.from_model_folder(tmp_path)


def test_validation_figures_equal_predict_and_evaluate(trained_model, phantom_dataset, tmp_path, monkeypatch):
    """One path: training validation on the cache gives exactly what predict + evaluate give on the files."""
    from spinelm.evaluation import evaluate_folders
    from spinelm.plans import ModelFolder
    from spinelm.training import validate

    model = ModelFolder(trained_model)
    val = json.loads(model.splits_path.read_text())[0]["val"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in val:
        (inputs / f"{case}_0000.nii.gz").symlink_to(phantom_dataset / "imagesTr" / f"{case}_0000.nii.gz")
    for fake in (False, True):  # the few-step network, and image-derived outputs with many peaks
        predictor = Predictor.from_model_folder(trained_model, folds=[0])
        if fake:
            monkeypatch.setattr(Predictor, "network_outputs", lambda self, data, configuration=None: _fake_outputs(self)(data))
        v = validate(predictor.networks[0], model.cache_dir(), val, model.plans, "cpu",
                     coarse=(predictor.coarse_networks, model.cache_dir("coarse")))
        out = tmp_path / f"out_{fake}"
        predict_directory(inputs, out, predictor, qc=False, progress=False)
        ev = evaluate_folders(out, phantom_dataset)["overall"]
        assert (v["n_gt"], v["n_identified"], v["n_missed"], v["n_false_positive"]) == \
            (ev["n_gt"], ev["n_identified"], ev["n_missed"], ev["n_false_positive"])
        # written centroid files keep 3 decimals of a millimetre
        assert v["d_mean_mm"] == pytest.approx(ev["d_mean_mm"], abs=1e-3, nan_ok=True)
    assert v["n_gt"] > 0 and np.isfinite(v["d_mean_mm"])  # the image-derived outputs label vertebrae


def test_implausible_headers_and_scans_too_big_for_memory_are_refused_before_any_work(trained_model,
                                                                                     phantom_dataset, tmp_path,
                                                                                     monkeypatch, capsys):
    import time

    from spinelm import inference

    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted((phantom_dataset / "imagesTr").glob("*_0000.nii.gz"))[:1]
    (inputs / good[0].name).symlink_to(good[0])
    rng = np.random.default_rng(0)
    # a "body" of 3.6 m x 5.6 m x 2.4 m: resampled to the plan it would be ~1e9 voxels
    _write(inputs / "huge_0000.nii.gz", rng.random((48, 112, 72)).astype(np.float32), (50.0, 50.0, 50.0))
    _write(inputs / "tiny_0000.nii.gz", rng.random((64, 64, 64)).astype(np.float32), (0.01, 0.01, 0.01))
    _write(inputs / "coarse_0000.nii.gz", rng.random((10, 10, 10)).astype(np.float32), (20.0, 20.0, 20.0))
    t0 = time.perf_counter()
    rc = main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(trained_model), "--no-progress",
               "--no-qc"])
    assert rc == 1 and time.perf_counter() - t0 < 120
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert rows[good[0].name[:-12]]["status"] == "done"
    assert "implausible physical size" in rows["huge"]["error"] and "3600.0" in rows["huge"]["error"]
    assert "too small to hold a vertebra" in rows["tiny"]["error"]
    assert "too coarse to separate vertebrae" in rows["coarse"]["error"]
    for case in ("huge", "tiny", "coarse"):
        assert float(rows[case]["seconds"]) < 2.0
    # a scan that is plausible but would not fit in the memory available now is refused before resampling
    monkeypatch.setattr(inference, "available_memory_bytes", lambda: 5 * 2 ** 20)
    capsys.readouterr()
    rc = main(["predict", "-i", str(inputs / good[0].name), "-o", str(tmp_path / "out2"), "-m", str(trained_model),
               "--no-progress", "--no-qc"])
    err = capsys.readouterr().err
    assert rc == 1 and "needs about" in err and "GB are available" in err and good[0].name in err


def test_slurm_array_variables_choose_the_part():
    from spinelm.predict import slurm_array_part

    assert slurm_array_part({}) is None
    assert slurm_array_part({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (4, 3)
    # --array=1-10: tasks count from SLURM_ARRAY_TASK_MIN
    assert slurm_array_part({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1",
                             "SLURM_ARRAY_TASK_MAX": "10"}) == (10, 0)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT"):
        slurm_array_part({"SLURM_ARRAY_TASK_ID": "1"})


def test_two_parts_in_two_processes_merge_to_what_one_process_writes(trained_model, phantom_dataset, tmp_path):
    """A batch split into 2 parts (one by --part-id, one by SLURM's array variables) run as 2 local
    processes, then 'spinelm merge', gives the outputs of one process."""
    import os
    import subprocess
    import sys

    from spinelm.io.landmarks import read_landmarks

    inp = phantom_dataset / "imagesTr"
    base = [sys.executable, "-m", "spinelm", "predict", "-i", str(inp), "-m", str(trained_model), "--no-progress",
            "--no-qc"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    subprocess.run(base + ["-o", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    split = tmp_path / "split"
    procs = [subprocess.Popen(base + ["-o", str(split), "--num-parts", "2", "--part-id", "0"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
             # the shipped sbatch example, run locally as array task 1 of 2
             subprocess.Popen(["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "slurm_predict.sbatch"),
                               str(inp), str(split), str(trained_model)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
                                   "SPINELM": f"{sys.executable} -m spinelm", "OMP_NUM_THREADS": "1"})]
    logs = [p.communicate()[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert "SLURM array task: part 1 of 2" in logs[1]
    assert {p.name for p in split.glob("summary_part*")} == {"summary_part0of2.csv", "summary_part1of2.csv"}
    assert main(["merge", str(split)]) == 0
    one = {r["case"]: r for r in csv.DictReader(open(tmp_path / "one" / "summary.csv"))}
    merged = {r["case"]: r for r in csv.DictReader(open(split / "summary.csv"))}
    assert one.keys() == merged.keys() and len(one) == len(list(inp.glob("*_0000.nii.gz")))
    for case in one:
        assert {k: v for k, v in one[case].items() if not k.startswith("seconds")} == \
            {k: v for k, v in merged[case].items() if not k.startswith("seconds")}
        a, b = read_landmarks(tmp_path / "one" / f"{case}_ctd.json"), read_landmarks(split / f"{case}_ctd.json")
        assert [lm.label for lm in a] == [lm.label for lm in b]
        assert np.allclose([lm.position_mm for lm in a], [lm.position_mm for lm in b], atol=1e-3)


def test_merge_reports_a_part_that_never_ran(tmp_path, capsys):
    from spinelm.io.outputs import STAGES, write_summary

    write_summary(tmp_path / "summary_part0of3.csv", {"a": {"case": "a", "status": "done"},
                                                      "b": {"case": "b", "status": "failed", "error": "unreadable"}})
    write_summary(tmp_path / "summary_part2of3.csv", {"c": {"case": "c", "status": "done"}})
    assert main(["merge", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "2 of 3 part(s) found" in out and "part 1 of 3: no summary" in out and "failed b: unreadable" in out
    assert [r["case"] for r in csv.DictReader(open(tmp_path / "summary.csv"))] == ["a", "b", "c"]


def test_the_coarse_stage_carries_a_trained_level_head_that_prediction_reads(trained_model, phantom_dataset):
    """The plan gives the coarse network a level head; its checkpoint holds the head's weights, and
    prediction feeds every candidate's crop through it (probabilities over the plan's labels)."""
    import torch

    from spinelm.inference import Frame, Predictor
    from spinelm.io.scan import read_scan
    from spinelm.nnunet import run_preprocessor
    from spinelm.plans import ModelFolder

    model = ModelFolder(trained_model)
    spec = model.plans.identification
    assert spec is not None and spec["labels"] == list(model.plans.heads["segmentation"].labels)
    state = torch.load(model.checkpoint(0, "final", "coarse"), map_location="cpu", weights_only=True)["network"]
    assert any(k.startswith("level_head.") for k in state)
    assert spec["upright_crops"] > 0 and any(k.startswith("upright_head.") for k in state)
    pr = Predictor.from_model_folder(trained_model, folds=[0])
    img = sorted((phantom_dataset / "imagesTr").glob("*_0000.nii.gz"))[0]
    image, geom, _ = read_scan([img])
    data, _, info = run_preprocessor(image, geom.array_spacing, pr.plans, "coarse")
    frame = Frame.from_info(geom, pr.plans.transpose_forward, info)
    reader = pr.level_reader(None, None, (data, frame))
    assert reader
    world = frame.to_world(np.asarray([np.asarray(data.shape[1:]) / 2, np.asarray(data.shape[1:]) / 3]))
    probs = reader(world)
    assert len(probs) == 2 and set(probs[0]) == set(spec["labels"])
    assert all(abs(sum(p.values()) - 1) < 1e-5 for p in probs)
    up = reader.upright(world)
    assert up.shape == (2,) and np.all((up >= 0) & (up <= 1))


def _lying_header(src: Path, dst: Path, fault: str) -> Path:
    """``src`` rewritten with its voxels untouched and the direction matrix lying about the head-foot
    axis: ``flip`` (reversed) or ``swap_lr`` (exchanged with the left-right axis)."""
    import SimpleITK as sitk

    im = sitk.ReadImage(str(src))
    d = np.asarray(im.GetDirection(), float).reshape(3, 3)
    si = int(np.argmax(np.abs(d[2])))
    if fault == "flip":
        d[:, si] = -d[:, si]
    else:
        lr = int(np.argmax(np.abs(d[0])))
        d[:, [si, lr]] = d[:, [lr, si]]
    im.SetDirection(tuple(d.ravel()))
    sitk.WriteImage(im, str(dst))
    return dst


def _coarse(predictor, path):
    from spinelm.inference import Frame
    from spinelm.nnunet import run_preprocessor

    image, geom, _ = read_scan([path])
    data, _, info = run_preprocessor(image, geom.array_spacing, predictor.plans, "coarse")
    return data, Frame.from_info(geom, predictor.plans.transpose_forward, info)


def test_turning_back_a_lying_header_gives_the_scan_as_it_should_be(trained_model, phantom_dataset, tmp_path):
    """The turned-over comparison relies on this: one of the turned arrays of a scan whose header
    lies about the head-foot axis is the correctly stored scan, and its key names the fault."""
    from scipy.ndimage import zoom

    from spinelm.inference import turned_arrays

    predictor = Predictor.from_model_folder(trained_model, folds=[0])
    src = sorted((phantom_dataset / "imagesTr").glob("*_0000.nii.gz"))[0]
    clean, _ = _coarse(predictor, src)
    spacing = predictor.plans.configuration("coarse").spacing
    for fault, key in (("flip", "flip"), ("swap_lr", "swap_L")):
        data, frame = _coarse(predictor, _lying_header(src, tmp_path / f"{fault}_0000.nii.gz", fault))
        turned = turned_arrays(data, predictor.plans.cc_axis, spacing, frame)
        assert len(turned) == 5

        def similarity(a):  # resampling the swapped axes may gain or lose a voxel at the border
            if np.any(np.abs(np.subtract(a.shape, clean.shape)) > 2):
                return -1.0
            a = zoom(a, np.divide(clean.shape, a.shape), order=1)
            return float(np.corrcoef(a.ravel(), clean.ravel())[0, 1])
        sims = sorted(((similarity(t[2]), t[0], t[1]) for t in turned), reverse=True)
        # the right one matches (resampled twice when the spacing is anisotropic), no other does
        assert sims[0][0] > 0.85 and sims[1][0] < 0.5, (fault, sims)
        best = (sims[0][1], sims[0][2])
        assert best[0].startswith(key) and "head-foot axis" in best[1]


def test_a_scan_that_looks_like_a_spine_only_turned_over_is_flagged_with_the_fault(trained_model, phantom_dataset,
                                                                                   tmp_path, monkeypatch):
    """A coarse stage that responds to the correctly oriented scan only: stored correctly, no turned
    reason; stored with a flipped header, the review reason names the flip."""
    predictor = Predictor.from_model_folder(trained_model, folds=[0])
    src = sorted((phantom_dataset / "imagesTr").glob("*_0000.nii.gz"))[0]
    upright, _ = _coarse(predictor, src)
    fake = _fake_outputs(predictor)
    real = Predictor.network_outputs

    def outputs(self, data, configuration=None):
        if configuration != "coarse":
            return real(self, data, configuration)
        out = fake(data)
        arr = data.numpy()
        looks_right = arr.shape == upright.shape and np.corrcoef(arr.ravel(), upright.ravel())[0, 1] > 0.99
        if not looks_right:
            out["heatmap"] = out["heatmap"] * 0.2  # weak, unconvincing peaks
            out["segmentation"] = torch.ones_like(out["segmentation"]) / len(out["segmentation"])
        return out
    monkeypatch.setattr(Predictor, "network_outputs", outputs)
    for path, flipped in ((src, False), (_lying_header(src, tmp_path / "f_0000.nii.gz", "flip"), True)):
        image, geom, _ = read_scan([path])
        result = predictor.predict_array(image, geom, str(path))
        assert [r["key"] for r in result.turned][0] == "stored" and len(result.turned) == 6
        turned = [r for r in result.qc_reasons if "turned over" in r]
        assert bool(turned) == flipped, result.qc_reasons
        if flipped:
            assert "head-foot axis flipped" in turned[0]
    # from the command line: the reason reaches summary.csv; --no-header-check skips the comparison
    from spinelm.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "f_0000.nii.gz").symlink_to(tmp_path / "f_0000.nii.gz")
    for flag, expected in (([], True), (["--no-header-check"], False)):
        out = tmp_path / f"out{len(flag)}"
        assert main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(trained_model), "-f", "0",
                     "--no-progress", "--no-qc", *flag]) == 0
        row = next(csv.DictReader(open(out / "summary.csv")))
        assert ("head-foot axis flipped" in row["qc_reasons"]) == expected, row["qc_reasons"]


def test_calibration_learns_the_flip_check_that_prediction_then_uses(trained_model, tmp_path):
    """`spinelm calibrate` compares each validation scan's coarse evidence as stored and flipped head
    over foot, writes what it learned to orientation.json, and the predictor loads it."""
    import json
    import shutil

    from spinelm.cli import main
    from spinelm.sanity import FLIP_CHECK_FILE, FLIP_METRICS

    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    assert main(["calibrate", str(model), "--device", "cpu", "--no-progress"]) == 0
    check = json.loads((model / FLIP_CHECK_FILE).read_text())
    n_val = len(json.loads((model / "splits.json").read_text())[0]["val"])
    assert check["format"] == "spinelm-orientation" and check["cases"] == n_val
    assert set(check["metrics"]) == set(FLIP_METRICS)
    assert Predictor.from_model_folder(model, folds=[0]).flip_check == check
    # the ordering's weight of the label evidence, fitted on the same validation cases, is what predict uses
    from spinelm.ordering import LABEL_WEIGHTS

    ordering = json.loads((model / "ordering.json").read_text())
    assert ordering["label_weight"] in LABEL_WEIGHTS and ordering["fitted_on"]["cases"] == n_val
    assert set(map(float, ordering["fitted_on"]["weights"])) == set(LABEL_WEIGHTS)
    assert json.loads((model / "calibration.json").read_text())["fitted_on"]["label_weight"] == ordering["label_weight"]
    ordering["label_weight"] = 0.35  # whatever is stored is what predict orders with, on its own copy of the plan
    (model / "ordering.json").write_text(json.dumps(ordering))
    predictor = Predictor.from_model_folder(model, folds=[0])
    assert predictor.plans.spine_model().label_weight == 0.35 and predictor.describe()["label_weight"] == 0.35
    (model / "ordering.json").unlink()
    assert Predictor.from_model_folder(model, folds=[0]).plans.spine_model().label_weight == 1.0


def test_the_plan_carries_column_shape_limits_that_the_annotated_columns_pass(trained_model, phantom_dataset):
    """The column-shape check reads its limits from the plan (learned from the training centroids):
    every annotated column passes them; the same column with one centroid moved onto the posterior
    arch is a reason to review."""
    from spinelm.io.landmarks import Landmark
    from spinelm.sanity import column_reasons

    predictor = Predictor.from_model_folder(trained_model, folds=[0])
    spine = predictor.plans.raw["spine"]
    assert spine["column_shape"]["max_bend_deg"] > spine["column_shape"]["bend_deg_max"] > 0
    for path in sorted((phantom_dataset / "centroidsTr").glob("*.json")):
        lms = read_landmarks(path)
        assert column_reasons(lms, spine) == [], path.name
    lms = read_landmarks(sorted((phantom_dataset / "centroidsTr").glob("*.json"))[0])
    mid = len(lms) // 2
    along = np.asarray(lms[mid + 1].position_mm) - np.asarray(lms[mid - 1].position_mm)
    across = np.cross(along, [1.0, 0.0, 0.0] if abs(along[0]) < 0.9 * np.linalg.norm(along) else [0.0, 1.0, 0.0])
    p = np.asarray(lms[mid].position_mm) + 0.8 * spine["median_consecutive_distance_mm"] * across / np.linalg.norm(across)
    moved = lms[:mid] + [Landmark(lms[mid].label, tuple(p))] + lms[mid + 1:]
    assert any("bends" in r for r in column_reasons(moved, spine))
