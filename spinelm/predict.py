"""``spinelm predict``: label every scan of a directory with a trained model folder.

Per scan: read and check the file(s) (:func:`spinelm.io.scan.read_scan`: a bad file gets one line
on stderr and a ``failed`` row, the batch goes on), label it with the one predictor
(:class:`spinelm.inference.Predictor`: preprocessing with the model's own plan, the sliding window
of every fold averaged, decoding and anatomical ordering) and write the outputs
(:mod:`spinelm.io.outputs`) plus ``predict.json``, the model, folds and arguments of the run.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spinelm.inference import CaseResult, Predictor
from spinelm.io.files import write_json_atomic
from spinelm.io.image import IMAGE_ENDINGS
from spinelm.io.outputs import class_counts, output_paths, read_summary, write_case_outputs, write_summary
from spinelm.io.scan import ScanError, ScanInput, collect_inputs, read_scan

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    summary_csv: Path | None = None
    stage_seconds: dict = field(default_factory=dict)  # summed over the scans labelled in this run
    peak_memory_gb: float | None = None  # this process's peak resident memory

    def timing_line(self) -> str:
        """One line: seconds per labelled scan and the share of each stage, e.g. for the end of a run."""
        total = sum(self.stage_seconds.values())
        if not self.done or total <= 0:
            return ""
        shares = ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in self.stage_seconds.items() if v / total >= 0.005)
        mem = f"; peak memory {self.peak_memory_gb:.1f} GB" if self.peak_memory_gb else ""
        return f"{total / self.done:.1f} s per scan ({shares}){mem}"

    @property
    def ok(self) -> bool:
        return not self.failed


def predict_directory(input_path: str | os.PathLike, out_dir: str | os.PathLike, predictor: Predictor,
                      recursive: bool = False, pattern: str | None = None, continue_: bool = False,
                      num_parts: int = 1, part_id: int = 0, qc: bool = True, progress: bool = True,
                      arguments: dict | None = None, masks: str | os.PathLike | None = None) -> BatchReport:
    """Label every scan under ``input_path``; see the module docstring for the outputs.

    ``masks``: a folder of instance masks (``CASE.nii.gz``, VerSe labels, on each scan's grid) to grade
    instead of predicted vertebrae (needs a model with a classification head); a scan without one fails.
    """
    from tqdm import tqdm

    if not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id {part_id} must be in 0..{num_parts - 1} (--num-parts {num_parts})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scans = collect_inputs(input_path, predictor.plans.n_channels, recursive, pattern)
    scans = scans[part_id::num_parts]
    summary_path = out / ("summary.csv" if num_parts == 1 else f"summary_part{part_id}of{num_parts}.csv")
    rows = read_summary(summary_path) if continue_ else {}
    run_info = {"model": predictor.describe(), "arguments": arguments or {}}
    info_path = out / ("predict.json" if num_parts == 1 else f"predict_part{part_id}of{num_parts}.json")
    info = {**run_info, "input": str(Path(input_path).resolve()), "n_scans": len(scans),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(info_path, info)
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
            read_s = time.perf_counter() - t0
            if masks is not None:
                result = predictor.grade_masks(image, geom, _read_user_mask(masks, scan.case_id, geom),
                                               str(scan.paths[0]))
            else:
                result = predictor.predict_array(image, geom, str(scan.paths[0]))
            t1 = time.perf_counter()
            write_case_outputs(out, scan.case_id, result, image, geom, original, scan.paths, run_info, qc)
            stages = {"read": read_s, **result.stages, "write": time.perf_counter() - t1}
        except (ScanError, OSError, ValueError, RuntimeError, MemoryError) as exc:
            msg = str(exc).replace("\n", " ")
            print(f"ERROR {msg}", file=sys.stderr)
            report.failed.append((scan.case_id, msg))
            rows[scan.case_id] = {"case": scan.case_id, "status": "failed", "n_vertebrae": 0, "labels": "",
                                  "seconds": f"{time.perf_counter() - t0:.2f}", "error": msg,
                                  "input": str(scan.paths[0])}
        else:
            report.done += 1
            for k, v in stages.items():
                report.stage_seconds[k] = report.stage_seconds.get(k, 0.0) + v
            rows[scan.case_id] = {"case": scan.case_id, "status": "done", "n_vertebrae": len(result.landmarks),
                                  "labels": " ".join(lm.name for lm in result.landmarks),
                                  "classes": class_counts(result.landmarks),
                                  "qc": "review" if result.qc_reasons else "ok",
                                  "qc_reasons": "; ".join(result.qc_reasons),
                                  "seconds": f"{time.perf_counter() - t0:.2f}", "error": "",
                                  "input": str(scan.paths[0]),
                                  **{f"seconds_{k}": f"{v:.2f}" for k, v in stages.items()}}
        write_summary(summary_path, rows)
    bar.close()
    write_summary(summary_path, rows)
    report.peak_memory_gb = _peak_memory_gb()
    write_json_atomic(info_path, {**info, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "labelled": report.done,
                                  "skipped": report.skipped, "failed": len(report.failed),
                                  "stage_seconds": {k: round(v, 2) for k, v in report.stage_seconds.items()},
                                  "peak_memory_gb": report.peak_memory_gb})
    return report


def _peak_memory_gb() -> float | None:
    """Peak resident memory of this process in GB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20, 2)


