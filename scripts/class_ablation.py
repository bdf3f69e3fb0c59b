"""Ablation of the classification head at one training budget: each row trains a model on a variant
of the training set with ``spinelm plan-and-train`` (as a user runs it), labels the held-out set
with ``spinelm predict`` and scores it with ``spinelm evaluate``.

Rows (``--rows``, default all):
  head       the training set as it is (classes of every vertebra)
  labels25   25 % of the class rows kept (drawn by ``--seed``), every mask and centroid kept
  no_head    no classesTr.csv: no classification head (identification without the head)
  loose      ``--loose-train DIR``: the same phantoms with loose annotations for some cases
             (``spinelm synth ... --loose 0.5``: half the cases with a partial mask or centroids only;
             with ``--loose-kinds boxes,scribbles``, half with boxes or scribbles only)
  recon      the training set as it is, plus the auxiliary reconstruction head (a copy of the cpu
             preset with ``reconstruction_weight`` ``--reconstruction-weight``)
  aux        both auxiliary heads: ``--structures-train DIR`` (the same phantoms whose masks also carry
             discs, canal and cord: ``spinelm synth ... --structures``) and the reconstruction head

    python scripts/class_ablation.py TRAIN HELD_OUT OUT [--rows head,labels25,no_head,loose,recon,aux]
        [--loose-train DIR] [--structures-train DIR] [--plans-from MODEL_DIR] [--time-budget 20]
        [--precision fp32] [--device cpu]

Variants are folders of symbolic links to TRAIN's files under ``OUT/<row>/data``; models, predictions and
``evaluation.json`` under ``OUT/<row>/``; the table (Markdown) is printed and written to
``OUT/ablation.md``, the figures to ``OUT/ablation.json``. A row whose ``evaluation.json`` exists is
not rerun.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from _runs import run  # scripts/_runs.py

ROWS = ("head", "labels25", "no_head", "loose", "recon", "aux")
#: The class head counts as learning from the first fine epoch whose mean class loss is below this
#: fraction of ln(number of classes), the loss of a uniform output.
ONSET_FRACTION = 0.8


def class_head_onset(model: Path, fold: int = 0) -> tuple[int | None, int]:
    """(first fine epoch whose class loss is below ONSET_FRACTION x ln(classes), or None; fine epochs),
    from the fold's training log (``checkpoint_latest.json``)."""
    meta = model / f"fold_{fold}" / "checkpoint_latest.json"
    if not meta.is_file():
        return None, 0
    log = json.loads(meta.read_text())["log"]
    losses = log.get("head_loss", {}).get("class") or []
    plans = json.loads((model / "plans.json").read_text())
    k = len((plans.get("classification") or {}).get("classes", [])) or 2
    below = [e for e, v in zip(log["epoch"], losses) if np.isfinite(v) and v < ONSET_FRACTION * np.log(k)]
    return (below[0] if below else None), len(log["epoch"])


