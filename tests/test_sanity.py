"""Case checks: header extent against the training scans, column orientation against the header."""
from __future__ import annotations

import numpy as np
import pytest

from spinelm import labels as L
from spinelm.sanity import header_reasons, orientation_reasons, spearman

LUMBAR = [L.label_of(n) for n in ("T12", "L1", "L2", "L3", "L4", "L5")]


def _column(axis: int = 2, reverse_evidence: bool = False, n: int = 6):
    """Candidates 35 mm apart along world ``axis`` (index 0 highest), each with a confident label."""
    pos = np.zeros((n, 3))
    pos[:, axis] = -35.0 * np.arange(n)  # head (+) to foot
    pos[:, 1] = np.random.default_rng(0).normal(0, 3, n)  # a little lordosis
    labels = LUMBAR[:n][::-1] if reverse_evidence else LUMBAR[:n]
    probs = [{lab: (0.8 if lab == own else 0.2 / (len(LUMBAR) - 1)) for lab in LUMBAR} for own in labels]
    return pos, probs, list(range(n))


def test_a_column_along_the_head_foot_axis_with_labels_rising_to_the_feet_passes():
    assert orientation_reasons(*_column()) == []


def test_label_evidence_rising_towards_the_head_says_flipped():
    reasons = orientation_reasons(*_column(reverse_evidence=True))
    assert len(reasons) == 1 and "flipped" in reasons[0]


def test_a_column_along_left_right_says_axes_swapped():
    reasons = orientation_reasons(*_column(axis=0))
    assert len(reasons) == 1 and "swapped" in reasons[0] and "left-right" in reasons[0]


def test_no_column_is_a_reason_to_review():
    pos, probs, _ = _column()
    assert "no column" in orientation_reasons(pos, probs, [0])[0]


def test_an_extent_far_outside_the_training_scans_is_flagged():
    train = {"min": [80.0, 180.0, 200.0], "max": [120.0, 260.0, 420.0]}
    assert header_reasons([100.0, 300.0, 220.0], train) == []  # any axis order
    assert "wrong unit" in header_reasons([10.0, 30.0, 22.0], train)[0]  # spacing in cm
    assert header_reasons([100.0, 300.0, 220.0], {}) == []  # an older plan without the range


def test_spearman_is_a_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


def _rows(stored: dict, **turned: dict):
    """Turned-over comparison rows: ``stored`` and each turned orientation's peak sum and upright probability."""
    names = {"flip": "head-foot axis flipped", "swap_L": "head-foot axis swapped with the left-right axis"}

    def row(key, name, ev):
        out = {"key": key, "name": name, "n": 5, "peak_sum": ev["peaks"]}
        if "up" in ev:
            out.update(upright=ev["up"], upright_sum=ev["peaks"] * ev["up"])
        return out
    return [row("stored", "as stored", stored)] + [row(k, names[k], v) for k, v in turned.items()]


def test_an_upside_down_scan_is_named_by_the_upright_head():
    from spinelm.sanity import turned_over_reasons

    assert turned_over_reasons(_rows({"peaks": 3.1, "up": 1.0}, flip={"peaks": 3.2, "up": 0.0})) == []
    reasons = turned_over_reasons(_rows({"peaks": 3.2, "up": 0.01}, flip={"peaks": 3.1, "up": 1.0}))
    assert len(reasons) == 1 and "head-foot axis flipped in the header" in reasons[0]


def test_a_head_that_learned_no_orientation_raises_no_flip_flag():
    """Phantoms whose vertebrae are symmetric head to foot: the upright head says 0.6-0.75 for every
    orientation and the peaks differ by a few per cent; nothing is flagged."""
    from spinelm.sanity import turned_over_reasons

    assert turned_over_reasons(_rows({"peaks": 3.2, "up": 0.62}, flip={"peaks": 3.7, "up": 0.74})) == []


def test_a_column_across_the_header_axis_is_named_by_the_peaks():
    from spinelm.sanity import turned_over_reasons

    reasons = turned_over_reasons(_rows({"peaks": 1.1, "up": 0.6}, flip={"peaks": 1.0, "up": 0.7},
                                        swap_L={"peaks": 3.4, "up": 0.7}))
    assert len(reasons) == 1 and "swapped with the left-right axis" in reasons[0]
    # a model without an upright head: the peaks alone
    assert "swapped" in turned_over_reasons(_rows({"peaks": 1.1}, swap_L={"peaks": 3.4}))[0]
    assert turned_over_reasons(_rows({"peaks": 3.0}, flip={"peaks": 3.3})) == []
    assert turned_over_reasons([]) == [] and turned_over_reasons(_rows({"peaks": 1.0})) == []


