"""``spinelm predict``: label every scan of a directory with a trained model folder.

Per scan: read and check the file(s), bring them to the canonical orientation, preprocess with the
model's own plan (nnunetv2's preprocessor), run the sliding window of every fold and average
(optionally with mirroring TTA), decode heatmap peaks, choose the anatomically valid sequence
(:mod:`spinelm.ordering`), and write, atomically, in the output folder:

    CASE_ctd.json        spinelm centroids, world LPS mm, with scores, the model and the source
    CASE_verse_ctd.json  VerSe centroid format (voxels of the input reoriented to P, I, R)
    CASE.mrk.json        3D Slicer markups (LPS)
    CASE_seg.nii.gz      instance mask (VerSe labels) on the input's own grid (models with a
                         segmentation head)
    CASE_qc.png          sagittal and coronal views with the labels drawn
    summary.csv          case, status, n_vertebrae, labels, seconds, error, input (one row per case)
    predict.json         the model, folds, plan and arguments of the run

``CASE_ctd.json`` is written last and marks a case as done for ``--continue``. A file that
cannot be used gets one line on stderr and a ``failed`` row; the batch goes on.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spinelm.dataset import split_channel
from spinelm.io.files import write_json_atomic, write_text_atomic
from spinelm.io.image import IMAGE_ENDINGS, Geometry, ImageReadError, image_ending, nifti_integrity, read_image

log = logging.getLogger(__name__)

#: An image needs at least this many voxels along every axis.
MIN_VOXELS_PER_AXIS = 4
#: ... and at least this extent (mm) along every axis to hold a vertebra.
MIN_EXTENT_MM = 15.0
#: Segmentation voxels further than this fraction of the neighbour distance from every labelled
#: centroid are left out of the instance mask.
INSTANCE_RADIUS_FRACTION = 0.9
SUMMARY_FIELDS = ["case", "status", "n_vertebrae", "labels", "seconds", "error", "input"]


class ScanError(ValueError):
    """A scan that cannot be labelled; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class ScanInput:
    case_id: str
    paths: list[Path]
    error: str | None = None


def collect_inputs(input_path: str | os.PathLike, n_channels: int = 1, recursive: bool = False,
                   pattern: str | None = None) -> list[ScanInput]:
    """The scans under ``input_path`` (a folder or one file), grouped by case, sorted by case id.

    Files named ``CASE_0000<ending>``, ``CASE_0001...`` are the channels of ``CASE``; with a
    single-channel model any other image file is a case of its own (``CASE<ending>``). In
    recursive mode, cases in subfolders get the folder in their id (``sub__CASE``) so that two
    ``scan.nii.gz`` in different folders do not collide.
    """
    root = Path(input_path)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        it = root.rglob(pattern or "*") if recursive else root.glob(pattern or "*")
        files, base = sorted(p for p in it if p.is_file() and not p.name.startswith(".")), root
    else:
        raise FileNotFoundError(f"{root}: no such file or folder")
    groups: dict[str, dict[int, Path]] = {}
    problems: dict[str, str] = {}
    for p in files:
        ending = image_ending(p.name)
        if ending is None:
            continue
        stem = p.name[: -len(ending)]
        parsed = split_channel(p.name)
        case, ch = parsed if parsed else (stem, 0)
        if not parsed and n_channels > 1:
            problems.setdefault(case, f"{p}: the model needs {n_channels} channels; name them {stem}_0000{ending}, "
                                      f"{stem}_0001{ending}, ...")
        rel = p.parent.relative_to(base)
        if rel.parts:
            case = "__".join(rel.parts + (case,))
        if ch in groups.setdefault(case, {}):
            problems.setdefault(case, f"{p}: channel {ch:04d} of case {case!r} also exists as "
                                      f"{groups[case][ch].name}")
            continue
        groups[case][ch] = p
    out = []
    for case in sorted(groups):
        chans = groups[case]
        paths = [chans[c] for c in sorted(chans)]
        err = problems.get(case)
        if err is None and sorted(chans) != list(range(n_channels)):
            err = (f"{paths[0]}: the model needs channels {list(range(n_channels))}, found {sorted(chans)} "
                   f"for case {case!r}")
        out.append(ScanInput(case, paths, err))
    return out


