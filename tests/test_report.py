"""``spinelm report``: the batch review page, its figures, and (when a browser is installed) how it renders."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from spinelm.cli import main
from spinelm.io.landmarks import Landmark, write_spinelm_json
from spinelm.io.outputs import write_summary
from spinelm.report import read_batch, risk_coverage, write_report


def _png(path, rgb):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, np.tile(np.asarray(rgb, float), (60, 80, 1)))


def _batch(tmp_path):
    """Three labelled cases (one flagged, one wrong against the ground truth) and one failure."""
    out, gt = tmp_path / "out", tmp_path / "gt"
    (gt / "centroidsTr").mkdir(parents=True)
    out.mkdir()
    pos = {20: (0, 0, 0), 21: (0, 0, -35), 22: (0, 0, -70)}
    rows = {}
    for case, labels, conf, qc in [("a_good", [20, 21, 22], [0.95, 0.9, 0.93], ""),
                                   ("b_shifted", [21, 22, 23], [0.4, 0.45, 0.5], "low confidence: L2 0.40"),
                                   ("c_good", [20, 21, 22], [0.8, 0.97, 0.9], "")]:
        lms = [Landmark(lab, pos[p], 0.9, c) for lab, p, c in zip(labels, sorted(pos), conf)]
        write_spinelm_json(out / f"{case}_ctd.json", lms)
        write_spinelm_json(gt / "centroidsTr" / f"{case}.json", [Landmark(k, v) for k, v in pos.items()])
        _png(out / f"{case}_qc.png", (1.0, 0.0, 1.0))  # magenta: easy to find in a screenshot
        rows[case] = {"case": case, "status": "done", "n_vertebrae": 3, "qc": "review" if qc else "ok",
                      "qc_reasons": qc}
    rows["d_broken"] = {"case": "d_broken", "status": "failed", "error": "x.nii.gz: truncated file"}
    write_spinelm_json(gt / "centroidsTr" / "d_broken.json", [Landmark(k, v) for k, v in pos.items()])
    write_summary(out / "summary.csv", rows)
    return out, gt / "centroidsTr"


def test_report_lists_every_case_riskiest_first_with_figures(tmp_path, capsys):
    out, gt = _batch(tmp_path)
    assert [e.case for e in read_batch(out)] == ["d_broken", "b_shifted", "c_good", "a_good"]
    assert main(["report", str(out), "--gt", str(gt)]) == 0
    page = (out / "report.html").read_text()
    for case in ("a_good", "b_shifted", "c_good", "d_broken"):
        assert case in page
    assert page.index("d_broken") < page.index("b_shifted") < page.index("a_good")
    assert "b_shifted_qc.png" in page and "truncated file" in page and "ground truth: WRONG" in page
    assert (out / "report_reliability.png").is_file() and (out / "report_risk_coverage.png").is_file()
    assert "flagged 2 of them" in page  # the shifted case (review) and the failed one


def test_report_without_a_batch_says_what_to_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "spinelm predict" in capsys.readouterr().err


def test_risk_coverage_rewards_ranking_errors_last():
    cov, err, good = risk_coverage([0.1, 0.2, 0.9], [0, 0, 1])
    _, _, bad = risk_coverage([0.9, 0.2, 0.1], [0, 0, 1])
    assert cov[-1] == 1.0 and err[-1] == pytest.approx(1 / 3) and good < bad


def _browser():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_its_thumbnails_in_a_headless_browser(tmp_path):
    import matplotlib.image as mpimg

    out, gt = _batch(tmp_path)
    write_report(out, gt)
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1400", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = mpimg.imread(shot)[..., :3]
    magenta = (img[..., 0] > 0.9) & (img[..., 1] < 0.1) & (img[..., 2] > 0.9)
    assert magenta.sum() > 3 * 200 * 100  # three QC thumbnails (260 px wide) drawn, not broken-image icons