def _pair(level_p, upright, flipped_level_p, flipped_upright):
    stored = {"key": "stored", "name": "as stored", "n": 18, "peak_sum": 9.0, "level_p": level_p, "upright": upright,
              "upright_sum": 9.0 * upright}
    flip = {"key": "flip", "name": "head-foot axis flipped", "n": 18, "peak_sum": 9.5, "level_p": flipped_level_p,
            "upright": flipped_upright, "upright_sum": 9.5 * flipped_upright}
    return stored, flip


def test_a_model_learns_a_flip_check_only_from_evidence_that_tells_its_validation_scans_from_their_flips():
    """Whole-body Dixon phantoms: turned head over foot, every validation scan kept 0.56-0.90 of its
    level probability while the upright head moved both ways; only the level probability joins the
    check, and a scan that scores higher flipped is then reported."""
    from spinelm.sanity import describe_flip_check, fit_flip_check, turned_over_reasons

    pairs = [_pair(0.40, 0.75, 0.25, 0.70), _pair(0.27, 0.69, 0.243, 0.72), _pair(0.39, 0.77, 0.30, 0.64),
             _pair(0.35, 0.74, 0.22, 0.79)]
    check = fit_flip_check(pairs)
    assert check["cases"] == 4
    assert check["metrics"]["level_p"]["enabled"] and not check["metrics"]["upright"]["enabled"]
    assert check["metrics"]["level_p"]["worst"] == pytest.approx(np.log(0.243 / 0.27))
    assert "level probability" in describe_flip_check(check)
    clean = [pairs[0][0], {**pairs[0][1]}]
    flipped = [dict(pairs[0][1], key="stored", name="as stored"), dict(pairs[0][0], key="flip",
                                                                      name="head-foot axis flipped")]
    assert turned_over_reasons(clean, flip_check=check) == []
    reasons = turned_over_reasons(flipped, flip_check=check)
    assert len(reasons) == 1 and "head-foot axis flipped in the header" in reasons[0] and "level_p" in reasons[0]
    # without a learned check (none stored, or no metric that separated) the same rows raise nothing
    assert turned_over_reasons(flipped) == []
    blind = fit_flip_check([_pair(0.40, 0.75, 0.55, 0.70), _pair(0.30, 0.70, 0.20, 0.75), _pair(0.3, 0.7, 0.2, 0.6)])
    assert not any(m["enabled"] for m in blind["metrics"].values())
    assert turned_over_reasons(flipped, flip_check=blind) == []
    assert "no flip check learned" in describe_flip_check(blind)
    # too few validation scans to trust a margin
    assert not fit_flip_check(pairs[:2])["metrics"]["level_p"]["enabled"]


def _turned(stored_peaks, swapped_peaks):
    rows = [{"key": "stored", "name": "as stored", "n": 5, "peak_sum": stored_peaks}]
    return rows + [{"key": "swap_P", "name": "head-foot axis swapped with the front-back axis", "n": 5,
                    "peak_sum": swapped_peaks}]


def test_a_model_whose_clean_scans_look_spine_like_swapped_raises_its_own_swap_threshold():
    """Real lumbar MR, models trained 3 minutes per fold: clean validation scans swapped reached
    up to 1.37 times their stored peaks, so the fixed 1.1 flagged clean scans; each model now reports a
    swap only above its own validation scans' highest ratio, and a well-trained model keeps 1.1."""
    from spinelm.confidence import orientation_check
    from spinelm.sanity import PEAK_RATIO, describe_flip_check, turned_over_reasons

    clean = _turned(1.60, 1.81)  # 1.13x: a clean scan the fixed ratio flags
    assert turned_over_reasons(clean) != []
    weak = orientation_check([_turned(1.0, r) for r in (0.9, 1.2, 1.3, 1.05)])
    assert weak["swap"]["worst"] == pytest.approx(1.3) and weak["swap"]["peak_ratio"] == pytest.approx(1.3)
    assert turned_over_reasons(clean, flip_check=weak) == []
    assert turned_over_reasons(_turned(1.0, 1.6), flip_check=weak) != []  # a real swap still stands out
    assert "above 1.30x" in describe_flip_check(weak)
    strong = orientation_check([_turned(1.0, r) for r in (0.5, 0.7, 0.8)])
    assert strong["swap"]["peak_ratio"] == PEAK_RATIO
    assert turned_over_reasons(clean, flip_check=strong) != []
    assert "swap" not in orientation_check([_turned(1.0, 0.5)] * 2)  # too few scans to learn from


# ----------------------------------------------------------------------------- column shape
def _lumbar_case(rng, scale=1.0):
    """T11-L5 centroids 35 mm apart with a gentle lordosis and some annotation noise."""
    names = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")
    t = np.arange(len(names))
    pos = np.stack([rng.normal(0, 1, len(t)), 8 * np.sin(t / 3.0) + rng.normal(0, 1, len(t)),
                    -35.0 * scale * t + rng.normal(0, 1, len(t))], axis=1)
    return {L.label_of(n): p for n, p in zip(names, pos)}


