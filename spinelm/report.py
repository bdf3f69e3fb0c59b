"""``spinelm report OUT_DIR``: one HTML page to review a prediction batch.

``OUT_DIR/report.html`` opens from the file (no server, no internet): the cases sorted by risk
(QC ``review`` first, then by their least confident vertebra), each with its QC picture (the
``CASE_qc.png`` beside it, loaded lazily), flags and per-vertebra confidence; the batch statistics
(cases, failures, flagged share, vertebrae per case, counts per label); a reliability diagram of
the per-vertebra confidence and, with ground truth (``--gt``), a risk-coverage curve
(``report_reliability.png``, ``report_risk_coverage.png``).
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinelm import labels as L


@dataclass
class CaseEntry:
    case: str
    status: str
    qc: str
    reasons: list[str]
    vertebrae: list[dict] = field(default_factory=list)  # name, confidence
    error: str = ""
    correct: bool | None = None  # every gt vertebra identified and no wrong label (with --gt)
    beyond: list[int] = field(default_factory=list)  # labels outside the annotated range (with --gt)

    @property
    def min_confidence(self) -> float | None:
        conf = [v["confidence"] for v in self.vertebrae if v.get("confidence") is not None]
        return min(conf) if conf else None

    @property
    def risk(self) -> float:
        """Higher first: failed, then review, then least confident vertebra."""
        if self.status != "done":
            return 3.0
        base = 1.0 if self.qc == "review" else 0.0
        mc = self.min_confidence
        return base + (1.0 - mc if mc is not None else 0.5)


def read_batch(out_dir: str | os.PathLike) -> list[CaseEntry]:
    from spinelm.io.outputs import output_paths, read_summary

    out = Path(out_dir)
    rows = read_summary(out / "summary.csv")
    if not rows:
        raise FileNotFoundError(f"{out}: no summary.csv with cases (run spinelm predict first; for a batch split "
                                "into parts run spinelm merge)")
    entries = []
    for case, row in rows.items():
        reasons = [r for r in (row.get("qc_reasons") or "").split("; ") if r]
        e = CaseEntry(case, row.get("status", ""), row.get("qc") or ("review" if reasons else "ok"), reasons,
                      error=row.get("error", ""))
        ctd = output_paths(out, case)["ctd"]
        if e.status == "done" and ctd.is_file():
            try:
                doc = json.loads(ctd.read_text())
            except (OSError, ValueError) as exc:
                e.reasons.append(f"{ctd.name} unreadable: {exc}")
                e.qc = "review"
                doc = {}
            e.vertebrae = [{"name": v.get("name", L.name_of(int(v["label"]))), "label": int(v["label"]),
                            "confidence": v.get("confidence"), "position_mm": v["position_mm"],
                            "class": v.get("class")}
                           for v in doc.get("vertebrae", [])]
        entries.append(e)
    return sorted(entries, key=lambda e: (-e.risk, e.case))


def risk_coverage(risks, errors) -> tuple[np.ndarray, np.ndarray, float]:
    """Coverage (share of cases accepted, lowest risk first) against the error rate among the accepted
    cases, and the area under that curve (AURC; lower is better)."""
    risks, errors = np.asarray(risks, float), np.asarray(errors, float)
    order = np.argsort(risks, kind="stable")
    err = np.cumsum(errors[order]) / np.arange(1, len(order) + 1)
    cov = np.arange(1, len(order) + 1) / len(order)
    return cov, err, float(np.mean(err)) if len(err) else float("nan")


def _attach_ground_truth(entries: list[CaseEntry], gt_dir) -> tuple[list[float], list[bool]]:
    """Mark each case right/wrong (and each vertebra: ``identified``) and return per-vertebra
    (confidence, identified) pairs."""
    from spinelm.evaluation import _ground_truth, case_is_right, identification

    gts = _ground_truth(Path(gt_dir))
    conf, ident = [], []
    for e in entries:
        if e.case not in gts:
            continue
        gt = gts[e.case]["landmarks"]
        pred = {v["label"]: np.asarray(v["position_mm"], float) for v in e.vertebrae}
        r = identification(pred, gt)
        e.correct = e.status == "done" and case_is_right(r)
        e.beyond = [int(x) for x in r["beyond_annotation"]]
        for v in e.vertebrae:
            # a label outside the annotated range is neither right nor wrong: left out of the figures
            v["identified"] = None if v["label"] in r["beyond_annotation"] else v["label"] in r["identified"]
            if v.get("confidence") is not None and v["identified"] is not None:
                conf.append(float(v["confidence"]))
                ident.append(v["identified"])
    return conf, ident


def _plots(out: Path, entries, conf, ident) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spinelm.confidence import expected_calibration_error, reliability_bins
    from spinelm.io.files import atomic_path

    figures = {}
    if conf:
        bins = reliability_bins(conf, ident)
        fig, ax = plt.subplots(figsize=(4, 4))
        xs = [b["confidence"] for b in bins if b["n"]]
        ys = [b["accuracy"] for b in bins if b["n"]]
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.plot(xs, ys, "o-")
        ax.set_xlabel("confidence")
        ax.set_ylabel("share identified")
        ece = expected_calibration_error(conf, ident)
        ax.set_title(f"reliability: {len(conf)} vertebrae, ECE {ece:.3f}", fontsize=9)
        with atomic_path(out / "report_reliability.png") as tmp:
            fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
        plt.close(fig)
        figures["reliability"] = ("report_reliability.png", ece)
    judged = [e for e in entries if e.correct is not None]
    if judged:
        cov, err, aurc = risk_coverage([e.risk for e in judged], [not e.correct for e in judged])
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(cov, err, "-")
        ax.set_xlabel("coverage (cases accepted, lowest risk first)")
        ax.set_ylabel("share of accepted cases with an error")
        ax.set_title(f"risk-coverage: {len(judged)} cases, AURC {aurc:.3f}", fontsize=9)
        with atomic_path(out / "report_risk_coverage.png") as tmp:
            fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
        plt.close(fig)
        figures["risk_coverage"] = ("report_risk_coverage.png", aurc)
    return figures


_STYLE = """body{font-family:sans-serif;margin:1em;color:#222}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:4px;vertical-align:top;text-align:left;font-size:13px}
img.thumb{width:260px}.review{background:#fff3e0}.failed{background:#fde0e0}.low{color:#c00;font-weight:bold}
.stats td{border:none;padding:2px 8px}"""


def write_report(out_dir: str | os.PathLike, gt_dir: str | os.PathLike | None = None) -> Path:
    """Write ``OUT_DIR/report.html`` (and its PNG figures); returns its path."""
    from spinelm.confidence import REVIEW_BELOW
    from spinelm.io.files import write_text_atomic
    from spinelm.io.outputs import output_paths

    out = Path(out_dir)
    entries = read_batch(out)
    conf, ident = _attach_ground_truth(entries, gt_dir) if gt_dir else ([], [])
    if not conf:  # without ground truth: the reliability diagram needs outcomes, so only confidences are shown
        conf, ident = [], []
    figures = _plots(out, entries, conf, ident)
    done = [e for e in entries if e.status == "done"]
    flagged = [e for e in done if e.qc == "review"]
    counts: dict[str, int] = {}
    class_counts: dict[str, int] = {}
    for e in done:
        for v in e.vertebrae:
            counts[v["name"]] = counts.get(v["name"], 0) + 1
            if v.get("class"):
                class_counts[v["class"]] = class_counts.get(v["class"], 0) + 1
    per_case = [len(e.vertebrae) for e in done]
    esc = html.escape
    stats = [("cases", len(entries)), ("labelled", len(done)), ("failed", len(entries) - len(done)),
             ("flagged for review", f"{len(flagged)} ({100 * len(flagged) / max(len(done), 1):.0f}% of labelled)"),
             ("vertebrae per case", f"median {np.median(per_case):.0f}, {min(per_case)}-{max(per_case)}"
              if per_case else "-")]
    if any(e.correct is not None for e in entries):
        wrong = [e for e in entries if e.correct is False]
        caught = [e for e in wrong if e.qc == "review" or e.status != "done"]
        stats.append(("cases with an error (ground truth)", f"{len(wrong)}; flagged {len(caught)} of them"))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>spinelm report: {esc(out.name)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>spinelm report: {esc(str(out.resolve()))}</h1>",
             "<table class='stats'>" + "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in stats)
             + "</table>",
             "<p>vertebrae per label: " + ", ".join(f"{esc(k)} {counts[k]}" for k in
                                                    sorted(counts, key=lambda n: L.cranio_caudal_rank(L.label_of(n))))
             + "</p>"]
    if class_counts:
        parts.append("<p>vertebrae per class: " + ", ".join(f"{esc(k)} {v}" for k, v in sorted(class_counts.items()))
                     + "</p>")
    for key, (name, value) in figures.items():
        parts.append(f"<figure style='display:inline-block'><img src='{esc(name)}' alt='{esc(key)}'>"
                     f"<figcaption>{esc(key.replace('_', '-'))}: {value:.3f}</figcaption></figure>")
    parts.append("<h2>cases, highest risk first</h2><table><tr><th>QC picture</th><th>case</th><th>QC</th>"
                 "<th>vertebrae (confidence)</th></tr>")
    for e in entries:
        qc_png = output_paths(out, e.case)["qc"]
        img = (f"<img class='thumb' loading='lazy' src='{esc(qc_png.name)}' alt='QC {esc(e.case)}'>"
               if qc_png.is_file() else "")
        cls = "failed" if e.status != "done" else ("review" if e.qc == "review" else "")
        verts = ", ".join(
            (f"<span class='low'>{esc(v['name'])} {v['confidence']:.2f}</span>" if v.get("confidence") is not None
             and v["confidence"] < REVIEW_BELOW else f"{esc(v['name'])}"
             + (f" {v['confidence']:.2f}" if v.get("confidence") is not None else ""))
            + (f" <i>{esc(v['class'])}</i>" if v.get("class") else "") for v in e.vertebrae)
        status = e.qc if e.status == "done" else f"failed: {e.error}"
        truth = "" if e.correct is None else ("<br>ground truth: right" if e.correct else "<br>ground truth: WRONG")
        if e.beyond:
            truth += f"<br>outside the annotated levels (not judged): {esc(', '.join(L.name_of(x) for x in e.beyond))}"
        parts.append(f"<tr class='{cls}'><td>{img}</td><td>{esc(e.case)}</td><td>{esc(status)}<br>"
                     f"{'<br>'.join(esc(r) for r in e.reasons)}{truth}</td><td>{verts}</td></tr>")
    parts.append("</table></body></html>")
    return write_text_atomic(out / "report.html", "\n".join(parts))
