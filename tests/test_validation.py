"""``spinelm validate``: every check reports the file and the problem; all problems at once."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from spinelm.cli import main
from spinelm.dataset import discover_dataset
from spinelm.validation import validate_dataset
from tests.conftest import real_data


def _errors(root):
    rep = validate_dataset(root, progress=False)
    return rep, [p for p in rep.errors]


def _one_error(root, file_part, text):
    rep, errs = _errors(root)
    hits = [e for e in errs if file_part in e.path and text in e.message]
    assert hits, f"expected an error on {file_part!r} about {text!r}, got: {rep.lines()}"
    return hits[0]


def _write_like(ref_path, array, out_path, **geometry):
    ref = sitk.ReadImage(str(ref_path))
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(ref) if array.shape == sitk.GetArrayViewFromImage(ref).shape else None
    for key, value in geometry.items():
        getattr(img, f"Set{key}")(value)
    sitk.WriteImage(img, str(out_path))


def test_clean_phantom_dataset_validates(phantom_dataset):
    rep = validate_dataset(phantom_dataset, progress=False)
    assert rep.ok, rep.lines()
    assert rep.n_cases == 4 and rep.n_unlabelled == 1


def test_truncated_image(phantom_copy):
    p = phantom_copy / "imagesTr" / "phantom_001_0000.nii.gz"
    p.write_bytes(p.read_bytes()[:2000])
    e = _one_error(phantom_copy, "phantom_001_0000", "unreadable image")
    assert e.case == "phantom_001"


def test_label_outside_convention(phantom_copy):
    p = phantom_copy / "labelsTr" / "phantom_002.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    arr[0, 0, 0] = 99
    _write_like(p, arr, p)
    _one_error(phantom_copy, "phantom_002.nii.gz", "label(s) [99] outside the VerSe convention")


def test_mask_geometry_differs_from_image(phantom_copy):
    p = phantom_copy / "labelsTr" / "phantom_003.nii.gz"
    img = sitk.ReadImage(str(p))
    img.SetOrigin(tuple(np.asarray(img.GetOrigin()) + 5.0))
    sitk.WriteImage(img, str(p))
    _one_error(phantom_copy, "phantom_003.nii.gz", "mask geometry differs from its image (origin")


def test_nan_voxels(phantom_copy):
    p = phantom_copy / "imagesTr" / "phantom_000_0000.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32)
    arr[1, 2, 3] = np.nan
    arr[2, 2, 3] = np.inf
    _write_like(p, arr, p)
    _one_error(phantom_copy, "phantom_000_0000", "2 voxel(s) are NaN or Inf")


@pytest.mark.parametrize("shape, text", [((1, 10, 10), "single slice"), (None, "found 2-D"), ("4d", "found 4-D")])
def test_wrong_dimensionality(phantom_copy, shape, text):
    p = phantom_copy / "imagesTr" / "phantom_000_0000.nii.gz"
    if shape is None:
        sitk.WriteImage(sitk.Image(10, 10, sitk.sitkInt16), str(p))
    elif shape == "4d":
        sitk.WriteImage(sitk.Image([5, 5, 5, 2], sitk.sitkInt16), str(p))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.int16)), str(p))
    _one_error(phantom_copy, "phantom_000_0000", text)


def test_centroid_outside_image(phantom_copy):
    p = phantom_copy / "centroidsTr" / "phantom_001.json"
    doc = json.loads(p.read_text())
    doc["vertebrae"][0]["position_mm"] = [5000.0, 0.0, 0.0]
    p.write_text(json.dumps(doc))
    _one_error(phantom_copy, "phantom_001.json", "lies outside the image")


def test_centroid_far_from_its_vertebra_is_a_warning(phantom_copy):
    p = phantom_copy / "centroidsTr" / "phantom_001.json"
    doc = json.loads(p.read_text())
    a, b = doc["vertebrae"][0], doc["vertebrae"][1]
    a["position_mm"], b["position_mm"] = b["position_mm"], a["position_mm"]  # swapped labels
    p.write_text(json.dumps(doc))
    rep = validate_dataset(phantom_copy, progress=False)
    assert rep.ok
    assert any("from the nearest voxel of its label" in w.message for w in rep.warnings)


def test_case_without_annotation_orphans_and_duplicates(phantom_copy):
    (phantom_copy / "labelsTr" / "phantom_000.nii.gz").unlink()
    (phantom_copy / "centroidsTr" / "phantom_000.json").unlink()
    shutil.copy(phantom_copy / "labelsTr" / "phantom_001.nii.gz", phantom_copy / "labelsTr" / "ghost.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(phantom_copy / "imagesTr" / "phantom_002_0000.nii.gz")),
                    str(phantom_copy / "imagesTr" / "phantom_002_0000.mha"))
    rep, errs = _errors(phantom_copy)
    text = "\n".join(rep.lines())
    assert "case 'phantom_000' has no annotation: no mask" in text and "boxes (boxesTr/phantom_000.json)" in text
    assert "ghost.nii.gz: mask without image" in text
    assert "duplicated case: channel 0000 of case 'phantom_002'" in text
    assert len(errs) >= 3  # all reported in one run


def test_identical_images_under_two_names_warn(phantom_copy):
    for sub, name in (("imagesTr", "phantom_000_0000.nii.gz"), ("labelsTr", "phantom_000.nii.gz"),
                      ("centroidsTr", "phantom_000.json")):
        shutil.copy(phantom_copy / sub / name, phantom_copy / sub / name.replace("phantom_000", "copy_000"))
    rep = validate_dataset(phantom_copy, progress=False)
    assert any("identical image to case" in w.message for w in rep.warnings)


def test_bad_classes_csv_and_missing_channel(phantom_copy):
    (phantom_copy / "classesTr.csv").write_text("case,label,class\nphantom_000,L9,1\nnobody,L1,0\n")
    ds_json = json.loads((phantom_copy / "dataset.json").read_text())
    ds_json["channel_names"] = {"0": "T2", "1": "T1"}
    (phantom_copy / "dataset.json").write_text(json.dumps(ds_json))
    text = "\n".join(validate_dataset(phantom_copy, progress=False).lines())
    assert "unknown vertebra 'L9'" in text
    assert "classes for case 'nobody'" in text
    assert "missing channel(s) 0001" in text


def test_discovery_infers_layout_without_dataset_json(phantom_copy):
    (phantom_copy / "dataset.json").unlink()
    ds = discover_dataset(phantom_copy)
    assert ds.file_ending == ".nii.gz" and ds.num_channels == 1 and len(ds.cases) == 4
    assert ds.cases[0].mask is not None and ds.cases[0].centroids is not None and ds.cases[0].classes


def test_cli_exit_status_and_one_line_per_problem(phantom_copy, capsys):
    assert main(["validate", str(phantom_copy), "--no-progress"]) == 0
    p = phantom_copy / "imagesTr" / "phantom_001_0000.nii.gz"
    p.write_bytes(p.read_bytes()[:1000])
    assert main(["validate", str(phantom_copy), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out
    assert any(line.startswith("ERROR") and "imagesTr/phantom_001_0000.nii.gz" in line for line in out.splitlines())
    assert main(["validate", str(phantom_copy / "nope"), "--no-progress"]) == 1


def test_real_lumbar_mr_validates():
    rep = validate_dataset(real_data("lumbar-mr"), progress=False)
    assert rep.ok, rep.lines()
    assert rep.n_cases == 32


def test_real_lumbar_mr_copy_with_three_broken_cases_names_each(tmp_path, capsys):
    src = real_data("lumbar-mr")
    dst = tmp_path / "lumbar"
    for sub in ("imagesTr", "labelsTr", "centroidsTr"):
        (dst / sub).mkdir(parents=True)
    shutil.copy(src / "dataset.json", dst)
    cases = ["VB3_01", "VB3_02", "VB3_03", "VB3_04"]
    for c in cases:
        shutil.copy(src / "imagesTr" / f"{c}_0000.nii.gz", dst / "imagesTr")
        shutil.copy(src / "labelsTr" / f"{c}.nii.gz", dst / "labelsTr")
        shutil.copy(src / "centroidsTr" / f"{c}.json", dst / "centroidsTr")
    img = dst / "imagesTr" / "VB3_01_0000.nii.gz"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 3])  # truncated image
    m = dst / "labelsTr" / "VB3_02.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(m)))
    arr[arr == 22] = 99  # label 99
    _write_like(m, arr, m)
    m3 = sitk.ReadImage(str(dst / "labelsTr" / "VB3_03.nii.gz"))
    m3.SetSpacing((1.0, 1.0, 1.5))  # geometry differs from its image
    sitk.WriteImage(m3, str(dst / "labelsTr" / "VB3_03.nii.gz"))
    assert main(["validate", str(dst), "--no-progress"]) == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert any("VB3_01_0000.nii.gz" in e and "unreadable" in e for e in errors)
    assert any("VB3_02.nii.gz" in e and "99" in e for e in errors)
    assert any("VB3_03.nii.gz" in e and "geometry differs" in e for e in errors)
    assert not any("VB3_04" in e for e in errors)


def test_zero_voxel_size_in_the_header(phantom_copy):
    import gzip
    import struct
    p = phantom_copy / "imagesTr" / "phantom_002_0000.nii.gz"
    data = bytearray(gzip.decompress(p.read_bytes()))
    data[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    p.write_bytes(gzip.compress(bytes(data)))
    _one_error(phantom_copy, "phantom_002_0000", "voxel size (pixdim)")


def test_non_integer_mask_values(phantom_copy):
    p = phantom_copy / "labelsTr" / "phantom_001.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32)
    arr[arr > 0] += 0.4
    _write_like(p, arr, p)
    _one_error(phantom_copy, "phantom_001.nii.gz", "non-integer values")


def test_broken_or_duplicated_centroid_entries(phantom_copy):
    (phantom_copy / "centroidsTr" / "phantom_000.json").write_text('{"vertebrae": [')
    p = phantom_copy / "centroidsTr" / "phantom_001.json"
    doc = json.loads(p.read_text())
    doc["vertebrae"].append(dict(doc["vertebrae"][0]))
    p.write_text(json.dumps(doc))
    _one_error(phantom_copy, "phantom_000.json", "invalid JSON at line 1")
    _one_error(phantom_copy, "phantom_001.json", "listed twice")


def test_channels_on_different_grids(phantom_copy):
    ds_json = json.loads((phantom_copy / "dataset.json").read_text())
    ds_json["channel_names"] = {"0": "T2", "1": "T1"}
    (phantom_copy / "dataset.json").write_text(json.dumps(ds_json))
    for case in ("phantom_000", "phantom_001", "phantom_002", "phantom_003"):
        img = sitk.ReadImage(str(phantom_copy / "imagesTr" / f"{case}_0000.nii.gz"))
        if case == "phantom_003":
            img.SetOrigin(tuple(np.asarray(img.GetOrigin()) + 3.0))
        sitk.WriteImage(img, str(phantom_copy / "imagesTr" / f"{case}_0001.nii.gz"))
    rep, errs = _errors(phantom_copy)
    assert [e.case for e in errs if "channel geometry differs" in e.message] == ["phantom_003"], rep.lines()
