"""Time fingerprinting and planning of a dataset folder (wall seconds and peak RSS).

Usage: python scripts/time_planning.py DATASET [--device cpu|cuda] [--gpu-memory GB] [--workers N]
"""
from __future__ import annotations

import argparse
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-memory", type=float)
    ap.add_argument("--workers", type=int)
    args = ap.parse_args()

    from spinelm.fingerprint import compute_fingerprint
    from spinelm.planning import plan, summarize

    t0 = time.perf_counter()
    fp = compute_fingerprint(args.dataset, num_workers=args.workers, progress=False)
    t1 = time.perf_counter()
    plans = plan(fp, device=args.device, gpu_memory_gb=args.gpu_memory)
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print(summarize(plans))
    print(f"cases {len(fp['cases'])}: fingerprint {t1 - t0:.1f} s, plan {t2 - t1:.1f} s, "
          f"peak RSS {rss:.2f} GB (workers {children:.2f} GB)")


if __name__ == "__main__":
    main()