def read_scan(paths: list[Path]):
    """Read and check a scan's channels: ``(canonical (C, z, y, x) float32, canonical geometry,
    original SimpleITK image of channel 0)``.

    Raises:
        ScanError: naming the file: unreadable/truncated, not 3-D, NaN/Inf voxels, non-positive
            spacing, too small to hold a vertebra, constant, or channels on different grids.
    """
    import SimpleITK as sitk

    from spinelm.io.image import to_canonical

    arrays, geom, first = [], None, None
    for path in paths:
        if not Path(path).is_file():
            raise ScanError(f"{path}: file not found")
        try:
            problem, n_bad, header = nifti_integrity(path)
            if problem:
                raise ScanError(f"{path}: unreadable image ({problem})")
            if header:
                raise ScanError(f"{path}: {header}")
            image = read_image(path, verify=False)
        except (ImageReadError, FileNotFoundError) as exc:
            raise ScanError(str(exc)) from None
        g0 = Geometry.from_sitk(image)
        if any(not np.isfinite(s) or s <= 0 for s in g0.spacing):
            raise ScanError(f"{path}: voxel spacing must be positive, found {g0.spacing}")
        if min(g0.size) < MIN_VOXELS_PER_AXIS or min(np.multiply(g0.size, g0.spacing)) < MIN_EXTENT_MM:
            raise ScanError(f"{path}: image too small to hold a vertebra: size {g0.size} voxels, extent "
                            f"{tuple(round(float(e), 1) for e in np.multiply(g0.size, g0.spacing))} mm (needs "
                            f">= {MIN_VOXELS_PER_AXIS} voxels and >= {MIN_EXTENT_MM:.0f} mm along every axis)")
        canonical = to_canonical(image)
        arr = sitk.GetArrayFromImage(canonical).astype(np.float32, copy=False)
        if n_bad or not np.all(np.isfinite(arr)):
            n = n_bad or int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise ScanError(f"{path}: {n} voxel(s) are NaN or Inf; expected finite values")
        if float(arr.max()) == float(arr.min()):
            raise ScanError(f"{path}: every voxel has the value {float(arr.min()):g}; the image is empty")
        g = Geometry.from_sitk(canonical)
        if geom is not None and g.same_as(geom):
            raise ScanError(f"{path}: geometry differs from channel 0 ({'; '.join(g.same_as(geom))})")
        geom = geom or g
        first = first if first is not None else image
        arrays.append(arr)
    return np.stack(arrays), geom, first


# ---------------------------------------------------------------------------------------- predictor


@dataclass
class CaseResult:
    """Prediction for one scan, in world coordinates and on the canonical grid."""

    landmarks: list  # spinelm.io.landmarks.Landmark, head to foot
    instance_mask: np.ndarray | None  # canonical (z, y, x) int16 VerSe labels, or None
    candidates: int
    seconds: float = 0.0