def _spine_section(n_cases=10):
    from spinelm.fingerprint import _pair_statistics
    from spinelm.sanity import column_shape_statistics

    rng = np.random.default_rng(1)
    cases = [_lumbar_case(rng, scale=rng.uniform(0.9, 1.1)) for _ in range(n_cases)]
    pairs = _pair_statistics([{"landmarks": c} for c in cases])
    return {"consecutive_pairs": pairs, "column_shape": column_shape_statistics(cases, pairs)}


def _landmarks(case):
    from spinelm.io.landmarks import Landmark

    return [Landmark(lab, tuple(map(float, p))) for lab, p in case.items()]


def test_a_column_shaped_like_the_training_annotations_passes_the_shape_check():
    from spinelm.sanity import column_reasons

    spine = _spine_section()
    rng = np.random.default_rng(7)
    for scale in (0.85, 1.0, 1.15):  # smaller and larger bodies
        assert column_reasons(_landmarks(_lumbar_case(rng, scale)), spine) == []
    assert column_reasons(_landmarks(_lumbar_case(rng)), {"consecutive_pairs": spine["consecutive_pairs"]}) == []


def test_a_centroid_off_its_vertebra_a_missed_and_a_skipped_vertebra_are_reasons_to_review():
    from spinelm.sanity import column_reasons

    spine = _spine_section()
    case = _lumbar_case(np.random.default_rng(3))
    arch = dict(case)
    arch[L.label_of("L5")] = case[L.label_of("L5")] + np.array([0.0, 25.0, 8.0])  # on the posterior arch
    reasons = column_reasons(_landmarks(arch), spine)
    assert len(reasons) == 1 and "bends" in reasons[0] and "at L4" in reasons[0]

    # L3 not found, the labels run on: L3's label sits on L4, and so on (a missed vertebra)
    names = [L.label_of(n) for n in ("T11", "T12", "L1", "L2", "L3", "L4")]
    kept = [case[L.label_of(n)] for n in ("T11", "T12", "L1", "L2", "L4", "L5")]
    reasons = column_reasons(_landmarks(dict(zip(names, kept))), spine)
    assert any("L2-L3" in r and "missed" in r for r in reasons)

    skipped = {lab: p for lab, p in case.items() if lab != L.label_of("L3")}
    reasons = column_reasons(_landmarks(skipped), spine)
    assert reasons == ["no vertebra between L2 and L4: L3 missed?"]


def test_a_broken_flip_check_file_is_ignored_with_a_warning_naming_it(tmp_path, caplog):
    from spinelm.sanity import FLIP_CHECK_FILE, fit_flip_check, load_flip_check

    assert load_flip_check(tmp_path) is None and not caplog.records  # no file: nothing to say
    (tmp_path / FLIP_CHECK_FILE).write_text("{not json")
    with caplog.at_level("WARNING"):
        assert load_flip_check(tmp_path) is None
    assert FLIP_CHECK_FILE in caplog.text and "unreadable" in caplog.text
    import json

    (tmp_path / FLIP_CHECK_FILE).write_text(json.dumps(fit_flip_check([])))
    assert load_flip_check(tmp_path)["format"] == "spinelm-orientation"


def test_a_run_that_stops_where_the_scan_still_shows_the_column_names_the_missed_end_vertebra():
    from spinelm.io.image import Geometry
    from spinelm.sanity import end_reasons

    spine = _spine_section()
    case = _lumbar_case(np.random.default_rng(5))  # T11 at z = 0 down to L5 at z = -210 mm
    found = {lab: p for lab, p in case.items() if L.name_of(lab) not in ("T11", "L5")}  # T12-L4 found

    def box(z_top, z_bottom):  # a 1 mm grid from x, y = -60..60 mm and z_bottom..z_top (LPS, axial slices)
        return Geometry(size=(121, 121, int(z_top - z_bottom) + 1), spacing=(1.0, 1.0, 1.0),
                        origin=(-60.0, -60.0, float(z_bottom)), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))

    reasons = end_reasons(_landmarks(found), box(80, -290), spine)  # the scan shows T10 to the sacrum
    assert len(reasons) == 2
    assert "above T12" in reasons[0] and reasons[0].endswith("T11 missed?")
    assert "below L4" in reasons[1] and reasons[1].endswith("L5 missed?")
    # the scan cuts through T11 and L5 (their centres under one step inside): the run ends with the scan
    assert end_reasons(_landmarks(found), box(10, -220), spine) == []
    # T11-L5 all found (the training runs show nothing beyond them), or no offsets in the plan (older
    # models): nothing to say
    assert end_reasons(_landmarks(case), box(80, -290), spine) == []
    no_offsets = {"consecutive_pairs": {k: {kk: vv for kk, vv in v.items() if kk != "offset_mm_mean"}
                                        for k, v in spine["consecutive_pairs"].items()}}
    assert end_reasons(_landmarks(found), box(80, -290), no_offsets) == []