def _read_user_mask(folder: str | os.PathLike, case: str, geometry):
    """A user's instance mask for ``case`` (any supported image ending), canonical (z, y, x) int16, checked
    to lie on the scan's grid (``geometry``: the scan's canonical geometry)."""
    import numpy as np

    from spinelm.io.image import load_volume

    folder = Path(folder)
    found = [folder / f"{case}{e}" for e in IMAGE_ENDINGS if (folder / f"{case}{e}").is_file()]
    if not found:
        raise ScanError(f"{folder}: no mask {case}.nii.gz (or another image ending) for scan {case!r} (--masks)")
    mask, mgeom = load_volume(found[0], canonical=True, dtype=None)
    if not mgeom.same_as(geometry):
        raise ScanError(f"{found[0]}: the mask is not on the scan's grid ({'; '.join(mgeom.differences(geometry))}); "
                        "--masks needs masks with the scan's size, spacing, origin and direction")
    return np.rint(mask).astype(np.int16) if mask.dtype.kind == "f" else mask.astype(np.int16)


def slurm_array_part(environ=None) -> tuple[int, int] | None:
    """``(num_parts, part_id)`` of a SLURM job array task (``SLURM_ARRAY_TASK_COUNT``,
    ``SLURM_ARRAY_TASK_ID`` counted from ``SLURM_ARRAY_TASK_MIN``), or None outside an array."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    try:
        task, low = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(env.get("SLURM_ARRAY_TASK_COUNT") or int(env["SLURM_ARRAY_TASK_MAX"]) - low + 1)
    except (KeyError, ValueError):
        raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT (or _MIN/_MAX) is missing or not a "
                         "number; pass --num-parts and --part-id explicitly") from None
    if not 0 <= task - low < count:
        raise ValueError(f"SLURM array task {task} lies outside {low}..{low + count - 1}; use a contiguous array "
                         "(e.g. --array=0-9) or pass --num-parts and --part-id")
    return count, task - low


@dataclass
class MergeReport:
    """What :func:`merge_parts` found: rows per status, parts that never started, cases not in any part."""

    summary_csv: Path
    parts_expected: int
    parts_found: list[int]
    rows: dict[str, dict]
    missing_parts: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_attempted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_parts or self.failed or self.not_attempted)


def merge_parts(out_dir: str | os.PathLike) -> MergeReport:
    """Merge the ``summary_partKofN.csv`` files of a batch split into N parts into one ``summary.csv``.

    Reports the parts that never wrote a summary, the failed cases, and (from each part's
    ``predict_partKofN.json``, which lists how many scans the part was given) parts that stopped
    before their last scan. Rerun the same predict command with ``--continue`` for those parts: it
    skips the finished cases and retries the rest.
    """
    import json
    import re

    out = Path(out_dir)
    found: dict[int, int] = {}
    for p in out.glob("summary_part*of*.csv"):
        m = re.fullmatch(r"summary_part(\d+)of(\d+)\.csv", p.name)
        if m:
            found[int(m.group(1))] = int(m.group(2))
    if not found:
        raise FileNotFoundError(f"{out}: no summary_partKofN.csv files; was the batch run with --num-parts "
                                "(or as a SLURM array)?")
    totals = set(found.values())
    if len(totals) > 1:
        raise ValueError(f"{out}: summaries of batches split differently ({', '.join(map(str, sorted(totals)))} "
                         "parts); merge one split at a time")
    n = totals.pop()
    rows: dict[str, dict] = {}
    short: list[str] = []
    for k in sorted(found):
        part_rows = read_summary(out / f"summary_part{k}of{n}.csv")
        rows.update(part_rows)
        info = out / f"predict_part{k}of{n}.json"
        if info.is_file():
            expected = int(json.loads(info.read_text()).get("n_scans", len(part_rows)))
            if len(part_rows) < expected:
                short.append(f"part {k}: {expected - len(part_rows)} of {expected} scan(s) not attempted")
    summary = out / "summary.csv"
    write_summary(summary, rows)
    return MergeReport(summary, n, sorted(found), rows, [k for k in range(n) if k not in found],
                       sorted(c for c, r in rows.items() if r.get("status") != "done"), short)


def load_prediction(path: str | os.PathLike) -> dict:
    """``{label: position_mm}`` from a ``CASE_ctd.json`` written by :func:`predict_directory`."""
    from spinelm.io.landmarks import as_dict, read_landmarks

    return as_dict(read_landmarks(path))


__all__ = ["BatchReport", "CaseResult", "MergeReport", "merge_parts", "slurm_array_part", "Predictor", "ScanError", "ScanInput", "collect_inputs", "load_prediction",
           "predict_directory", "read_scan", "write_case_outputs"]
