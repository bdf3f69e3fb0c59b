"""Convert the VerSe release layout into a spinelm dataset folder.

VerSe (2019/2020) ships ``rawdata/<subject>/<scan>_ct.nii.gz`` and
``derivatives/<subject>/<scan>_seg-vert_msk.nii.gz`` plus ``<scan>_seg-subreg_ctd.json``, possibly
below split folders (``01_training/``, ...). The converter finds every CT, pairs it with its mask
and centroids by the scan prefix, and writes ``imagesTr/<scan>_0000.nii.gz``,
``labelsTr/<scan>.nii.gz`` (integer labels; VerSe masks are sometimes float64) and
``centroidsTr/<scan>.json`` (VerSe voxel coordinates converted to world LPS mm).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinelm.io.files import write_json_atomic
from spinelm.io.image import read_geometry, read_image, write_image
from spinelm.io.landmarks import read_landmarks, write_spinelm_json

log = logging.getLogger(__name__)

CT_SUFFIX = "_ct.nii.gz"
MASK_SUFFIX = "_seg-vert_msk.nii.gz"
CTD_SUFFIX = "_seg-subreg_ctd.json"


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_verse_scans(src: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """``{scan: {"image", "mask", "ctd"}}`` for every CT under ``src`` (mask/ctd may be absent)."""
    src = Path(src)
    scans: dict[str, dict[str, Path]] = {}
    for path in sorted(src.rglob(f"*{CT_SUFFIX}")):
        scans.setdefault(path.name[: -len(CT_SUFFIX)], {})["image"] = path
    for suffix, key in ((MASK_SUFFIX, "mask"), (CTD_SUFFIX, "ctd")):
        for path in sorted(src.rglob(f"*{suffix}")):
            scan = path.name[: -len(suffix)]
            if scan in scans:
                scans[scan][key] = path
    return scans


def convert_verse(src: str | os.PathLike, dst: str | os.PathLike, copy_images: bool = True,
                  progress: bool = True) -> ConversionReport:
    """Convert a VerSe release folder into ``dst`` (nnU-Net v2 raw layout + ``centroidsTr``).

    Args:
        src: VerSe root (containing ``rawdata/`` and ``derivatives/`` somewhere below).
        dst: output dataset folder (created).
        copy_images: copy CT files; False makes symbolic links instead (saves disk).

    Raises:
        FileNotFoundError: ``src`` does not exist or holds no ``*_ct.nii.gz``.
    """
    import SimpleITK as sitk
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: VerSe folder not found")
    scans = find_verse_scans(src)
    if not scans:
        raise FileNotFoundError(f"{src}: no '*{CT_SUFFIX}' files found; expected the VerSe layout rawdata/<subject>/"
                                f"<scan>{CT_SUFFIX} with derivatives/<subject>/<scan>{MASK_SUFFIX}")
    for sub in ("imagesTr", "labelsTr", "centroidsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    report = ConversionReport()
    for scan, files in tqdm(scans.items(), desc="Converting VerSe", unit="scan", disable=not progress):
        if "mask" not in files and "ctd" not in files:
            report.skipped.append((scan, "no mask and no centroid file"))
            continue
        try:
            geom = read_geometry(files["image"])
            if "mask" in files:
                mask = read_image(files["mask"])
                arr = np.rint(sitk.GetArrayFromImage(mask)).astype(np.uint8)
                out = sitk.GetImageFromArray(arr)
                out.CopyInformation(mask)
                write_image(out, dst / "labelsTr" / f"{scan}.nii.gz")
            if "ctd" in files:
                lms = read_landmarks(files["ctd"], geom)
                write_spinelm_json(dst / "centroidsTr" / f"{scan}.json", lms, source=str(files["ctd"].name))
            target = dst / "imagesTr" / f"{scan}_0000.nii.gz"
            if target.exists() or target.is_symlink():
                target.unlink()
            if copy_images:
                shutil.copyfile(files["image"], target)
            else:
                target.symlink_to(files["image"].resolve())
        except (OSError, ValueError) as exc:
            report.skipped.append((scan, str(exc)))
            continue
        report.converted.append(scan)
    write_json_atomic(dst / "dataset.json", {
        "name": f"VerSe (converted from {src})", "channel_names": {"0": "CT"},
        "labels": {"background": 0}, "numTraining": len(report.converted), "file_ending": ".nii.gz"})
    return report
