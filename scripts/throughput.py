"""Throughput of a finished ``spinelm predict`` batch and what a large batch would take.

Reads OUT/summary.csv (or a merged one) and OUT/predict.json (or the parts' predict_partKofN.json)
and prints, over the labelled scans: seconds per scan (mean, median, range), the stage breakdown
(read, preprocess, network, order, mask, classes, check, write: mean seconds and share), scans per
hour and per core-hour at the given cores per process, the peak memory, and the projected wall
time for ``--scans`` scans on ``--workers`` such processes (e.g. a SLURM array). The projection
assumes every worker is as fast as this run's machine and the scans as large as this batch's.

    python scripts/throughput.py OUT [--cores 2] [--scans 30000] [--workers 100]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinelm.io.outputs import STAGES, read_summary  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="a spinelm predict output folder with summary.csv")
    ap.add_argument("--cores", type=int, default=2, help="CPU cores each predict process had (default 2)")
    ap.add_argument("--scans", type=int, default=30000, help="scans to project for (default 30000)")
    ap.add_argument("--workers", type=int, default=100, help="processes running at once (default 100)")
    args = ap.parse_args(argv)

    summary = args.out / "summary.csv"
    if not summary.is_file():
        raise SystemExit(f"{summary}: not found (run spinelm predict, or spinelm merge for a split batch)")
    rows = [r for r in read_summary(summary).values() if r.get("status") == "done" and r.get("seconds_network")]
    if not rows:
        raise SystemExit(f"{summary}: no labelled scan with stage timings (predicted by an older spinelm?)")
    secs = [float(r["seconds"]) for r in rows]
    stages = {k: statistics.mean(float(r.get(f"seconds_{k}") or 0) for r in rows) for k in STAGES}
    total = sum(stages.values())
    infos = [args.out / "predict.json"] + sorted(args.out.glob("predict_part*of*.json"))
    peaks = [json.loads(p.read_text()).get("peak_memory_gb") for p in infos if p.is_file()]
    peaks = [p for p in peaks if p]

    mean = statistics.mean(secs)
    print(f"{len(rows)} labelled scans: {mean:.1f} s per scan (median {statistics.median(secs):.1f}, "
          f"{min(secs):.1f}-{max(secs):.1f}) with {args.cores} core(s) per process")
    for k, v in stages.items():
        print(f"  {k:<11}{v:8.1f} s  {100 * v / total:5.1f} %")
    per_hour = 3600 / mean
    print(f"{per_hour:.1f} scans per hour per process, {per_hour / args.cores:.1f} per core-hour")
    if peaks:
        print(f"peak memory {max(peaks):.2f} GB per process")
    core_hours = args.scans * mean * args.cores / 3600
    wall = args.scans * mean / args.workers / 3600
    print(f"{args.scans} such scans: {core_hours:,.0f} core-hours; {wall:.1f} h on {args.workers} processes of "
          f"{args.cores} core(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
