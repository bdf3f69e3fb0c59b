"""Case checks: header extent against the training scans, column orientation against the header."""
from __future__ import annotations

import numpy as np

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
