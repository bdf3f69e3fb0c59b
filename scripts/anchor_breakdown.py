"""Identification of an evaluated batch, split by what each case's annotated run shows at its ends:
the top of the column (C1 or C2), the sacrum (S1), or neither (a run that starts and ends inside the
column, which only finer cues can place).

    spinelm evaluate PRED GT --all-gt
    python scripts/anchor_breakdown.py PRED/evaluation.json

Prints one line per case and one per group (cases, identified vertebrae, level-shifted cases).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def anchor(names: list[str]) -> str:
    if "C1" in names or "C2" in names:
        return "top of the column (C1/C2)"
    if "S1" in names:
        return "sacrum (S1)"
    return "neither"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evaluation", help="evaluation.json written by spinelm evaluate")
    args = ap.parse_args(argv)

    from spinelm import labels as L

    path = Path(args.evaluation)
    try:
        report = json.loads(path.read_text())
        cases = report["cases"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"{path}: not an evaluation.json of spinelm evaluate ({exc})", file=sys.stderr)
        return 2
    groups: dict[str, list[int]] = {}
    for c in cases:
        if not c.get("n_gt"):
            continue
        names = [L.name_of(x) for x in c["gt_labels"]]
        g = groups.setdefault(anchor(names), [0, 0, 0, 0])
        shifted = bool(c.get("level_shift"))
        g[0] += 1
        g[1] += len(c["identified"])
        g[2] += c["n_gt"]
        g[3] += shifted
        print(f"{c['case']}: {names[0]}-{names[-1]} ({c['n_gt']}), identified {len(c['identified'])}"
              f"{', level-shifted' if shifted else ''}")
    for name, (n, ident, total, shifted) in groups.items():
        print(f"{name}: {n} case(s), identified {ident}/{total} = {ident / total:.2f}, {shifted} level-shifted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
