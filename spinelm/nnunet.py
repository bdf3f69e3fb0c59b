"""Every nnU-Net view of spinelm's data, and the environment shim nnunetv2 needs; nothing else
imports nnunetv2's planner or preprocessor.

nnunetv2 reads ``dataset.json`` and plans from folders named by environment variables, looked up
lazily: :func:`nnunet_environment` points them at a temporary folder for the duration of a call.
:func:`dataset_json` and :func:`plans_view` translate spinelm's fingerprint and plans into
nnU-Net's dictionaries; :func:`run_preprocessor` runs nnunetv2's ``DefaultPreprocessor`` on an
array in memory. No SimpleITK here.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from spinelm import labels as L
from spinelm.io.files import write_json_atomic

#: The one nnU-Net dataset name spinelm's temporary folders use.
DATASET_NAME = "Dataset999_spinelm"
#: Worker processes nnunetv2 may start by default (it spawns a pool; 2-core machines choke on more).
DEFAULT_N_PROC = max(1, min(os.cpu_count() or 1, 4))


def set_default_processes() -> None:
    """nnunetv2 reads ``nnUNet_def_n_proc`` at import: set a sane default before importing it."""
    os.environ.setdefault("nnUNet_def_n_proc", str(DEFAULT_N_PROC))


def dataset_json(channel_names: dict, segmentation_labels, files: dict | None = None) -> dict:
    """nnU-Net ``dataset.json``: channels, and labels numbered by the segmentation head's channel.

    ``files`` (``{case: {"images": [...], "label": ...}}``) fills nnU-Net's ``"dataset"`` key, which
    points it at the user's files in place (nothing is copied).
    """
    labels = {"background": 0, **{L.name_of(lab): i for i, lab in enumerate(segmentation_labels, start=1)}}
    out = {"channel_names": channel_names, "labels": labels, "numTraining": len(files or {}),
           "file_ending": ".nii.gz"}
    if files is not None:
        out.update({"overwrite_image_reader_writer": "SimpleITKIO", "dataset": files})
    return out


def plans_view(plans) -> dict:
    """The nnU-Net plans dictionary of spinelm plans (for ``PlansManager``)."""
    raw = plans.raw if hasattr(plans, "raw") else plans
    return {
        "dataset_name": DATASET_NAME, "plans_name": "spinelm",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, 1, 1],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": raw["transpose_forward"], "transpose_backward": raw["transpose_backward"],
        "configurations": raw["configurations"], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": raw["foreground_intensity_properties_per_channel"],
    }


def plans_dataset_json(plans) -> dict:
    """``dataset.json`` matching spinelm plans (labels = segmentation channel indices)."""
    raw = plans.raw if hasattr(plans, "raw") else plans
    return dataset_json(raw["channel_names"], raw["heads"].get("segmentation", {}).get("labels", []))


@contextlib.contextmanager
def nnunet_environment(dataset: dict, fingerprint: dict) -> Iterator[str]:
    """A temporary nnU-Net raw/preprocessed pair holding only ``dataset.json`` and the fingerprint;
    yields the dataset name. The previous environment values are restored afterwards."""
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA")
    old = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="spinelm_nnunet_") as tmp:
        raw, pre = Path(tmp) / "raw" / DATASET_NAME, Path(tmp) / "preprocessed" / DATASET_NAME
        raw.mkdir(parents=True)
        pre.mkdir(parents=True)
        write_json_atomic(raw / "dataset.json", dataset)
        write_json_atomic(pre / "dataset_fingerprint.json", fingerprint)
        os.environ["nnUNet_raw"] = str(Path(tmp) / "raw")
        os.environ["nnUNet_preprocessed"] = str(Path(tmp) / "preprocessed")
        os.environ["nnUNet_results"] = str(Path(tmp) / "results")
        os.environ.setdefault("nnUNet_n_proc_DA", str(max(os.cpu_count() or 1, 1)))
        try:
            yield DATASET_NAME
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run_preprocessor(image: np.ndarray, spacing, plans, configuration: str,
                     seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """nnunetv2's ``DefaultPreprocessor.run_case_npy`` on a canonical (C, z, y, x) array.

    Returns ``(data, seg, info)`` with ``info = {"bbox", "shape_after_cropping", "shape"}``: the map
    between canonical and preprocessed voxels (:mod:`spinelm.preprocessing`).
    """
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans_view(plans))
    cm = pm.get_configuration(configuration)
    props = {"spacing": [float(x) for x in spacing]}
    data, seg_out, props = DefaultPreprocessor(verbose=False).run_case_npy(
        np.asarray(image, dtype=np.float32), seg, props, pm, cm, plans_dataset_json(plans))
    info = {"bbox": [[int(a), int(b)] for a, b in props["bbox_used_for_cropping"]],
            "shape_after_cropping": [int(x) for x in props["shape_after_cropping_and_before_resampling"]],
            "shape": [int(x) for x in data.shape[1:]]}
    return data.astype(np.float32, copy=False), seg_out, info


__all__ = ["DATASET_NAME", "dataset_json", "nnunet_environment", "plans_dataset_json", "plans_view",
           "run_preprocessor", "set_default_processes"]
