"""Learning from unlabelled scans at one training budget: N labelled scans alone, N labelled + the
rest of the fold's training scans unlabelled, all labelled, and a separate pretraining run.

Every row validates on the same scans (fold ``--fold`` of SOURCE) with ``spinelm plan-and-train`` as
a user runs it; the figures are the fold's final validation (identification rate, d_mean,
level-shifted cases), which equal ``spinelm predict`` + ``spinelm evaluate`` on those scans.

Rows (``--rows``, default sup_n,semi,sup_all):
  sup_n     N labelled scans (``--labelled``), the unlabelled ones not used (``--no-unlabelled``)
  semi      the same N labelled + the rest of the fold's training scans unlabelled (self-training)
  sup_all   every training scan of the fold labelled (SOURCE itself)
  pretrain  ``spinelm pretrain`` on all images for ``--pretrain-budget`` minutes, then as ``semi``
            with ``--init``

    python scripts/semi_ablation.py SOURCE OUT --labelled 4 [--fold 0] [--rows sup_n,semi,sup_all,pretrain]
        [--choose random|diverse] [--held-out DIR [DIR ...]]
        [--time-budget 20] [--pretrain-budget 10] [--precision fp32] [--device cpu]

``--held-out``: datasets no row trained on (e.g. phantoms of other seeds); each row's model labels
their ``imagesTr/`` (``spinelm predict``) and ``spinelm evaluate --all-gt`` scores them: one more
column per set (identification, level-shifted cases). With a coarse stage refreshed on
pseudo-labels, the table also gives the coarse stage alone before and after its refresh, and the
pseudo-label column the coarse stage's own round first ("coarse accepted/labelled").

The withheld-label dataset is ``OUT/data`` (``scripts/withhold_labels.py``); models and logs under
``OUT/<row>/``; the table (Markdown) is printed and written to ``OUT/semi.md``, the figures (with
the pseudo-label acceptance counts) to ``OUT/semi.json``. A row whose model has a final
validation is not rerun.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from _runs import run  # scripts/_runs.py

ROWS = ("sup_n", "semi", "sup_all", "pretrain")


def main(argv=None) -> int:
    from spinelm.semisupervised import withhold_labels

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--labelled", type=int, required=True)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--choose", choices=("random", "diverse"), default="random",
                   help="how the labelled scans are picked (scripts/withhold_labels.py --choose)")
    p.add_argument("--rows", default="sup_n,semi,sup_all")
    p.add_argument("--time-budget", type=float, default=20.0)
    p.add_argument("--pretrain-budget", type=float, default=10.0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--held-out", nargs="*", default=[], help="datasets to label and score with every row's model")
    args = p.parse_args(argv)
    source, out = Path(args.source), Path(args.out)
    data = out / "data"
    if not (data / "withheld.json").is_file():
        withhold_labels(source, data, args.labelled, args.fold, seed=args.seed, choose=args.choose)
    spinelm = [sys.executable, "-m", "spinelm"]
    common = ["--device", args.device, "--time-budget", str(args.time_budget), "--precision", args.precision,
              "--no-progress"]
    table = {}
    for row in args.rows.split(","):
        if row not in ROWS:
            raise SystemExit(f"unknown row {row!r}; expected {', '.join(ROWS)}")
        base = out / row
        fold = args.fold if row == "sup_all" else 0
        summary = base / "model" / f"fold_{fold}" / "validation_summary.json"
        if not summary.is_file():
            base.mkdir(parents=True, exist_ok=True)
            log = base / "log.txt"
            extra = []
            if row == "pretrain":
                extra_min = run([*spinelm, "pretrain", str(data), "-o", str(base / "pretrained"), "--time-budget",
                                 str(args.pretrain_budget), "--plan-budget", str(args.time_budget), "--device",
                                 args.device, "--precision", args.precision, "--no-progress"], log) / 60
                (base / "pretrain_minutes.txt").write_text(f"{extra_min:.1f}\n")
                extra = ["--init", str(base / "pretrained")]
            if row in ("sup_n", "sup_all"):
                extra = ["--no-unlabelled"]
            src = source if row == "sup_all" else data
            minutes = run([*spinelm, "plan-and-train", str(src), "-o", str(base / "model"), "--fold", str(fold),
                           *common, *extra], log) / 60
            (base / "minutes.txt").write_text(f"{minutes:.1f}\n")
        res = json.loads(summary.read_text())
        fin = res["final"]
        rounds = (res.get("self_training") or {}).get("rounds", [])
        held = {}
        for h in map(Path, args.held_out):
            pred = base / f"pred_{h.name}"
            if not (pred / "evaluation.json").is_file():
                run([*spinelm, "predict", "-i", str(h / "imagesTr"), "-o", str(pred), "-m", str(base / "model"),
                     "--no-progress"], base / f"predict_{h.name}.txt")
                run([*spinelm, "evaluate", str(pred), str(h), "--all-gt"], base / f"evaluate_{h.name}.txt")
            o = json.loads((pred / "evaluation.json").read_text())["overall"]
            held[h.name] = [o["id_rate"], o["n_identified"], o["n_gt"], o["n_cases_level_shifted"], o["n_cases"],
                            o["d_mean_mm"]]
        coarse = base / "model" / f"fold_{fold}_coarse"
        alone = [json.loads(p.read_text())["final"]["id_rate"]
                 for p in (coarse / "validation_summary.json", coarse / "refresh" / "validation_summary.json")
                 if p.is_file()]
        own = coarse / "refresh" / "coarse_round.json"  # the coarse stage's own labelling round
        own = json.loads(own.read_text()) if own.is_file() else None
        table[row] = {"id_rate": fin["id_rate"], "d_mean_mm": fin["d_mean_mm"],
                      "coarse_round": [own["accepted"], own["examined"]] if own else None,
                      "shifted": fin.get("n_cases_level_shifted"), "n_cases": fin.get("n_cases"), "held_out": held,
                      "coarse_alone": alone,
                      "epochs": res["epochs_run"],
                      "accepted": [[r["accepted"], r["scans"]] for r in rounds if not r.get("skipped")],
                      "minutes": float((base / "minutes.txt").read_text()) if (base / "minutes.txt").is_file() else None,
                      "pretrain_minutes": float((base / "pretrain_minutes.txt").read_text())
                      if (base / "pretrain_minutes.txt").is_file() else None}

    def f(x, fmt="{:.3f}"):
        return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)

    names = [Path(h).name for h in args.held_out]
    lines = ["| row | identification | d_mean (mm) | level-shifted | " + "".join(f"{n} (shifted) | " for n in names)
             + "coarse stage alone (after refresh) | fine epochs | pseudo-labels (rounds) | wall (min) |",
             "|---" * (8 + len(names)) + "|"]
    for row, t in table.items():
        acc = ", ".join(([f"coarse {t['coarse_round'][0]}/{t['coarse_round'][1]}"] if t.get("coarse_round") else [])
                        + [f"{a}/{n}" for a, n in t["accepted"]]) or "-"
        wall = f(t["minutes"], "{:.1f}") + (f" + {t['pretrain_minutes']:.1f} pretraining" if t["pretrain_minutes"]
                                           else "")
        held = "".join(f"{f(v[0])} ({v[1]}/{v[2]}; {v[3]}/{v[4]}) | " if v else "- | "
                       for v in (t["held_out"].get(n) for n in names))
        alone = " -> ".join(f(a) for a in t["coarse_alone"]) or "-"
        lines.append(f"| {row} | {f(t['id_rate'])} | {f(t['d_mean_mm'], '{:.2f}')} | {t['shifted']}/{t['n_cases']} | "
                     f"{held}{alone} | {t['epochs']} | {acc} | {wall} |")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "semi.md").write_text(text + "\n")
    (out / "semi.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