def make_variant(train: Path, dst: Path, row: str, seed: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("imagesTr", "labelsTr", "centroidsTr"):
        if (train / sub).is_dir() and not (dst / sub).exists():
            os.symlink((train / sub).resolve(), dst / sub)
    if (train / "dataset.json").is_file():
        (dst / "dataset.json").write_text((train / "dataset.json").read_text())
    classes = train / "classesTr.csv"
    if row == "no_head" or not classes.is_file():
        (dst / "classesTr.csv").unlink(missing_ok=True)
        return dst
    with open(classes, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    if row == "labels25":
        keep = np.random.default_rng(seed).permutation(len(body))[: max(1, round(0.25 * len(body)))]
        body = [body[i] for i in sorted(keep)]
    with open(dst / "classesTr.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *body])
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train")
    p.add_argument("held_out")
    p.add_argument("out")
    p.add_argument("--rows", default="head,labels25,no_head")
    p.add_argument("--time-budget", type=float, default=20.0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loose-train", help="the training set with loose annotations (row 'loose')")
    p.add_argument("--plans-from", help="adopt this model folder's plan in every row (spinelm plan-and-train "
                                        "--plans-from): rows then differ in their data only, not in a re-timed patch")
    p.add_argument("--structures-train", help="the training set whose masks carry discs, canal, cord (row 'aux')")
    p.add_argument("--reconstruction-weight", type=float, default=0.5,
                   help="loss weight of the reconstruction head in rows 'recon' and 'aux' (default 0.5)")
    args = p.parse_args(argv)
    train, held, out = Path(args.train), Path(args.held_out), Path(args.out)
    spinelm = [sys.executable, "-m", "spinelm"]
    table = {}
    for row in args.rows.split(","):
        if row not in ROWS:
            raise SystemExit(f"unknown row {row!r}; expected {', '.join(ROWS)}")
        base = out / row
        ev = base / "pred" / "evaluation.json"
        if not ev.is_file():
            if row == "loose" and not args.loose_train:
                raise SystemExit("row 'loose' needs --loose-train DIR (spinelm synth ... --loose 0.5)")
            if row == "aux" and not args.structures_train:
                raise SystemExit("row 'aux' needs --structures-train DIR (spinelm synth ... --structures)")
            base.mkdir(parents=True, exist_ok=True)
            source = Path(args.structures_train) if row == "aux" else train
            data = Path(args.loose_train) if row == "loose" else make_variant(source, base / "data", row, args.seed)
            log = base / "log.txt"
            extra = ["--plans-from", args.plans_from] if args.plans_from else []
            if row in ("recon", "aux"):
                from spinelm.planning import load_preset

                preset = {**load_preset("cpu").__dict__, "name": "cpu-reconstruction",
                          "reconstruction_weight": args.reconstruction_weight}
                (base / "preset.json").write_text(json.dumps(preset, indent=1))
                extra += ["--preset", str(base / "preset.json")]
            minutes = run([*spinelm, "plan-and-train", str(data), "-o", str(base / "model"), "--device", args.device,
                           "--time-budget", str(args.time_budget), "--precision", args.precision, "--no-progress",
                           *extra], log) / 60
            run([*spinelm, "predict", "-i", str(held / "imagesTr"), "-o", str(base / "pred"), "-m",
                 str(base / "model"), "--device", args.device, "--no-progress"], log)
            run([*spinelm, "evaluate", str(base / "pred"), str(held), "--all-gt"], log)
            (base / "minutes.txt").write_text(f"{minutes:.1f}\n")
        o = json.loads(ev.read_text())["overall"]
        c = (o.get("classification") or {}) if row != "no_head" else {}  # nothing to grade without classes
        onset, epochs = class_head_onset(base / "model")
        table[row] = {"class_onset_epoch": onset, "fine_epochs": epochs,
                      "id_rate": o["id_rate"], "d_mean_mm": o["d_mean_mm"], "shifted": o["n_cases_level_shifted"],
                      "n_cases": o["n_cases"], "balanced_accuracy": c.get("balanced_accuracy"),
                      "auc": c.get("auc"), "auc_abnormal": c.get("auc_abnormal"), "n_classified": c.get("n"),
                      "per_class": {k: [v["sensitivity"], v["specificity"]] for k, v in c.get("per_class", {}).items()},
                      "train_minutes": float((base / "minutes.txt").read_text()) if (base / "minutes.txt").is_file()
                      else None}

    def f(x, fmt="{:.3f}"):
        return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)

    lines = ["| row | identification | d_mean (mm) | shifted | balanced accuracy | AUC (mean one-vs-rest) | "
             "AUC abnormal vs normal | sensitivity per class | class head learning from fine epoch | wall (min) |",
             "|---" * 10 + "|"]
    for row, t in table.items():
        sens = ", ".join(f"{k} {f(v[0], '{:.2f}')}" for k, v in t["per_class"].items())
        lines.append(f"| {row} | {f(t['id_rate'])} | {f(t['d_mean_mm'], '{:.2f}')} | {t['shifted']}/{t['n_cases']} | "
                     f"{f(t['balanced_accuracy'])} | {f(t['auc'])} | {f(t['auc_abnormal'])} | {sens or '-'} | "
                     f"{f(t['class_onset_epoch'], '{}')} of {t['fine_epochs']} | {f(t['train_minutes'], '{:.1f}')} |")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
