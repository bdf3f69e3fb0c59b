import numpy as np
import pytest

from spinelm import labels as L


def test_verse_numbers_and_names():
    assert [L.label_of(n) for n in ("C1", "C7", "T1", "T12", "L1", "L5", "L6", "S1", "Cocc", "T13")] == \
        [1, 7, 8, 19, 20, 24, 25, 26, 27, 28]
    assert L.name_of(20) == "L1"
    assert L.label_of("sacrum") == 26 and L.label_of("l3") == 22 and L.label_of("22") == 22
    assert L.VALID_LABELS == tuple(range(1, 29))


def test_cranio_caudal_order_puts_transitional_vertebrae_in_place():
    order = L.sort_cranio_caudal([26, 28, 20, 19, 25, 24, 1])
    assert [L.name_of(x) for x in order] == ["C1", "T12", "T13", "L1", "L5", "L6", "S1"]


@pytest.mark.parametrize("name, expected", [
    ("C7", {"T1"}), ("T12", {"L1", "T13"}), ("T13", {"L1"}), ("L5", {"S1", "L6"}), ("L6", {"S1"}),
    ("S1", {"Cocc"}), ("Cocc", set()),
])
def test_successors_allow_only_anatomical_variants(name, expected):
    assert {L.name_of(x) for x in L.successors(L.label_of(name))} == expected


def test_predecessors_invert_successors():
    assert set(L.predecessors(L.label_of("L1"))) == {L.label_of("T12"), L.label_of("T13")}
    assert set(L.predecessors(L.label_of("S1"))) == {L.label_of("L5"), L.label_of("L6")}


def test_regular_sequence_skips_variants():
    assert [L.name_of(x) for x in L.regular_sequence(L.label_of("T11"), L.label_of("L2"))] == \
        ["T11", "T12", "L1", "L2"]


@pytest.mark.parametrize("bad", [0, 29, 99, -1, "X9", "Q"])
def test_unknown_labels_raise_with_choices(bad):
    with pytest.raises(KeyError, match="unknown vertebra"):
        L.vertebra(bad)
    if not isinstance(bad, str):
        assert not L.is_valid_label(bad)


def test_level_coordinate_counts_regular_vertebrae_with_variants_halfway():
    coord = {v.name: L.level_coordinate(v.label) for v in L.VERTEBRAE}
    assert coord["C1"] == 0 and coord["T1"] == 7 and coord["T12"] == 18 and coord["L1"] == 19 and coord["S1"] == 24
    assert coord["T12"] < coord["T13"] < coord["L1"] and coord["L5"] < coord["L6"] < coord["S1"]
    regular = [coord[v.name] for v in L.VERTEBRAE if not v.transitional]
    assert np.all(np.diff(regular) == 1)  # neighbours one level apart
