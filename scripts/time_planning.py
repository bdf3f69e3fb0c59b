"""Time fingerprinting and planning of a dataset folder (wall seconds and peak RSS), and how steady
the measured budget is.

Usage: python scripts/time_planning.py DATASET [--device cpu|cuda] [--gpu-memory GB] [--workers N]
           [--time-budget MIN --precision P] [--repeat K] [--step-noise N]

--repeat K       plan K more times from the same fingerprint, timing every step anew (no cache), and
                 print each plan's patches and measured steps: how far the timing moves the plan.
--step-noise N   time the planned fine step N times with the current setting (``spinelm.budget``'s
                 warm-ups and timed steps), interleaved with N times 1 warm-up + 3 timed steps (the
                 earlier setting), and print the spread (coefficient of variation) of each.
"""
from __future__ import annotations

import argparse
import resource
import time


def _patches(plans: dict) -> str:
    b = plans.get("budget", {})
    steps = {"fine": b.get("measured_step", {}), "coarse": b.get("measured_step_coarse", {})}
    return "; ".join(f"{name} {'x'.join(map(str, c['patch_size']))} ({steps[name].get('seconds_per_step', float('nan')):.3f} s)"
                     for name, c in plans["configurations"].items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-memory", type=float)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--time-budget", type=float)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeat", type=int, default=0)
    ap.add_argument("--step-noise", type=int, default=0)
    args = ap.parse_args()

    import numpy as np

    import spinelm.budget as budget
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.planning import summarize

    t0 = time.perf_counter()
    fp = compute_fingerprint(args.dataset, num_workers=args.workers, progress=False)
    t1 = time.perf_counter()
    plans = budget.plan_within_budget(fp, None, args.device, args.gpu_memory, args.time_budget, args.precision)
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print(summarize(plans))
    print(f"cases {len(fp['cases'])}: fingerprint {t1 - t0:.1f} s, plan {t2 - t1:.1f} s, "
          f"peak RSS {rss:.2f} GB (workers {children:.2f} GB)")

    def fresh(p, device, precision, configuration="fine"):
        return budget.measure_step(p, device, precision, use_cache=False, configuration=configuration)

    for k in range(args.repeat):
        t = time.perf_counter()
        again = budget.plan_within_budget(fp, None, args.device, args.gpu_memory, args.time_budget, args.precision,
                                          measure=fresh)
        print(f"plan {k + 1}: {_patches(again)}, {again['budget'].get('affordable_steps')} affordable fine steps "
              f"({time.perf_counter() - t:.0f} s)")
    if args.step_noise:
        settings = {"current": (budget.WARMUP_STEPS, budget.TIMED_STEPS), "1 warm-up + 3": (1, 3)}
        seconds = {name: [] for name in settings}
        for _ in range(args.step_noise):
            for name, (warm, timed) in settings.items():
                budget.WARMUP_STEPS, budget.TIMED_STEPS = warm, timed
                seconds[name].append(fresh(plans, args.device, args.precision)["seconds_per_step"])
        budget.WARMUP_STEPS, budget.TIMED_STEPS = settings["current"]
        for name, (warm, timed) in settings.items():
            s = np.asarray(seconds[name])
            print(f"fine step, {warm} warm-up(s) + median of {timed}: median {np.median(s):.3f} s, range "
                  f"{s.min():.3f}-{s.max():.3f} s, coefficient of variation {s.std() / s.mean():.3f} ({len(s)} runs)")


if __name__ == "__main__":
    main()
