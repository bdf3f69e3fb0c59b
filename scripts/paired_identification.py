"""Is one model's held-out identification really better than another's? A paired bootstrap over cases.

Each row is a model's predictions on the same held-out sets, scored by ``spinelm evaluate`` (each
folder has ``evaluation.json``). The first row is the baseline. Per row: identification pooled over
every set's vertebrae, level-shifted cases, and the difference from the baseline with a 95 % interval
from resampling the cases (both rows scored on the same resampled cases). An interval that includes 0
means these held-out cases cannot tell the two apart; it does not include the spread between two
trainings of the same recipe.

    python scripts/paired_identification.py sup24=P_sup24_WSH,P_sup24_WSX semi=P_semi_WSH,P_semi_WSX \\
        [--draws 10000] [--seed 0]

The folders of one row are given in the same order as the baseline's (one per held-out set).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def per_case(folders: list[str]) -> dict[str, tuple[int, int, bool]]:
    """``set index/case`` -> (vertebrae identified, ground-truth vertebrae, level-shifted)."""
    out = {}
    for k, folder in enumerate(folders):
        path = Path(folder) / "evaluation.json"
        if not path.is_file():
            raise SystemExit(f"{folder}: no evaluation.json (run 'spinelm evaluate {folder} GROUND_TRUTH' first)")
        for c in json.loads(path.read_text())["cases"]:
            out[f"{k}/{c['case']}"] = (len(c.get("identified") or []), int(c["n_gt"]), bool(c.get("level_shift")))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="+", help="NAME=PRED_DIR[,PRED_DIR...]; the first is the baseline")
    p.add_argument("--draws", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = []
    for spec in args.rows:
        name, _, folders = spec.partition("=")
        if not folders:
            raise SystemExit(f"{spec!r}: give NAME=PRED_DIR[,PRED_DIR...]")
        rows.append((name, per_case(folders.split(","))))
    keys = sorted(rows[0][1])
    for name, cases in rows[1:]:
        if sorted(cases) != keys:
            raise SystemExit(f"{name}: not the same held-out cases as {rows[0][0]}")
    draws = np.random.default_rng(args.seed).integers(0, len(keys), (args.draws, len(keys)))

    def arrays(cases):
        return (np.asarray([cases[k][0] for k in keys]), np.asarray([cases[k][1] for k in keys]),
                sum(cases[k][2] for k in keys))

    bi, bg, _ = arrays(rows[0][1])
    base = bi[draws].sum(1) / bg[draws].sum(1)
    print(f"{len(keys)} held-out cases, {int(bg.sum())} vertebrae; {args.draws} paired draws")
    print("| row | identification | level-shifted | minus " + rows[0][0] + " (95 % interval) |")
    print("|---|---|---|---|")
    for name, cases in rows:
        i, g, shifted = arrays(cases)
        d = i[draws].sum(1) / g[draws].sum(1) - base
        lo, hi = np.percentile(d, [2.5, 97.5])
        diff = "-" if name == rows[0][0] else f"{i.sum() / g.sum() - bi.sum() / bg.sum():+.3f} ({lo:+.3f} to {hi:+.3f})"
        print(f"| {name} | {i.sum() / g.sum():.3f} ({i.sum()}/{g.sum()}) | {shifted}/{len(keys)} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