@dataclass
class Predictor:
    """A trained model folder ready to predict: plans and one network per fold.

    Args:
        model_dir: folder with ``plans.json`` and ``fold_N/checkpoint_<checkpoint>.pt``.
        folds: folds to ensemble (default: every fold that has the checkpoint).
        checkpoint: ``final``, ``best`` or ``latest``.
        device: ``cpu`` or ``cuda``.
        mirror: mirroring test-time augmentation over the plan's mirror axes (not cranio-caudal).
        step_size: sliding-window step as a fraction of the patch (nnU-Net's 0.5).
    """

    model_dir: Path
    folds: list[int] | None = None
    checkpoint: str = "final"
    device: str = "cpu"
    mirror: bool = False
    step_size: float = 0.5
    configuration: str = "fine"
    networks: list = field(default_factory=list, init=False)

    def __post_init__(self):
        from spinelm.network import build_network
        from spinelm.ordering import SpineModel
        from spinelm.planning import load_plans

        self.model_dir = Path(self.model_dir)
        plans_path = self.model_dir / "plans.json"
        if not plans_path.is_file():
            raise FileNotFoundError(f"{self.model_dir}: not a spinelm model folder (no plans.json); train one with "
                                    f"'spinelm plan-and-train DATASET -o {self.model_dir}'")
        self.plans = load_plans(plans_path)
        if self.folds is None:
            found = sorted(int(p.parent.name.split("_")[1]) for p in
                           self.model_dir.glob(f"fold_*/checkpoint_{self.checkpoint}.pt")
                           if re.fullmatch(r"fold_\d+", p.parent.name))
            if not found:
                raise FileNotFoundError(f"{self.model_dir}: no fold has checkpoint_{self.checkpoint}.pt; train first "
                                        f"(spinelm train {self.model_dir} --fold 0) or choose --checkpoint latest")
            self.folds = found
        for f in self.folds:
            ckpt = self.model_dir / f"fold_{f}" / f"checkpoint_{self.checkpoint}.pt"
            if not ckpt.is_file():
                raise FileNotFoundError(f"{ckpt}: not found (fold {f} is not trained)")
            net = build_network(self.plans, self.configuration)
            net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["network"])
            self.networks.append(net.to(self.device).eval())
        self.distance_mm = float(self.plans["spine"]["median_consecutive_distance_mm"])
        self.spine_model = SpineModel.from_stats(self.plans.get("spine"), default_distance_mm=self.distance_mm)
        heads = self.plans["heads"]
        self.known_labels = heads.get("segmentation", {}).get("labels") or heads["heatmap"].get("labels")

    def predict_network_outputs(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fold-averaged sliding-window outputs on a preprocessed (C, X, Y, Z) tensor."""
        from spinelm.inference import sliding_window

        cfg = self.plans["configurations"][self.configuration]
        mirror_axes = self.plans.get("mirror_axes") if self.mirror else None
        total: dict[str, torch.Tensor] = {}
        for net in self.networks:
            out = sliding_window(net, data, cfg["patch_size"], self.plans["heads"], step=self.step_size,
                                 mirror_axes=mirror_axes, device=self.device)
            for k, v in out.items():
                total[k] = total[k] + v if k in total else v
        return {k: v / len(self.networks) for k, v in total.items()}

    def predict_array(self, image: np.ndarray, geometry: Geometry) -> CaseResult:
        """Label a canonical (C, z, y, x) image whose canonical geometry is ``geometry``."""
        from spinelm.inference import decode_candidates
        from spinelm.io.landmarks import landmarks_from_arrays
        from spinelm.ordering import order_candidates
        from spinelm.preprocessing import preprocessed_to_world, run_preprocessor

        t0 = time.perf_counter()
        cfg = self.plans["configurations"][self.configuration]
        data, _, info = run_preprocessor(image, geometry.array_spacing, self.plans, self.configuration)
        pred = self.predict_network_outputs(torch.from_numpy(data))
        spacing = np.asarray(cfg["spacing"], dtype=np.float64)
        cands = decode_candidates(pred, self.plans["heads"], spacing, self.distance_mm,
                                  cc_axis=self.plans["cranio_caudal_axis"])
        vox = np.asarray([c.position for c in cands]).reshape(-1, 3)
        world = preprocessed_to_world(vox, geometry, self.plans["transpose_forward"], info["bbox"],
                                      info["shape_after_cropping"], info["shape"])
        # LPS: world z grows towards the head
        ordered = order_candidates(world, [c.score for c in cands], [c.label_probs for c in cands], cc_axis=2,
                                   distance_mm=self.distance_mm, superior_is_positive=True,
                                   allowed=self.known_labels, model=self.spine_model)
        idx = [i for i, _ in ordered]
        labels = [lab for _, lab in ordered]
        lms = landmarks_from_arrays(labels, world[idx], [cands[i].score for i in idx])
        mask = None
        if "segmentation" in pred:
            pp = self._instances(pred["segmentation"], vox[idx] * spacing, labels, spacing)
            mask = self._to_canonical_grid(pp, info, geometry.shape)
        return CaseResult(lms, mask, len(cands), time.perf_counter() - t0)

    def _instances(self, softmax: torch.Tensor, centres_mm: np.ndarray, labels: list[int],
                   spacing: np.ndarray) -> np.ndarray:
        """Vertebra voxels (segmentation foreground) labelled by their nearest ordered centroid."""
        fg = softmax.argmax(0).numpy() > 0
        out = np.zeros(fg.shape, np.int16)
        if not labels or not fg.any():
            return out
        pts = np.argwhere(fg)
        pos = pts * spacing
        d2 = ((pos[:, None, :] - centres_mm[None, :, :]) ** 2).sum(-1)  # (n_fg, n_labels)
        nearest = d2.argmin(1)
        keep = d2[np.arange(len(pts)), nearest] <= (INSTANCE_RADIUS_FRACTION * self.distance_mm) ** 2
        out[tuple(pts[keep].T)] = np.asarray(labels, np.int16)[nearest[keep]]
        return out

    def _to_canonical_grid(self, seg: np.ndarray, info: dict, canonical_shape) -> np.ndarray:
        """Preprocessed label map -> canonical (z, y, x) grid: nearest-neighbour resize, un-crop, un-transpose."""
        crop_shape = info["shape_after_cropping"]
        index = [np.minimum(((np.arange(n) + 0.5) * s / n).astype(np.int64), s - 1)
                 for n, s in zip(crop_shape, seg.shape)]
        resized = seg[np.ix_(*index)]
        tf = self.plans["transpose_forward"]
        full = np.zeros([canonical_shape[a] for a in tf], np.int16)
        full[tuple(slice(a, b) for a, b in info["bbox"])] = resized
        return np.ascontiguousarray(full.transpose(self.plans["transpose_backward"]))

    def describe(self) -> dict:
        return {"model": str(self.model_dir.resolve()), "folds": self.folds, "checkpoint": self.checkpoint,
                "configuration": self.configuration, "mirror_tta": self.mirror, "step_size": self.step_size,
                "device": str(self.device), "plans_format": self.plans.get("format"),
                "plans_version": self.plans.get("version"), "spinelm_version": self.plans.get("spinelm_version")}


# ------------------------------------------------------------------------------------------- outputs


def output_paths(out_dir: Path, case: str) -> dict[str, Path]:
    return {"ctd": out_dir / f"{case}_ctd.json", "verse": out_dir / f"{case}_verse_ctd.json",
            "mrk": out_dir / f"{case}.mrk.json", "seg": out_dir / f"{case}_seg.nii.gz",
            "qc": out_dir / f"{case}_qc.png"}


def write_case_outputs(out_dir: Path, case: str, result: CaseResult, canonical_image: np.ndarray,
                       canonical_geometry: Geometry, original, source: list[Path], run_info: dict,
                       qc: bool = True) -> None:
    """Every output of one case; the centroid JSON last (it marks the case done)."""
    import SimpleITK as sitk

    from spinelm.io.image import make_image, write_image
    from spinelm.io.landmarks import write_slicer_markups, write_verse_json, write_spinelm_json
    from spinelm.qc import save_qc_png

    paths = output_paths(out_dir, case)
    original_geometry = Geometry.from_sitk(original)
    if result.instance_mask is not None:
        canon = make_image(result.instance_mask, canonical_geometry)
        seg = sitk.Resample(canon, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
        write_image(seg, paths["seg"])
    if qc:
        save_qc_png(paths["qc"], canonical_image[0], canonical_geometry, result.landmarks, result.instance_mask,
                    title=case)
    write_verse_json(paths["verse"], result.landmarks, original_geometry)
    write_slicer_markups(paths["mrk"], result.landmarks)
    write_spinelm_json(paths["ctd"], result.landmarks, source=[str(p) for p in source], **run_info)


def _read_summary(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


def _write_summary(path: Path, rows: dict[str, dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for case in sorted(rows):
        w.writerow(rows[case])
    write_text_atomic(path, buf.getvalue())


@dataclass
class BatchReport:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    summary_csv: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def predict_directory(input_path: str | os.PathLike, out_dir: str | os.PathLike, predictor: Predictor,
                      recursive: bool = False, pattern: str | None = None, continue_: bool = False,
                      num_parts: int = 1, part_id: int = 0, qc: bool = True, progress: bool = True,
                      arguments: dict | None = None) -> BatchReport:
    """Label every scan under ``input_path``; see the module docstring for the outputs."""
    from tqdm import tqdm

    if not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id {part_id} must be in 0..{num_parts - 1} (--num-parts {num_parts})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scans = collect_inputs(input_path, len(predictor.plans["channel_names"]), recursive, pattern)
    scans = scans[part_id::num_parts]
    summary_path = out / ("summary.csv" if num_parts == 1 else f"summary_part{part_id}of{num_parts}.csv")
    rows = _read_summary(summary_path) if continue_ else {}
    run_info = {"model": predictor.describe(), "arguments": arguments or {}}
    write_json_atomic(out / ("predict.json" if num_parts == 1 else f"predict_part{part_id}of{num_parts}.json"),
                      {**run_info, "input": str(Path(input_path).resolve()), "n_scans": len(scans),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    report = BatchReport(summary_csv=summary_path)
    if not scans:
        log.warning("%s: no image files found (endings %s)%s", input_path, ", ".join(IMAGE_ENDINGS),
                    "" if recursive else "; use --recursive for subfolders")
    bar = tqdm(scans, desc="Predicting", unit="scan", disable=not progress)
    for scan in bar:
        bar.set_postfix_str(scan.case_id)
        paths = output_paths(out, scan.case_id)
        if continue_ and paths["ctd"].is_file() and scan.error is None:
            report.skipped += 1
            rows.setdefault(scan.case_id, {"case": scan.case_id, "status": "done", "input": str(scan.paths[0])})
            continue
        t0 = time.perf_counter()
        try:
            if scan.error:
                raise ScanError(scan.error)
            image, geom, original = read_scan(scan.paths)
            result = predictor.predict_array(image, geom)
            write_case_outputs(out, scan.case_id, result, image, geom, original, scan.paths, run_info, qc)
        except (ScanError, OSError, ValueError, RuntimeError, MemoryError) as exc:
            msg = str(exc).replace("\n", " ")
            print(f"ERROR {msg}", file=sys.stderr)
            report.failed.append((scan.case_id, msg))
            rows[scan.case_id] = {"case": scan.case_id, "status": "failed", "n_vertebrae": 0, "labels": "",
                                  "seconds": f"{time.perf_counter() - t0:.2f}", "error": msg,
                                  "input": str(scan.paths[0])}
        else:
            report.done += 1
            rows[scan.case_id] = {"case": scan.case_id, "status": "done", "n_vertebrae": len(result.landmarks),
                                  "labels": " ".join(lm.name for lm in result.landmarks),
                                  "seconds": f"{time.perf_counter() - t0:.2f}", "error": "",
                                  "input": str(scan.paths[0])}
        _write_summary(summary_path, rows)
    bar.close()
    _write_summary(summary_path, rows)
    return report


def load_prediction(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """``{label: position_mm}`` from a ``CASE_ctd.json`` written by :func:`predict_directory`."""
    from spinelm.io.landmarks import as_dict, read_landmarks

    return as_dict(read_landmarks(path))


__all__ = ["Predictor", "ScanError", "collect_inputs", "load_prediction", "predict_directory", "read_scan",
           "write_case_outputs"]
